//! The one way this crate writes a file: atomically.
//!
//! [`check_destination`] runs before any work (so a read-only folder or an
//! existing output is reported before the model runs), and [`write_file`]
//! writes the bytes to a temporary file in the destination's folder, fsyncs
//! it, moves it into place and fsyncs the folder. A reader sees the old file
//! or the whole new one, never a part, whatever happens in between:
//! - on Linux the temporary is unnamed (`O_TMPFILE`), so a killed process
//!   leaves nothing behind; elsewhere it is a hidden file removed on every
//!   error path;
//! - a symlink at the destination is never followed: it counts as an
//!   existing file, and with [`Overwrite::Replace`] the link itself is
//!   replaced, not its target;
//! - the file gets the usual permissions (0666 less the umask).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// What to do when the destination exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overwrite {
    /// Fail, leaving it untouched (checked atomically at the final step).
    Never,
    /// Replace it in one step.
    Replace,
}

impl Overwrite {
    /// `Replace` when `force`, else `Never`.
    pub fn when(force: bool) -> Self {
        if force { Self::Replace } else { Self::Never }
    }
}

/// The folder a file at `path` lives in.
fn folder_of(path: &Path) -> PathBuf {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Checks, before any work, that `out` can be written: it is not one of
/// `inputs` (nothing the user gave is overwritten), nothing is there unless
/// `overwrite` is `Replace` (a symlink counts, dangling or not), it is not a
/// folder, and its folder exists and takes a new file (probed by creating
/// and discarding a temporary one).
///
/// # Errors
/// [`Error::InvalidArgument`] naming `out` and what is wrong; [`Error::Io`]
/// when the folder cannot be written.
pub fn check_destination(out: &Path, inputs: &[&Path], overwrite: Overwrite) -> Result<()> {
    let canonical = |p: &Path| std::fs::canonicalize(p).ok();
    let out_c = canonical(out);
    if out_c.is_some() && inputs.iter().any(|i| canonical(i) == out_c) {
        return Err(Error::InvalidArgument(format!(
            "{}: the output would overwrite an input",
            out.display()
        )));
    }
    if let Ok(meta) = std::fs::symlink_metadata(out) {
        if meta.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "{} is a folder, not a file",
                out.display()
            )));
        }
        if overwrite == Overwrite::Never {
            return Err(Error::InvalidArgument(format!(
                "{} exists: pass --force to overwrite it",
                out.display()
            )));
        }
    }
    let dir = folder_of(out);
    if !dir.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "{}: folder {} does not exist",
            out.display(),
            dir.display()
        )));
    }
    Temporary::create(&dir).map(drop).map_err(|e| {
        Error::io(
            out,
            std::io::Error::new(e.kind(), format!("cannot write in {}: {e}", dir.display())),
        )
    })
}

/// Writes the file at `path` with `write`, atomically (see the module).
///
/// # Errors
/// [`Error::Io`] naming `path` (an existing destination with
/// [`Overwrite::Never`] is `AlreadyExists`); any error of `write`. The
/// destination is then as it was, and no temporary file remains.
pub fn write_file(
    path: &Path,
    overwrite: Overwrite,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    let io = |e: std::io::Error| Error::io(path, e);
    let dir = folder_of(path);
    let mut temp = Temporary::create(&dir).map_err(io)?;
    {
        let mut out = BufWriter::new(&mut temp.file);
        write(&mut out)?;
        out.flush().map_err(io)?;
    }
    temp.file.sync_all().map_err(io)?;
    temp.commit(path, overwrite).map_err(io)?;
    // The rename is durable once the folder's entry is.
    File::open(&dir).and_then(|d| d.sync_all()).map_err(io)
}

/// A temporary file in the destination's folder: unnamed where the system
/// allows (Linux `O_TMPFILE`), else a hidden name removed when dropped
/// uncommitted.
struct Temporary {
    file: File,
    dir: PathBuf,
    /// The hidden name, for a named temporary.
    name: Option<PathBuf>,
}

/// Distinguishes the temporaries of one process.
static COUNTER: AtomicU64 = AtomicU64::new(0);

fn hidden_name(dir: &Path) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".autofocus-{}-{n}.tmp", std::process::id()))
}

