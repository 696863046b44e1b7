//! Which machine code the CUDA backend loads: the fatbins nvcc embedded at
//! build time, or cubins that NVRTC compiles from the embedded sources at run
//! time ([`super::nvrtc`]). Fatbins need a driver of their CUDA major version
//! or newer (nvcc 13's load only on drivers ≥ 580); older drivers, builds
//! without nvcc and GPUs no fatbin target covers get NVRTC's cubins.
//! `AUTOFOCUS_KERNELS=fatbin|nvrtc` forces a path.

use std::path::PathBuf;
use std::sync::{Arc, Once, OnceLock};

use cudarc::driver::{CudaContext, CudaModule};

use super::generated::{FATBIN_CUDA_VERSION, IMAGES};
use super::nvrtc::{Arch, Nvrtc, default_cache_dir};
use crate::error::{Error, Result};

/// Where the kernels' machine code comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelSource {
    /// The fatbins embedded at build time.
    Fatbin,
    /// Cubins compiled at run time by the installed NVRTC.
    Nvrtc,
}

impl KernelSource {
    /// `AUTOFOCUS_KERNELS`: `fatbin`, `nvrtc`, or unset/`auto` (`None`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for any other value.
    pub fn forced() -> Result<Option<Self>> {
        match std::env::var("AUTOFOCUS_KERNELS").as_deref() {
            Err(_) | Ok("" | "auto") => Ok(None),
            Ok("fatbin") => Ok(Some(Self::Fatbin)),
            Ok("nvrtc") => Ok(Some(Self::Nvrtc)),
            Ok(other) => Err(Error::InvalidArgument(format!(
                "AUTOFOCUS_KERNELS={other}: expected fatbin, nvrtc or auto"
            ))),
        }
    }

    /// The default for a driver of CUDA `driver_version` (as
    /// `cuDriverGetVersion` gives it: 12020 for 12.2) and fatbins built by
    /// CUDA `fatbin_version` (0: none): the fatbins when the driver's major
    /// version is theirs or newer (within a major, newer cubins load on
    /// older drivers), else NVRTC.
    pub fn preferred(driver_version: u32, fatbin_version: u32) -> Self {
        if fatbin_version != 0 && driver_version / 1000 >= fatbin_version / 1000 {
            Self::Fatbin
        } else {
            Self::Nvrtc
        }
    }
}

/// The driver CUDA version fatbins built by CUDA `fatbin_version` need, for
/// messages (13.0 for a build without them: CI builds them with nvcc 13).
fn driver_cuda_for_fatbins(fatbin_version: u32) -> u32 {
    fatbin_version.max(13000)
}

/// The PyPI package with the NVRTC of CUDA `major`: CUDA 12's carries a
/// `-cu12` suffix, later ones a version instead.
fn nvrtc_wheel(major: u32) -> String {
    if major <= 12 {
        format!("nvidia-cuda-nvrtc-cu{major}")
    } else {
        format!("\"nvidia-cuda-nvrtc=={major}.*\"")
    }
}

/// `12020` as `12.2`.
fn cuda_version_text(version: u32) -> String {
    format!("{}.{}", version / 1000, version % 1000 / 10)
}

/// Loads kernel files for one GPU.
pub struct KernelLoader {
    forced: Option<KernelSource>,
    driver_version: u32,
    arch: Arch,
    cache_dir: Option<PathBuf>,
    /// Opened on first need; the error text is kept to repeat it.
    nvrtc: OnceLock<std::result::Result<Arc<Nvrtc>, String>>,
}

impl KernelLoader {
    /// For a GPU of `arch` under a driver of CUDA `driver_version`. Opens
    /// NVRTC now when it will be needed, so a missing one is reported at
    /// start rather than at the first kernel.
    ///
    /// # Errors
    /// A bad `AUTOFOCUS_KERNELS`; no usable NVRTC where the fatbins cannot
    /// serve (the message names the driver and what to install).
    pub fn new(driver_version: u32, arch: Arch) -> Result<Self> {
        let loader = Self {
            forced: KernelSource::forced()?,
            driver_version,
            arch,
            cache_dir: default_cache_dir(),
            nvrtc: OnceLock::new(),
        };
        if loader.source() == KernelSource::Nvrtc {
            loader.nvrtc(&loader.why_nvrtc())?;
        }
        Ok(loader)
    }

    /// The path taken first.
    pub fn source(&self) -> KernelSource {
        self.forced.unwrap_or(KernelSource::preferred(
            self.driver_version,
            FATBIN_CUDA_VERSION,
        ))
    }

    /// Why the fatbins are not used, for messages.
    fn why_nvrtc(&self) -> String {
        if self.forced == Some(KernelSource::Nvrtc) {
            "AUTOFOCUS_KERNELS=nvrtc".into()
        } else if IMAGES.is_empty() {
            "this build has no fatbins (nvcc was not found when it was compiled)".into()
        } else {
            format!(
                "the driver supports CUDA {} but the fatbins were built by CUDA {}",
                cuda_version_text(self.driver_version),
                cuda_version_text(FATBIN_CUDA_VERSION)
            )
        }
    }

