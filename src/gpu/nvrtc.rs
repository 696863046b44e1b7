//! The kernels compiled at run time by the installed NVRTC, for drivers that
//! cannot load the embedded fatbins (older than the nvcc that built them)
//! and for builds made without nvcc: every `.cu` file of `kernels/`, embedded
//! with its headers, becomes one cubin for the device's `sm_XY`, cached on
//! disk under a key of source, headers, options and NVRTC version.
//!
//! NVRTC is opened here with `libloading` rather than through cudarc, which
//! would pick the newest library on the machine: a CUDA 13 NVRTC next to a
//! CUDA 12 driver makes cubins that driver cannot load, so the major version
//! must be chosen to fit the driver.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use libloading::Library;

use super::generated::{HEADERS, KERNELS, SOURCES};
use crate::error::{Error, Result};

/// The newest NVRTC major version looked for by soname (`libnvrtc.so.N`).
const NEWEST_MAJOR: u32 = 14;
/// The oldest with `nvrtcGetCUBIN` and C++17.
const OLDEST_MAJOR: u32 = 11;

type Program = *mut c_void;
/// `nvrtcResult`: 0 is success.
type Status = c_int;

/// The NVRTC entry points used here (their C signatures, stable since 11.1).
struct Api {
    version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> Status,
    create_program: unsafe extern "C" fn(
        *mut Program,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> Status,
    compile_program: unsafe extern "C" fn(Program, c_int, *const *const c_char) -> Status,
    program_log_size: unsafe extern "C" fn(Program, *mut usize) -> Status,
    program_log: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    cubin_size: unsafe extern "C" fn(Program, *mut usize) -> Status,
    cubin: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    destroy_program: unsafe extern "C" fn(*mut Program) -> Status,
    error_string: unsafe extern "C" fn(Status) -> *const c_char,
}

/// An opened NVRTC library.
pub struct Nvrtc {
    api: Api,
    /// Keeps the function pointers in `api` valid.
    _library: Library,
    /// NVRTC's builtins library from beside an NVRTC opened by path
    /// ([`preload_builtins`]), kept loaded for its compiles.
    _builtins: Option<Library>,
    /// The name or path it was opened by.
    library_name: String,
    version: (u32, u32),
}

/// A GPU architecture as NVRTC names it: `sm_{major}{minor}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arch {
    pub major: u32,
    pub minor: u32,
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sm_{}{}", self.major, self.minor)
    }
}

/// One compiled source file.
pub struct Cubin {
    pub bytes: Vec<u8>,
    /// Read from the disk cache rather than compiled now.
    pub from_cache: bool,
}

/// Every kernel file of `kernels/`: its stem and the kernels it defines.
pub fn kernel_files() -> Vec<(&'static str, Vec<&'static str>)> {
    SOURCES
        .iter()
        .map(|(stem, _)| {
            let kernels = KERNELS
                .iter()
                .filter(|(_, s)| s == stem)
                .map(|(name, _)| *name)
                .collect();
            (*stem, kernels)
        })
        .collect()
}

/// The library names tried, newest first, none newer than `max_major`; an
/// `explicit` one (`AUTOFOCUS_NVRTC`: a path or a name) alone.
fn candidates(explicit: Option<String>, max_major: Option<u32>) -> Vec<String> {
    if let Some(explicit) = explicit {
        return vec![explicit];
    }
    let newest = max_major.unwrap_or(NEWEST_MAJOR).min(NEWEST_MAJOR);
    let mut names = Vec::new();
    for major in (OLDEST_MAJOR..=newest).rev() {
        if cfg!(windows) {
            names.push(format!("nvrtc64_{major}0_0.dll"));
        } else {
            names.push(format!("libnvrtc.so.{major}"));
        }
    }
    // The unversioned development link, whatever version it points to.
    names.push(
        if cfg!(windows) {
            "nvrtc.dll"
        } else {
            "libnvrtc.so"
        }
        .to_string(),
    );
    names
}

