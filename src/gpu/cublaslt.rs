//! The dense layers' products on tensor cores, through cuBLASLt (issue #12):
//! `y = x·Wᵀ` in f32 (`CUBLAS_COMPUTE_32F`: no TF32, so f32 stays within
//! the goldens' 1e-4), from f32, f16 or bf16 operands, into an f32 buffer
//! that `kernels/linear.cu`'s epilogue turns into the layer's output (bias,
//! erf GELU, residual and layer scale, exactly as the SIMT kernel applies
//! them). Descriptors and the chosen algorithm are cached per shape.
//!
//! The library is opened at run time: `AUTOFOCUS_CUBLASLT` (a path or a
//! name), else the CUDA toolkit's (`CUDA_HOME`, `CUDA_PATH`,
//! `/usr/local/cuda`), else by soname. Once loaded by path, cudarc's own
//! `dlopen` by soname finds it. Where none loads, the SIMT GEMM is used.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::params::Ptr;
use crate::error::{Error, Result};

/// Which GEMM the dense layers use on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmChoice {
    /// cuBLASLt where it loads, else the SIMT kernel (one notice line).
    Auto,
    /// This crate's SIMT kernel (`kernels/linear.cu`).
    Simt,
    /// cuBLASLt, or an error where it cannot be used.
    CublasLt,
}

impl GemmChoice {
    /// The variable that forces a choice.
    pub const ENV: &'static str = "AUTOFOCUS_GEMM";

    /// `simt`, `cublaslt`, `auto` or nothing (`auto`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the value and the choices.
    pub fn parse(value: Option<&str>) -> Result<Self> {
        match value.map(str::trim) {
            None | Some("" | "auto") => Ok(Self::Auto),
            Some("simt") => Ok(Self::Simt),
            Some("cublaslt") => Ok(Self::CublasLt),
            Some(other) => Err(Error::InvalidArgument(format!(
                "{}={other}: expected simt, cublaslt or auto",
                Self::ENV
            ))),
        }
    }

    /// The choice `AUTOFOCUS_GEMM` makes.
    ///
    /// # Errors
    /// As [`GemmChoice::parse`].
    pub fn from_env() -> Result<Self> {
        Self::parse(std::env::var(Self::ENV).ok().as_deref())
    }
}

/// The element types of the operands (`Element::SUFFIX`).
fn data_type(suffix: &str) -> Result<sys::cudaDataType> {
    match suffix {
        "f32" => Ok(sys::cudaDataType_t::CUDA_R_32F),
        "f16" => Ok(sys::cudaDataType_t::CUDA_R_16F),
        "bf16" => Ok(sys::cudaDataType_t::CUDA_R_16BF),
        other => Err(Error::InvalidArgument(format!(
            "cuBLASLt: no element type {other}"
        ))),
    }
}

/// The library files tried, in order: `explicit` alone when given.
fn library_candidates(explicit: Option<String>) -> Vec<String> {
    if let Some(explicit) = explicit {
        return vec![explicit];
    }
    let names = ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"];
    let mut roots: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .collect();
    roots.push(PathBuf::from("/usr/local/cuda"));
    let mut candidates: Vec<String> = roots
        .iter()
        .flat_map(|root| {
            names
                .iter()
                .map(move |name| root.join("lib64").join(name).display().to_string())
        })
        .collect();
    candidates.extend(names.iter().map(|name| (*name).to_string()));
    candidates
}

/// Opens cuBLASLt once per process, keeping it loaded; the name it was
/// found by, or every name tried.
fn load_library() -> std::result::Result<&'static str, String> {
    static LOADED: OnceLock<std::result::Result<(libloading::Library, String), String>> =
        OnceLock::new();
    let loaded = LOADED.get_or_init(|| {
        let explicit = std::env::var("AUTOFOCUS_CUBLASLT")
            .ok()
            .filter(|v| !v.is_empty());
        let candidates = library_candidates(explicit);
        for name in &candidates {
            // SAFETY: loading cuBLASLt runs no initialiser with preconditions.
            if let Ok(library) = unsafe { libloading::Library::new(name) } {
                return Ok((library, name.clone()));
            }
        }
        Err(format!(
            "no cuBLASLt found (tried {})",
            candidates.join(", ")
        ))
    });
    match loaded {
        Ok((_, name)) if cudarc_finds_it() => Ok(name),
        Ok((_, name)) => Err(format!(
            "{name} loaded, but cudarc cannot open cuBLASLt by soname"
        )),
        Err(e) => Err(e.clone()),
    }
}

