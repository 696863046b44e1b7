# Sourced by the install scripts: Python virtual environments for tools that
# come from PyPI (no system packages needed).

# ensure_venv DIR: creates the venv DIR (relative to the repository root)
# unless it exists, and prints its site-packages directory.
ensure_venv() {
  local venv=$1
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" >&2
  fi
  "$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
}

# venv_install DIR PACKAGE...: pip-installs the packages into the venv DIR,
# quietly (progress on stderr, so that callers can print one path).
venv_install() {
  local venv=$1
  shift
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$@" >&2
}