/// NVRTC opens `libnvrtc-builtins.so.MAJOR.MINOR` by name when it
/// compiles, through the loader's search path, which does not hold the
/// folder of an NVRTC opened by path (`AUTOFOCUS_NVRTC`) unless that
/// library carries a `$ORIGIN` run path: CUDA 12's wheel does, CUDA 13's
/// does not ("failed to open libnvrtc-builtins"). Loading the one beside
/// it first makes that lookup find it (a loaded library answers to its
/// name). `None` where `name` is not a path or there is none beside it.
fn preload_builtins(name: &str, (major, minor): (u32, u32)) -> Option<Library> {
    if cfg!(windows) {
        return None;
    }
    let folder = std::path::Path::new(name).parent()?;
    if folder.as_os_str().is_empty() {
        return None;
    }
    let builtins = folder.join(format!("libnvrtc-builtins.so.{major}.{minor}"));
    // SAFETY: as for NVRTC itself: no initialisation with preconditions.
    builtins
        .is_file()
        .then(|| unsafe { Library::new(&builtins) }.ok())
        .flatten()
}

impl Nvrtc {
    /// Opens the newest NVRTC whose major version is at most `max_major`
    /// (the driver's, so that it can load the cubins; `None`: any), or the
    /// library `AUTOFOCUS_NVRTC` names.
    ///
    /// # Errors
    /// [`Error::Unsupported`] naming every library tried and why it was
    /// not taken.
    pub fn open(max_major: Option<u32>) -> Result<Self> {
        let mut rejected = Vec::new();
        let explicit = std::env::var_os("AUTOFOCUS_NVRTC")
            .filter(|v| !v.is_empty())
            .map(|v| v.to_string_lossy().into_owned());
        for name in candidates(explicit, max_major) {
            // SAFETY: loading NVRTC runs no initialisation with preconditions.
            let library = match unsafe { Library::new(&name) } {
                Ok(library) => library,
                Err(_) => {
                    rejected.push(format!("{name} (not found)"));
                    continue;
                }
            };
            let nvrtc = match Self::bind(library, &name) {
                Ok(nvrtc) => nvrtc,
                Err(reason) => {
                    rejected.push(format!("{name} ({reason})"));
                    continue;
                }
            };
            match max_major {
                Some(max) if nvrtc.version.0 > max => rejected.push(format!(
                    "{name} (NVRTC {}.{}, newer than the driver's CUDA {max})",
                    nvrtc.version.0, nvrtc.version.1
                )),
                _ => return Ok(nvrtc),
            }
        }
        Err(Error::Unsupported(format!(
            "no usable NVRTC: tried {}",
            rejected.join(", ")
        )))
    }

    fn bind(library: Library, name: &str) -> std::result::Result<Self, String> {
        // SAFETY: each symbol is NVRTC's function of that name, whose C
        // signature is the field's type; `library` is kept alive with them.
        let api = unsafe {
            macro_rules! symbol {
                ($name:literal) => {
                    *library
                        .get(concat!($name, "\0").as_bytes())
                        .map_err(|e| format!("no {}: {e}", $name))?
                };
            }
            Api {
                version: symbol!("nvrtcVersion"),
                create_program: symbol!("nvrtcCreateProgram"),
                compile_program: symbol!("nvrtcCompileProgram"),
                program_log_size: symbol!("nvrtcGetProgramLogSize"),
                program_log: symbol!("nvrtcGetProgramLog"),
                cubin_size: symbol!("nvrtcGetCUBINSize"),
                cubin: symbol!("nvrtcGetCUBIN"),
                destroy_program: symbol!("nvrtcDestroyProgram"),
                error_string: symbol!("nvrtcGetErrorString"),
            }
        };
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers.
        let status = unsafe { (api.version)(&mut major, &mut minor) };
        if status != 0 {
            return Err(format!("nvrtcVersion failed with status {status}"));
        }
        Ok(Self {
            api,
            _library: library,
            _builtins: preload_builtins(name, (major as u32, minor as u32)),
            library_name: name.to_string(),
            version: (major as u32, minor as u32),
        })
    }

    /// (major, minor), e.g. (12, 4).
    pub fn version(&self) -> (u32, u32) {
        self.version
    }

    /// The name or path the library was opened by.
    pub fn library_name(&self) -> &str {
        &self.library_name
    }

    fn status_text(&self, status: Status) -> String {
        // SAFETY: NVRTC returns a static string for any status.
        let text = unsafe { (self.api.error_string)(status) };
        if text.is_null() {
            format!("status {status}")
        } else {
            // SAFETY: non-null, NUL-terminated, static.
            unsafe { CStr::from_ptr(text) }
                .to_string_lossy()
                .into_owned()
        }
    }