/// Whether cudarc's own loader finds cuBLASLt (a missing library would
/// panic at its first call). Beside candle's `cuda` feature cudarc links
/// the library instead, which is then always there.
fn cudarc_finds_it() -> bool {
    #[cfg(not(feature = "candle-cuda"))]
    // SAFETY: a probe that only opens libraries.
    return unsafe { sys::is_culib_present() };
    #[cfg(feature = "candle-cuda")]
    true
}

/// A cuBLASLt handle on one stream, with its workspace and cached plans.
pub struct CublasLt {
    handle: sys::cublasLtHandle_t,
    stream: Arc<CudaStream>,
    workspace: CudaSlice<u8>,
    workspace_addr: Ptr,
    /// Held through each product: one stream orders them anyway. `None`
    /// for a shape no algorithm takes (the SIMT kernel runs it).
    plans: Mutex<HashMap<PlanKey, Option<Plan>>>,
    library: &'static str,
    /// `AUTOFOCUS_GEMM=cublaslt`: a product cuBLASLt cannot plan is an
    /// error, not a notice and the SIMT kernel.
    forced: bool,
}

// SAFETY: the handle is used only through `&self` methods that order their
// work on the one stream; cuBLASLt handles may be shared between threads.
unsafe impl Send for CublasLt {}
// SAFETY: as above.
unsafe impl Sync for CublasLt {}

impl std::fmt::Debug for CublasLt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CublasLt({})", self.library)
    }
}

impl CublasLt {
    /// cuBLASLt on `stream`; `forced` when the user asked for it.
    ///
    /// # Errors
    /// [`Error::Unsupported`] saying why it cannot be used (no library, a
    /// library the driver cannot run, no memory for the workspace).
    pub fn new(stream: Arc<CudaStream>, forced: bool) -> Result<Self> {
        let unsupported = |what: String| Error::Unsupported(format!("cuBLASLt: {what}"));
        let library = load_library().map_err(unsupported)?;
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| unsupported(format!("cannot bind the context: {e}")))?;
        let handle = lt::create_handle()
            .map_err(|e| unsupported(format!("{library}: cannot start: {e}")))?;
        // NVIDIA's advice: 32 MiB on Hopper and newer, 4 MiB before.
        let major = stream
            .context()
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
            )
            .unwrap_or(8);
        let bytes = if major >= 9 { 32 << 20 } else { 4 << 20 };
        let workspace = match stream.alloc_zeros::<u8>(bytes) {
            Ok(workspace) => workspace,
            Err(e) => {
                // SAFETY: created above, used by nothing yet.
                let _ = unsafe { lt::destroy_handle(handle) };
                return Err(unsupported(format!("no memory for the workspace: {e}")));
            }
        };
        let workspace_addr = workspace.device_ptr(&stream).0;
        Ok(Self {
            handle,
            stream,
            workspace,
            workspace_addr,
            plans: Mutex::default(),
            library,
            forced,
        })
    }

    /// The library in use, for notices and reports.
    pub fn library(&self) -> &str {
        self.library
    }

    /// Makes the stream's context this thread's, as cuBLASLt's calls expect.
    fn bind(&self) -> Result<()> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| Error::device("cublaslt", e))
    }

    /// `y = x·Wᵀ` with `x` rows × k and `w` n × k (row-major, element type
    /// `suffix`), into `y`, f32 rows × n. `Ok(false)`, with nothing
    /// launched, where cuBLASLt has no algorithm for this shape and these
    /// addresses' alignment: the caller runs the SIMT kernel instead.
    ///
    /// # Safety
    /// The three addresses must hold those many elements on this stream's
    /// device, and stay allocated until the stream has run the product.
    pub unsafe fn product(
        &self,
        suffix: &str,
        x: Ptr,
        w: Ptr,
        y: Ptr,
        (rows, k, n): (usize, usize, usize),
    ) -> Result<bool> {
        let mut plans = self
            .plans
            .lock()
            .map_err(|_| Error::device("cublaslt", "plan cache lock poisoned"))?;
        let key = PlanKey {
            suffix: suffix.to_string(),
            rows,
            k,
            n,
            alignment: alignment(&[x, w, y]),
        };
        let plan = match plans.entry(key) {
            Entry::Occupied(plan) => plan.into_mut(),
            Entry::Vacant(slot) => {
                self.bind()?;
                let plan = match Plan::new(self.handle, slot.key(), self.workspace.len()) {
                    Ok(plan) => plan,
                    Err(e) if self.forced => return Err(e),
                    Err(e) => {
                        eprintln!("autofocus: {e}; the SIMT GEMM runs {rows}×{k}→{n} ({suffix})");
                        None
                    }
                };
                slot.insert(plan)
            }
        };
        let Some(plan) = plan else {
            return Ok(false);
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let failed = |e: lt::CublasError| Error::device("cublaslt matmul", e);
        self.bind()?;
        // Column-major view of the row-major operands: yᵀ (n × rows) =
        // (W as k × n)ᵀ · (x as k × rows); C is y with β = 0.
        // SAFETY: the plan describes exactly these shapes; the caller
        // vouches for the memory; the workspace is this handle's.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc.0,
                (&raw const alpha).cast::<c_void>(),
                (&raw const beta).cast::<c_void>(),
                w as *const c_void,
                plan.w.0,
                x as *const c_void,
                plan.x.0,
                y as *const c_void,
                plan.y.0,
                y as *mut c_void,
                plan.y.0,
                &raw const plan.algo,
                self.workspace_addr as *mut c_void,
                self.workspace.len(),
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(failed)?;
        Ok(true)
    }
}

