//! The GPU backend: cudarc's driver API with the library loaded at run time,
//! each kernel file's module loaded on first use and kept (from the embedded
//! fatbin or NVRTC's cubin, [`super::loader`]), functions cached by name.
//! One created stream per device (not the legacy default stream): launches
//! and copies are ordered on it; a second one, made on first use, carries
//! the copies that overlap the kernels ([`super::transfer`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr,
    PinnedHostSlice, PushKernelArg,
};

use super::LaunchConfig;
use super::cublaslt::{CublasLt, GemmChoice};
use super::generated::KERNELS;
use super::loader::{KernelLoader, KernelSource};
use super::nvrtc::Arch;
use super::params::{KernelParams, Ptr};
use crate::error::{Error, Result};

pub struct CudaBackend {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    loader: KernelLoader,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    /// cuBLASLt on this stream, or why not (decided on first use).
    cublaslt: OnceLock<std::result::Result<Option<CublasLt>, String>>,
    /// A second stream for copies that overlap the kernels (created on
    /// first use; [`super::transfer`]).
    transfers: OnceLock<Arc<CudaStream>>,
}

/// Device memory with its address taken once. (No event tracking: the
/// kernels' stream orders its own work, and the transfer stream is ordered
/// against it by explicit events, [`super::transfer`].)
pub struct DeviceSlice {
    slice: CudaSlice<u8>,
    addr: Ptr,
}

impl DeviceSlice {
    pub fn addr(&self) -> Ptr {
        self.addr
    }

    /// Bytes allocated.
    pub fn bytes(&self) -> usize {
        self.slice.len()
    }

    /// The memory as `len` elements of `T` (at most what was allocated),
    /// freed on its stream when dropped, as before.
    pub fn into_typed<T>(self, len: usize) -> CudaSlice<T> {
        debug_assert!(len * size_of::<T>() <= self.slice.len());
        let stream = Arc::clone(self.slice.stream());
        let ptr = self.slice.leak();
        // SAFETY: `ptr` is the allocation just leaked, of at least `len`
        // elements of `T`, and nothing else owns it any more.
        unsafe { stream.upgrade_device_ptr(ptr, len) }
    }
}

/// Fails unless the machine has a CUDA driver. (Kernels come from the
/// fatbins or, without them, from NVRTC: [`KernelLoader::new`] checks.)
fn check_available() -> Result<()> {
    if !driver_present() {
        return Err(Error::Unsupported(
            "--device cuda: no CUDA driver on this machine (libcuda not found)".into(),
        ));
    }
    Ok(())
}

/// Whether the CUDA driver library can be opened. (cudarc's own probe
/// exists only when cudarc loads the driver at run time, not when another
/// crate, such as candle with its `cuda` feature, links it.)
fn driver_present() -> bool {
    const NAMES: &[&str] = &["libcuda.so.1", "libcuda.so", "nvcuda.dll"];
    NAMES.iter().any(|name| {
        // SAFETY: opening the driver library runs no initialiser that
        // expects anything of this process.
        unsafe { libloading::Library::new(*name) }.is_ok()
    })
}

/// How many GPUs the driver sees.
pub fn device_count() -> Result<usize> {
    check_available()?;
    let count = CudaContext::device_count()
        .map_err(|e| Error::Unsupported(format!("--device cuda: cannot count the GPUs: {e}")))?;
    Ok(usize::try_from(count).unwrap_or(0))
}

/// Makes the device's default memory pool keep what is freed for later
/// allocations instead of handing it back to the driver at every
/// synchronisation (its release threshold is 0 by default): a forward
/// run as launches frees and allocates dozens of buffers, and a stream of
/// batches synchronises once per batch. Set where this crate opens the
/// GPU; the pool is the device's, so anyone else allocating on it in
/// stream order (candle, in the same process) keeps its freed memory too.
/// Best effort: a GPU without memory pools allocates as before.
fn keep_freed_memory(context: &CudaContext) {
    use cudarc::driver::sys;
    if !context.has_async_alloc() {
        return;
    }
    let mut pool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: valid out-pointer and device; the attribute's value is a u64.
    unsafe {
        if sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device())
            == sys::CUresult::CUDA_SUCCESS
        {
            let _ = sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&raw mut threshold).cast(),
            );
        }
    }
}