    /// The NVRTC options every kernel is compiled with: as nvcc builds the
    /// fatbins (C++17, default float contraction, no fast math).
    fn options(arch: Arch) -> Vec<String> {
        vec![format!("--gpu-architecture={arch}"), "-std=c++17".into()]
    }

    /// Compiles `source` (named `name` in messages), which may include
    /// `headers` by name, into a cubin for `arch`.
    ///
    /// # Errors
    /// [`Error::Device`] with NVRTC's log when it does not compile.
    pub fn compile(
        &self,
        name: &str,
        source: &str,
        headers: &[(&str, &str)],
        arch: Arch,
    ) -> Result<Vec<u8>> {
        let fail = |reason: String| Error::device("nvrtc", format!("{name} for {arch}: {reason}"));
        let c_string = |text: &str| {
            CString::new(text).map_err(|_| fail(format!("`{text:.40}` holds a NUL byte")))
        };
        let source_c = c_string(source)?;
        let name_c = c_string(name)?;
        let header_texts = headers
            .iter()
            .map(|(_, text)| c_string(text))
            .collect::<Result<Vec<_>>>()?;
        let header_names = headers
            .iter()
            .map(|(name, _)| c_string(name))
            .collect::<Result<Vec<_>>>()?;
        let text_ptrs: Vec<*const c_char> = header_texts.iter().map(|s| s.as_ptr()).collect();
        let name_ptrs: Vec<*const c_char> = header_names.iter().map(|s| s.as_ptr()).collect();
        let options = Self::options(arch)
            .iter()
            .map(|o| c_string(o))
            .collect::<Result<Vec<_>>>()?;
        let option_ptrs: Vec<*const c_char> = options.iter().map(|s| s.as_ptr()).collect();

        let mut program: Program = std::ptr::null_mut();
        // SAFETY: every pointer is a live NUL-terminated string, the arrays
        // hold `headers.len()` of them.
        let status = unsafe {
            (self.api.create_program)(
                &mut program,
                source_c.as_ptr(),
                name_c.as_ptr(),
                headers.len() as c_int,
                text_ptrs.as_ptr(),
                name_ptrs.as_ptr(),
            )
        };
        if status != 0 {
            return Err(fail(self.status_text(status)));
        }
        let program = ProgramGuard {
            nvrtc: self,
            program,
        };
        // SAFETY: a live program and `option_ptrs.len()` valid strings.
        let status = unsafe {
            (self.api.compile_program)(
                program.program,
                option_ptrs.len() as c_int,
                option_ptrs.as_ptr(),
            )
        };
        if status != 0 {
            let log = program.log();
            return Err(fail(format!("{}\n{log}", self.status_text(status))));
        }
        let mut size = 0usize;
        // SAFETY: a compiled program and a valid out-pointer.
        let status = unsafe { (self.api.cubin_size)(program.program, &mut size) };
        if status != 0 {
            return Err(fail(self.status_text(status)));
        }
        let mut cubin = vec![0u8; size];
        // SAFETY: `cubin` holds the size NVRTC reported.
        let status = unsafe { (self.api.cubin)(program.program, cubin.as_mut_ptr().cast()) };
        if status != 0 {
            return Err(fail(self.status_text(status)));
        }
        if !is_elf(&cubin) {
            return Err(fail(format!(
                "NVRTC gave no cubin ({size} bytes; is {arch} a real architecture?)"
            )));
        }
        Ok(cubin)
    }

    /// The cubin of kernel file `kernels/{stem}.cu` for `arch`: from
    /// `cache_dir` when it holds one for these very sources, options and
    /// NVRTC, else compiled now and stored there (atomically, so concurrent
    /// processes never see half a file). A cache that cannot be written is
    /// no error: the cubin is still returned.
    ///
    /// # Errors
    /// An unknown stem; as [`Nvrtc::compile`].
    pub fn kernel_file(&self, stem: &str, arch: Arch, cache_dir: Option<&Path>) -> Result<Cubin> {
        let (_, source) = SOURCES
            .iter()
            .find(|(s, _)| *s == stem)
            .ok_or_else(|| Error::device("nvrtc", format!("no kernel file kernels/{stem}.cu")))?;
        let cached = cache_dir.map(|dir| dir.join(self.cache_file_name(stem, source, arch)));
        if let Some(path) = &cached
            && let Ok(bytes) = fs::read(path)
            && is_elf(&bytes)
        {
            return Ok(Cubin {
                bytes,
                from_cache: true,
            });
        }
        let bytes = self.compile(&format!("{stem}.cu"), source, HEADERS, arch)?;
        if let Some(path) = &cached {
            let _ = store_atomically(path, &bytes);
        }
        Ok(Cubin {
            bytes,
            from_cache: false,
        })
    }