impl Drop for CublasLt {
    fn drop(&mut self) {
        // Plans first (they hold descriptors of this handle), then the handle,
        // whose destruction waits for the device: in the stream's context.
        if let Ok(mut plans) = self.plans.lock() {
            plans.clear();
        }
        let _ = self.bind();
        // SAFETY: created in `new`, destroyed once; nothing uses it after.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PlanKey {
    suffix: String,
    rows: usize,
    k: usize,
    n: usize,
    /// Bytes every operand's address is a multiple of (at most 256): the
    /// heuristic otherwise assumes 256 and may pick kernels that need it.
    alignment: u32,
}

/// The largest power of two, at most 256, that divides every address.
fn alignment(addresses: &[Ptr]) -> u32 {
    let zeros = addresses
        .iter()
        .map(|a| a.trailing_zeros())
        .min()
        .unwrap_or(8);
    1 << zeros.min(8)
}

struct MatmulDesc(sys::cublasLtMatmulDesc_t);
struct MatrixLayout(sys::cublasLtMatrixLayout_t);
struct Preference(sys::cublasLtMatmulPreference_t);

impl Drop for MatmulDesc {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}

impl Drop for MatrixLayout {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

impl Drop for Preference {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

/// One shape's descriptors (W as A, transposed; x as B; y as C and D) and
/// the algorithm the heuristic chose for them, made on first use.
struct Plan {
    desc: MatmulDesc,
    w: MatrixLayout,
    x: MatrixLayout,
    y: MatrixLayout,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Plan {
    /// The plan of `key`'s product, or `None` where the heuristic finds no
    /// algorithm for it (the SIMT kernel runs it). Any other failure is an
    /// error, never a silent fallback: with `AUTOFOCUS_GEMM=cublaslt` (as
    /// the device check runs) it fails the product, so that a check cannot
    /// pass on the SIMT kernel's results; otherwise it is said once.
    fn new(handle: sys::cublasLtHandle_t, key: &PlanKey, workspace: usize) -> Result<Option<Self>> {
        let failed = |e: lt::CublasError| {
            Error::device(
                "cublaslt plan",
                format!(
                    "{e} ({}=simt runs the dense layers without it)",
                    GemmChoice::ENV
                ),
            )
        };
        let too_big = |what: &str| Error::device("cublaslt plan", format!("{what} too large"));
        let operands = data_type(&key.suffix)?;
        let (rows, k, n) = (key.rows as u64, key.k as u64, key.n as u64);
        let ld = |v: usize| i64::try_from(v).map_err(|_| too_big("leading dimension"));
        // f32 compute, f32 scale: exact f32 products, no TF32.
        let desc = MatmulDesc(
            lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType_t::CUDA_R_32F,
            )
            .map_err(failed)?,
        );
        // cublasOperation_t: 1 is CUBLAS_OP_T (A = W, read transposed).
        let transpose: i32 = 1;
        // SAFETY: a live descriptor and a value of the attribute's type.
        unsafe {
            lt::set_matmul_desc_attribute(
                desc.0,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&raw const transpose).cast::<c_void>(),
                size_of::<i32>(),
            )
        }
        .map_err(failed)?;
        let w = MatrixLayout(lt::create_matrix_layout(operands, k, n, ld(key.k)?).map_err(failed)?);
        let x =
            MatrixLayout(lt::create_matrix_layout(operands, k, rows, ld(key.k)?).map_err(failed)?);
        let y = MatrixLayout(
            lt::create_matrix_layout(sys::cudaDataType_t::CUDA_R_32F, n, rows, ld(key.n)?)
                .map_err(failed)?,
        );
        let pref = Preference(lt::create_matmul_pref().map_err(failed)?);
        // SAFETY: a live preference and a value of the attribute's type.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&raw const workspace).cast::<c_void>(),
                size_of::<usize>(),
            )
        }
        .map_err(failed)?;
        use sys::cublasLtMatmulPreferenceAttributes_t as Pref;
        for attribute in [
            Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
            Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
            Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
        ] {
            // SAFETY: a live preference and a u32, the attribute's type.
            unsafe {
                lt::set_matmul_pref_attribute(
                    pref.0,
                    attribute,
                    (&raw const key.alignment).cast::<c_void>(),
                    size_of::<u32>(),
                )
            }
            .map_err(failed)?;
        }
        // SAFETY: every descriptor is live and describes this product.
        let heuristic =
            unsafe { lt::get_matmul_algo_heuristic(handle, desc.0, w.0, x.0, y.0, y.0, pref.0) };
        let heuristic = match heuristic {
            Ok(heuristic) => heuristic,
            // cudarc's answer when the heuristic returns no algorithm.
            Err(lt::CublasError(sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED)) => {
                return Ok(None);
            }
            Err(e) => return Err(failed(e)),
        };
        Ok(Some(Self {
            desc,
            w,
            x,
            y,
            algo: heuristic.algo,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_choice_is_parsed_or_refused_by_name() {
        assert_eq!(GemmChoice::parse(None).unwrap(), GemmChoice::Auto);
        assert_eq!(GemmChoice::parse(Some("")).unwrap(), GemmChoice::Auto);
        assert_eq!(GemmChoice::parse(Some("simt")).unwrap(), GemmChoice::Simt);
        assert_eq!(
            GemmChoice::parse(Some(" cublaslt ")).unwrap(),
            GemmChoice::CublasLt
        );
        let e = GemmChoice::parse(Some("cublas")).unwrap_err().to_string();
        assert!(
            e.contains("AUTOFOCUS_GEMM=cublas") && e.contains("simt"),
            "{e}"
        );
    }

    #[test]
    fn an_explicit_library_is_the_only_candidate() {
        assert_eq!(
            library_candidates(Some("/opt/x/libcublasLt.so.13".into())),
            ["/opt/x/libcublasLt.so.13"]
        );
        let found = library_candidates(None);
        assert!(found.contains(&"/usr/local/cuda/lib64/libcublasLt.so.13".to_string()));
        assert_eq!(found.last().map(String::as_str), Some("libcublasLt.so"));
    }

    #[test]
    fn alignment_is_the_weakest_operands() {
        assert_eq!(alignment(&[0x1000, 0x2000]), 256);
        assert_eq!(alignment(&[0x1000, 0x2010, 0x3000]), 16);
        assert_eq!(alignment(&[0x1002]), 2);
    }

    #[test]
    fn element_types_map_to_cuda_types() {
        assert_eq!(data_type("bf16").unwrap(), sys::cudaDataType_t::CUDA_R_16BF);
        assert!(data_type("i8").is_err());
    }
}