impl CudaBackend {
    pub fn new(ordinal: usize) -> Result<Self> {
        check_available()?;
        let context = CudaContext::new(ordinal).map_err(|e| {
            Error::Unsupported(format!("--device cuda: cannot open GPU {ordinal}: {e}"))
        })?;
        // A created stream, not the legacy default one (which synchronises
        // with every other stream and cannot be captured in a graph). All of
        // this backend's work is ordered on it, so cudarc's per-slice events
        // are not needed: tracking is off for this context handle.
        // SAFETY: every slice of this handle is allocated, used and freed on
        // this one stream.
        unsafe { context.disable_event_tracking() };
        keep_freed_memory(&context);
        let stream = context.new_stream().map_err(|e| {
            Error::Unsupported(format!(
                "--device cuda: cannot create a stream on GPU {ordinal}: {e}"
            ))
        })?;
        Self::on_stream(stream)
    }

    /// A backend that launches on `stream` (someone else's, such as
    /// candle's), loading the kernels into the stream's context. The
    /// context's event tracking is left as its owner set it.
    pub fn on_stream(stream: Arc<CudaStream>) -> Result<Self> {
        check_available()?;
        let context = Arc::clone(stream.context());
        let unsupported = |what: &str, e: cudarc::driver::DriverError| {
            Error::Unsupported(format!("--device cuda: cannot read the {what}: {e}"))
        };
        let mut driver_version = 0;
        // SAFETY: one valid out-pointer; the driver is loaded (context above).
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) }
            .result()
            .map_err(|e| unsupported("driver version", e))?;
        let (major, minor) = context
            .compute_capability()
            .map_err(|e| unsupported("compute capability", e))?;
        let arch = Arch {
            major: major as u32,
            minor: minor as u32,
        };
        let loader = KernelLoader::new(driver_version as u32, arch)?;
        Ok(Self {
            context,
            stream,
            loader,
            modules: Mutex::default(),
            functions: Mutex::default(),
            cublaslt: OnceLock::new(),
            transfers: OnceLock::new(),
        })
    }

    /// `cuda:N (GPU name; fatbin kernels)`, or `NVRTC kernels`.
    pub fn name(&self) -> String {
        let ordinal = self.context.ordinal();
        let kernels = match self.loader.source() {
            KernelSource::Fatbin => "fatbin kernels",
            KernelSource::Nvrtc => "NVRTC kernels",
        };
        match self.context.name() {
            Ok(name) => format!("cuda:{ordinal} ({name}; {kernels})"),
            Err(_) => format!("cuda:{ordinal} ({kernels})"),
        }
    }

    /// cuBLASLt for the dense layers, as `AUTOFOCUS_GEMM` asks: `None`
    /// for the SIMT kernel (asked for, or cuBLASLt unusable under `auto`,
    /// which is said once on stderr).
    pub fn cublaslt(&self) -> Result<Option<&CublasLt>> {
        let decided = self.cublaslt.get_or_init(|| {
            let choice = GemmChoice::from_env().map_err(|e| e.to_string())?;
            match choice {
                GemmChoice::Simt => Ok(None),
                GemmChoice::CublasLt => CublasLt::new(Arc::clone(&self.stream), true)
                    .map(Some)
                    .map_err(|e| format!("{}=cublaslt, but {e}", GemmChoice::ENV)),
                GemmChoice::Auto => match CublasLt::new(Arc::clone(&self.stream), false) {
                    Ok(lt) => Ok(Some(lt)),
                    Err(e) => {
                        eprintln!("autofocus: {e}; the dense layers use the SIMT GEMM");
                        Ok(None)
                    }
                },
            }
        });
        match decided {
            Ok(lt) => Ok(lt.as_ref()),
            Err(e) => Err(Error::Unsupported(e.clone())),
        }
    }

    pub fn upload(&self, bytes: &[u8]) -> Result<DeviceSlice> {
        let slice = if bytes.is_empty() {
            self.stream.alloc_zeros::<u8>(4)
        } else {
            self.stream.clone_htod(bytes)
        }
        .map_err(|e| Error::device("upload", e))?;
        Ok(self.wrap(slice))
    }

    pub fn zeros(&self, bytes: usize) -> Result<DeviceSlice> {
        let slice = self
            .stream
            .alloc_zeros::<u8>(bytes.max(4))
            .map_err(|e| Error::device("alloc", e))?;
        Ok(self.wrap(slice))
    }

    /// Runs `record` with the stream capturing, and returns what it
    /// launched as a graph (nothing runs until the graph is launched). The
    /// capture ends whatever `record` does (an error, a panic, a call the
    /// capture refused), so the stream is usable after it.
    pub fn capture(&self, record: impl FnOnce() -> Result<()>) -> Result<super::Graph> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        // Without stream-ordered allocation, cudarc allocates and frees
        // with calls that synchronise, which a capture cannot hold.
        if !self.context.has_async_alloc() {
            return Err(Error::device(
                "graph capture",
                "this GPU or driver has no stream-ordered allocation",
            ));
        }
        // Relaxed: this thread may still make calls that are not stream
        // work (a context bind, a cuBLASLt descriptor) while capturing.
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| Error::device("graph capture", e))?;
        let recorded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(record));
        // Errors of calls inside the capture that cudarc kept for later
        // (a free in an invalidated capture): they belong to this capture,
        // and left there, they would make cudarc's end_capture return
        // before it ends the capture.
        let deferred = self.context.check_err();
        let ended = self.stream.end_capture(CUgraphInstantiate_flags(0));
        // Asked of the driver directly (not through cudarc's capture_status,
        // which would first return and clear an error end_capture left).
        if self.is_capturing() {
            // SAFETY: the stream is this backend's own and is capturing;
            // the graph it returns is destroyed at once.
            if let Ok(graph) =
                unsafe { cudarc::driver::result::stream::end_capture(self.stream.cu_stream()) }
                && !graph.is_null()
            {
                // SAFETY: a graph from the capture just ended, used by nothing.
                let _ = unsafe { cudarc::driver::result::graph::destroy(graph) };
            }
        }
        let recorded = match recorded {
            Ok(recorded) => recorded,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        recorded?;
        deferred.map_err(|e| Error::device("graph capture", e))?;
        match ended.map_err(|e| Error::device("graph capture", e))? {
            Some(graph) => Ok(super::Graph(graph)),
            None => Err(Error::device("graph capture", "nothing was captured")),
        }
    }

    /// True while the stream is being captured into a graph, by this
    /// backend or by the stream's owner (candle captures its stream too).
    /// A query that fails (candle's per-thread stream on a thread with no
    /// current context) says no: the call it guards binds the context and
    /// reports its own errors.
    pub fn is_capturing(&self) -> bool {
        use cudarc::driver::sys::CUstreamCaptureStatus as Status;
        // SAFETY: the stream is alive (held by this backend).
        matches!(
            unsafe { cudarc::driver::result::stream::is_capturing(self.stream.cu_stream()) },
            Ok(Status::CU_STREAM_CAPTURE_STATUS_ACTIVE
                | Status::CU_STREAM_CAPTURE_STATUS_INVALIDATED)
        )
    }

    /// Launches `graph` on the stream.
    pub fn launch_graph(&self, graph: &super::Graph) -> Result<()> {
        graph
            .0
            .launch()
            .map_err(|e| Error::device("graph launch", e))
    }

    /// Writes `bytes` into `slice`, host to device.
    pub fn upload_into(&self, slice: &mut DeviceSlice, bytes: &[u8]) -> Result<()> {
        self.stream
            .memcpy_htod(bytes, &mut slice.slice)
            .map_err(|e| Error::device("upload", e))
    }

    /// Zeroes `slice` on the stream.
    pub fn fill_zeros(&self, slice: &mut DeviceSlice) -> Result<()> {
        self.stream
            .memset_zeros(&mut slice.slice)
            .map_err(|e| Error::device("memset", e))
    }

    /// A copy of `slice`, device to device on the stream.
    pub fn copy(&self, slice: &DeviceSlice) -> Result<DeviceSlice> {
        let copy = self
            .stream
            .clone_dtod(&slice.slice)
            .map_err(|e| Error::device("copy", e))?;
        Ok(self.wrap(copy))
    }

    /// Memory for a kernel to fill, not initialised.
    pub fn alloc(&self, bytes: usize) -> Result<DeviceSlice> {
        // SAFETY: bytes have no invalid values; the callers' kernels write
        // the buffer before anything reads it (the emulator poisons such
        // buffers in the tests to show it).
        let slice = unsafe { self.stream.alloc::<u8>(bytes.max(4)) }
            .map_err(|e| Error::device("alloc", e))?;
        Ok(self.wrap(slice))
    }

    fn wrap(&self, slice: CudaSlice<u8>) -> DeviceSlice {
        let addr = {
            let (addr, _sync) = slice.device_ptr(&self.stream);
            addr
        };
        DeviceSlice { slice, addr }
    }

    pub fn download(&self, slice: &DeviceSlice) -> Result<Vec<u8>> {
        // Into pageable memory: the driver returns once the copy is done
        // (CUDA's "API synchronization behavior"), which cudarc relies on.
        self.stream
            .clone_dtoh(&slice.slice)
            .map_err(|e| Error::device("download", e))
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| Error::device("synchronize", e))
    }

    /// The transfer stream, created on first use.
    fn transfers(&self) -> Result<&Arc<CudaStream>> {
        if let Some(stream) = self.transfers.get() {
            return Ok(stream);
        }
        let stream = self
            .context
            .new_stream()
            .map_err(|e| Error::device("transfer stream", e))?;
        Ok(self.transfers.get_or_init(|| stream))
    }

    /// `bytes` of page-locked host memory, zeroed: write-combined for
    /// uploads (the host only writes it; reads from it are slow), cached
    /// for read-backs.
    pub fn pinned(&self, bytes: usize, for_upload: bool) -> Result<PinnedHostSlice<u8>> {
        let flags = if for_upload {
            cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED
        } else {
            0
        };
        // SAFETY: the memory is zeroed below, through a raw pointer, before
        // any reference to it exists.
        let mut pinned = unsafe { self.context.alloc_pinned_with_flags::<u8>(bytes, flags) }
            .map_err(|e| Error::device("pinned alloc", e))?;
        let ptr = pinned
            .as_mut_ptr()
            .map_err(|e| Error::device("pinned alloc", e))?;
        // SAFETY: `ptr` holds `bytes` bytes, just allocated.
        unsafe { std::ptr::write_bytes(ptr, 0, bytes) };
        Ok(pinned)
    }

    /// Copies `src` into `dst` on the transfer stream, and returns an event
    /// that marks the copy's end. (With event tracking off, cudarc's own
    /// event in `src` is never recorded: the caller waits for this one
    /// before the host touches `src` again.)
    pub fn upload_async(
        &self,
        src: &PinnedHostSlice<u8>,
        dst: &mut DeviceSlice,
    ) -> Result<CudaEvent> {
        same_bytes("upload", src.len(), dst.bytes())?;
        let transfers = self.transfers()?;
        transfers
            .memcpy_htod(src, &mut dst.slice)
            .map_err(|e| Error::device("upload", e))?;
        transfers
            .record_event(None)
            .map_err(|e| Error::device("upload", e))
    }

    /// Copies `src` into `dst` on the transfer stream once the work
    /// `after` marks has finished, and returns an event that marks the
    /// copy's end (for the host to wait for before it reads `dst`).
    pub fn download_async(
        &self,
        src: &DeviceSlice,
        dst: &mut PinnedHostSlice<u8>,
        after: &CudaEvent,
    ) -> Result<CudaEvent> {
        same_bytes("download", src.bytes(), dst.len())?;
        let transfers = self.transfers()?;
        transfers
            .wait(after)
            .map_err(|e| Error::device("download", e))?;
        transfers
            .memcpy_dtoh(&src.slice, dst)
            .map_err(|e| Error::device("download", e))?;
        transfers
            .record_event(None)
            .map_err(|e| Error::device("download", e))
    }

    /// An event marking the work queued on the kernels' stream so far.
    pub fn mark(&self) -> Result<CudaEvent> {
        self.stream
            .record_event(None)
            .map_err(|e| Error::device("event", e))
    }

    /// Makes the kernels' stream wait for the work `event` marks.
    pub fn wait_for(&self, event: &CudaEvent) -> Result<()> {
        self.stream
            .wait(event)
            .map_err(|e| Error::device("event wait", e))
    }

    /// Copies `src` into `dst`, device to device on the kernels' stream.
    pub fn copy_into(&self, dst: &mut DeviceSlice, src: &DeviceSlice) -> Result<()> {
        same_bytes("copy", src.bytes(), dst.bytes())?;
        self.stream
            .memcpy_dtod(&src.slice, &mut dst.slice)
            .map_err(|e| Error::device("copy", e))
    }

    /// Waits for every copy on the transfer stream.
    pub fn synchronize_transfers(&self) -> Result<()> {
        match self.transfers.get() {
            Some(stream) => stream
                .synchronize()
                .map_err(|e| Error::device("synchronize", e)),
            None => Ok(()),
        }
    }

    fn function(&self, name: &str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().unwrap().get(name) {
            return Ok(f.clone());
        }
        let stem = KERNELS
            .iter()
            .find(|(kernel, _)| *kernel == name)
            .map(|(_, stem)| *stem)
            .ok_or_else(|| Error::device(name, "no such kernel"))?;
        let module = {
            let mut modules = self.modules.lock().unwrap();
            match modules.get(stem) {
                Some(module) => module.clone(),
                None => {
                    let module = self.loader.load(&self.context, stem)?;
                    modules.insert(stem, module.clone());
                    module
                }
            }
        };
        let function = module
            .load_function(name)
            .map_err(|e| Error::device(name, e))?;
        self.functions
            .lock()
            .unwrap()
            .insert(name.to_string(), function.clone());
        Ok(function)
    }

    /// # Safety
    /// As [`super::Device::launch`].
    pub unsafe fn launch<P: KernelParams>(
        &self,
        name: &str,
        config: LaunchConfig,
        params: &P,
    ) -> Result<()> {
        let function = self.function(name)?;
        let mut builder = self.stream.launch_builder(&function);
        builder.arg(params);
        let config = cudarc::driver::LaunchConfig {
            grid_dim: config.grid.into(),
            block_dim: config.block.into(),
            shared_mem_bytes: config.shared_bytes,
        };
        // SAFETY: the caller's contract; `P` is laid out as the kernel's parameter.
        unsafe { builder.launch(config) }.map_err(|e| Error::device(name, e))?;
        Ok(())
    }
}

/// An error unless a copy's two sides are as long (cudarc would panic).
fn same_bytes(op: &str, src: usize, dst: usize) -> Result<()> {
    if src == dst {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "{op}: {src} bytes into a buffer of {dst}"
    )))
}