    fn nvrtc(&self, why: &str) -> Result<Arc<Nvrtc>> {
        let opened = self.nvrtc.get_or_init(|| {
            Nvrtc::open(Some(self.driver_version / 1000))
                .map(Arc::new)
                .map_err(|e| e.to_string())
        });
        opened.clone().map_err(|reason| {
            Error::Unsupported(format!(
                "--device cuda: {why}, and {reason}. Install an NVIDIA driver of CUDA {} or newer, \
                 or the NVRTC of the driver's CUDA {} (e.g. `pip install {}`, \
                 then put its lib/ on LD_LIBRARY_PATH or name its library in AUTOFOCUS_NVRTC)",
                cuda_version_text(driver_cuda_for_fatbins(FATBIN_CUDA_VERSION)),
                self.driver_version / 1000,
                nvrtc_wheel(self.driver_version / 1000),
            ))
        })
    }

    /// Loads `kernels/{stem}.cu` into `context`: the fatbin, or NVRTC's
    /// cubin when the fatbin cannot serve (unless a path is forced).
    ///
    /// # Errors
    /// [`Error::Unsupported`] or [`Error::Device`] naming the file, the
    /// path and the driver's reason.
    pub fn load(&self, context: &Arc<CudaContext>, stem: &str) -> Result<Arc<CudaModule>> {
        if self.source() == KernelSource::Fatbin {
            let image = IMAGES.iter().find(|(s, _)| *s == stem).map(|(_, i)| *i);
            let failure = match image {
                None => format!("kernels/{stem}.cu is missing from this build's fatbins"),
                Some(image) => match load_image(context, image.to_vec()) {
                    Ok(module) => return Ok(module),
                    Err(e) => format!("the fatbin of kernels/{stem}.cu does not load ({e})"),
                },
            };
            if self.forced.is_some() {
                return Err(Error::device(stem, failure));
            }
            return self.load_compiled(context, stem, &failure);
        }
        self.load_compiled(context, stem, &self.why_nvrtc())
    }

    fn load_compiled(
        &self,
        context: &Arc<CudaContext>,
        stem: &str,
        why: &str,
    ) -> Result<Arc<CudaModule>> {
        let nvrtc = self.nvrtc(why)?;
        static NOTICE: Once = Once::new();
        NOTICE.call_once(|| {
            let (major, minor) = nvrtc.version();
            let cache = match &self.cache_dir {
                Some(dir) => format!("cached in {}", dir.display()),
                None => "not cached: set AUTOFOCUS_CACHE_DIR".into(),
            };
            eprintln!(
                "autofocus: {why}: compiling the kernels for {} with NVRTC {major}.{minor} ({}), {cache}",
                self.arch,
                nvrtc.library_name()
            );
        });
        let cubin = nvrtc.kernel_file(stem, self.arch, self.cache_dir.as_deref())?;
        load_image(context, cubin.bytes).map_err(|e| {
            Error::device(
                stem,
                format!(
                    "NVRTC's cubin of kernels/{stem}.cu for {} does not load: {e}",
                    self.arch
                ),
            )
        })
    }
}

fn load_image(
    context: &Arc<CudaContext>,
    image: Vec<u8>,
) -> std::result::Result<Arc<CudaModule>, cudarc::driver::DriverError> {
    // `Ptx::from_binary` passes the bytes to cuModuleLoadData, which takes
    // cubins and fatbins alike.
    context.load_module(cudarc::nvrtc::Ptx::from_binary(image))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatbins_need_a_driver_of_their_major_version() {
        use KernelSource::*;
        // Driver 535 (12.2), 570 (12.8), 580 (13.0), a future 13.2 and 14.0.
        assert_eq!(KernelSource::preferred(12020, 13000), Nvrtc);
        assert_eq!(KernelSource::preferred(12080, 13000), Nvrtc);
        assert_eq!(KernelSource::preferred(13000, 13000), Fatbin);
        assert_eq!(KernelSource::preferred(13000, 13020), Fatbin);
        assert_eq!(KernelSource::preferred(14000, 13000), Fatbin);
        // Built without nvcc: always NVRTC.
        assert_eq!(KernelSource::preferred(13000, 0), Nvrtc);
    }

    #[test]
    fn the_advice_names_the_wheel_of_the_driver_s_cuda() {
        assert_eq!(nvrtc_wheel(12), "nvidia-cuda-nvrtc-cu12");
        assert_eq!(nvrtc_wheel(13), "\"nvidia-cuda-nvrtc==13.*\"");
    }

    #[test]
    fn versions_read_as_the_driver_api_writes_them() {
        assert_eq!(cuda_version_text(12020), "12.2");
        assert_eq!(cuda_version_text(13000), "13.0");
        assert_eq!(cuda_version_text(12080), "12.8");
    }
}