impl Temporary {
    fn create(dir: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        #[cfg(target_os = "linux")]
        {
            let unnamed = OpenOptions::new()
                .write(true)
                .mode(0o666)
                .custom_flags(libc::O_TMPFILE)
                .open(dir);
            match unnamed {
                Ok(file) if Path::new("/proc/self/fd").is_dir() => {
                    return Ok(Self {
                        file,
                        dir: dir.to_path_buf(),
                        name: None,
                    });
                }
                // Filesystems without O_TMPFILE say so; fall back to a name.
                Ok(_) => {}
                Err(e) if is_unsupported(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Self::create_named(dir)
    }

    /// A hidden, named temporary (where `O_TMPFILE` is missing).
    fn create_named(dir: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let name = hidden_name(dir);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o666)
            .open(&name)?;
        Ok(Self {
            file,
            dir: dir.to_path_buf(),
            name: Some(name),
        })
    }

    /// Moves the written file to `path`.
    fn commit(mut self, path: &Path, overwrite: Overwrite) -> std::io::Result<()> {
        match self.name.take() {
            None => self.commit_unnamed(path, overwrite),
            Some(name) => {
                let result = match overwrite {
                    Overwrite::Replace => std::fs::rename(&name, path),
                    // A hard link fails if anything is at `path`: no clobbering.
                    Overwrite::Never => std::fs::hard_link(&name, path),
                };
                let _ = std::fs::remove_file(&name);
                result
            }
        }
    }

    #[cfg(target_os = "linux")]
    fn commit_unnamed(&self, path: &Path, overwrite: Overwrite) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let link = |to: &Path| -> std::io::Result<()> {
            let from = std::ffi::CString::new(format!("/proc/self/fd/{}", self.file.as_raw_fd()))?;
            let to = std::ffi::CString::new(to.as_os_str().as_encoded_bytes())?;
            // SAFETY: both are NUL-terminated paths that outlive the call.
            let rc = unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    from.as_ptr(),
                    libc::AT_FDCWD,
                    to.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        };
        match overwrite {
            // linkat never replaces: anything at `path` (a dangling symlink too) stops it.
            Overwrite::Never => link(path),
            Overwrite::Replace => {
                let name = hidden_name(&self.dir);
                link(&name)?;
                let renamed = std::fs::rename(&name, path);
                if renamed.is_err() {
                    let _ = std::fs::remove_file(&name);
                }
                renamed
            }
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn commit_unnamed(&self, _: &Path, _: Overwrite) -> std::io::Result<()> {
        unreachable!("unnamed temporaries exist only on Linux")
    }
}

impl Drop for Temporary {
    fn drop(&mut self) {
        if let Some(name) = &self.name {
            let _ = std::fs::remove_file(name);
        }
    }
}

#[cfg(target_os = "linux")]
fn is_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL | libc::ENOENT)
    )
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn write_text(path: &Path, overwrite: Overwrite, text: &str) -> Result<()> {
        write_file(path, overwrite, |w| {
            w.write_all(text.as_bytes()).map_err(|e| Error::io(path, e))
        })
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn writes_replaces_and_never_clobbers() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a.txt");
        write_text(&out, Overwrite::Never, "one").unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "one");
        let err = write_text(&out, Overwrite::Never, "two").unwrap_err();
        assert!(err.to_string().contains("a.txt"), "{err}");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "one");
        write_text(&out, Overwrite::Replace, "three").unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "three");
        assert_eq!(entries(dir.path()), ["a.txt"], "no temporary left");
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("keep.txt");
        std::fs::write(&out, "old").unwrap();
        let err = write_file(&out, Overwrite::Replace, |w| {
            w.write_all(b"partial").unwrap();
            Err(Error::InvalidArgument("stopped halfway".into()))
        })
        .unwrap_err();
        assert!(err.to_string().contains("halfway"));
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "old");
        assert_eq!(entries(dir.path()), ["keep.txt"]);
    }

    #[test]
    fn symlinks_count_as_existing_and_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target.txt");
        std::fs::write(&target, "precious").unwrap();
        let link = dir.path().join("link.txt");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let dangling = dir.path().join("dangling.txt");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        for path in [&link, &dangling] {
            assert!(check_destination(path, &[], Overwrite::Never).is_err());
            assert!(write_text(path, Overwrite::Never, "x").is_err());
        }
        assert!(
            !dir.path().join("nowhere").exists(),
            "the dangling link was followed"
        );
        // Replacing replaces the link, not what it points at.
        write_text(&link, Overwrite::Replace, "new").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
        assert!(
            !std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    /// The named fallback keeps the same promises.
    #[test]
    fn named_temporaries_commit_without_clobbering_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("n.txt");
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        let mut temp = Temporary::create_named(dir.path()).unwrap();
        temp.file.write_all(b"first").unwrap();
        temp.commit(&out, Overwrite::Never).unwrap();
        let temp = Temporary::create_named(dir.path()).unwrap();
        assert!(temp.commit(&out, Overwrite::Never).is_err());
        let temp = Temporary::create_named(dir.path()).unwrap();
        assert!(temp.commit(&dangling, Overwrite::Never).is_err());
        let mut temp = Temporary::create_named(dir.path()).unwrap();
        temp.file.write_all(b"second").unwrap();
        temp.commit(&out, Overwrite::Replace).unwrap();
        drop(Temporary::create_named(dir.path()).unwrap()); // dropped uncommitted
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "second");
        assert_eq!(entries(dir.path()), ["dangling", "n.txt"]);
    }

    #[test]
    fn permissions_follow_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("perm.txt");
        write_text(&out, Overwrite::Never, "x").unwrap();
        // SAFETY: umask only reads and sets this process's mask.
        let mask = unsafe {
            let m = libc::umask(0o022);
            libc::umask(m);
            m
        };
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !(mask as u32));
    }

    #[test]
    fn an_unwritable_folder_is_found_before_any_work() {
        let dir = tempfile::tempdir().unwrap();
        let ro = dir.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        let out = ro.join("x.txt");
        // Root writes anywhere: only check when the folder really refuses.
        if std::fs::write(ro.join("probe"), "").is_err() {
            let err = check_destination(&out, &[], Overwrite::Never).unwrap_err();
            assert!(err.to_string().contains("cannot write"), "{err}");
        }
        assert!(check_destination(&dir.path().join("missing/x"), &[], Overwrite::Never).is_err());
        assert!(check_destination(dir.path(), &[], Overwrite::Replace).is_err());
    }
}