    /// `{stem}-{arch}-nvrtc{major}.{minor}-{hash}.cubin`, the hash over
    /// everything that shapes the cubin: source, headers, options.
    fn cache_file_name(&self, stem: &str, source: &str, arch: Arch) -> String {
        let mut hash = Fnv1a::default();
        hash.write(source.as_bytes());
        for (name, text) in HEADERS {
            hash.write(name.as_bytes());
            hash.write(text.as_bytes());
        }
        for option in Self::options(arch) {
            hash.write(option.as_bytes());
        }
        let (major, minor) = self.version;
        format!(
            "{stem}-{arch}-nvrtc{major}.{minor}-{:016x}.cubin",
            hash.finish()
        )
    }
}

/// Destroys its program on every return path.
struct ProgramGuard<'a> {
    nvrtc: &'a Nvrtc,
    program: Program,
}

impl ProgramGuard<'_> {
    fn log(&self) -> String {
        let mut size = 0usize;
        // SAFETY: a live program and a valid out-pointer.
        if unsafe { (self.nvrtc.api.program_log_size)(self.program, &mut size) } != 0 {
            return String::new();
        }
        let mut log = vec![0u8; size.max(1)];
        // SAFETY: `log` holds the size NVRTC reported.
        if unsafe { (self.nvrtc.api.program_log)(self.program, log.as_mut_ptr().cast()) } != 0 {
            return String::new();
        }
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        String::from_utf8_lossy(&log[..end]).trim_end().to_string()
    }
}

impl Drop for ProgramGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram, destroyed once.
        unsafe { (self.nvrtc.api.destroy_program)(&mut self.program) };
    }
}

fn is_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x7fELF")
}

/// Writes to a temporary file beside `path`, then renames it into place.
fn store_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    // Unique per process and call: two threads (or processes) writing the
    // same entry never share a temporary.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let temporary = dir.join(format!(
        ".{}.{}.{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id(),
        WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let mut file = fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temporary, path).inspect_err(|_| {
        let _ = fs::remove_file(&temporary);
    })
}

/// Where compiled kernels are kept: `AUTOFOCUS_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/autofocus/kernels`, else `~/.cache/autofocus/kernels`
/// (`%LOCALAPPDATA%` on Windows); `None` when none is set.
pub fn default_cache_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("AUTOFOCUS_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    let base = var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|home| Path::new(&home).join(".cache")))
        .or_else(|| var("LOCALAPPDATA").map(PathBuf::from))?;
    Some(base.join("autofocus").join("kernels"))
}

/// FNV-1a, 64 bits: a stable hash (std's is not stable across releases).
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so that ("ab", "c") and ("a", "bc") differ.
        self.0 = (self.0 ^ 0xff).wrapping_mul(0x0000_0100_0000_01b3);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_newest_first_and_capped_by_the_driver() {
        let names = candidates(None, Some(12));
        let expected_first = if cfg!(windows) {
            "nvrtc64_120_0.dll"
        } else {
            "libnvrtc.so.12"
        };
        assert_eq!(names[0], expected_first);
        assert!(!names.iter().any(|n| n.contains("13")), "{names:?}");
        assert_eq!(names.len(), (12 - OLDEST_MAJOR + 1) as usize + 1);
        assert_eq!(candidates(None, None).len(), names.len() + 2);
        // An explicit library replaces the search.
        let explicit = candidates(Some("/opt/nvrtc/libnvrtc.so.12".into()), Some(12));
        assert_eq!(explicit, ["/opt/nvrtc/libnvrtc.so.12"]);
    }

    #[test]
    fn fnv1a_separates_fields() {
        let hash = |parts: &[&str]| {
            let mut h = Fnv1a::default();
            for p in parts {
                h.write(p.as_bytes());
            }
            h.finish()
        };
        assert_ne!(hash(&["ab", "c"]), hash(&["a", "bc"]));
        assert_eq!(hash(&["ab", "c"]), hash(&["ab", "c"]));
    }
}
