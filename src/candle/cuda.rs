//! The custom ops' CUDA half (feature `candle-cuda`): candle's CUDA tensors
//! are viewed in place as this crate's device buffers, each layout is
//! uploaded once per GPU and batch (and waited for, so that other threads'
//! streams may use it), and this crate's kernels run on
//! candle's stream, in candle's context. Results go back to candle as
//! tensors that own their memory (no copy).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda::{CudaDType, DeviceId};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape, Storage, Tensor, bail};
use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::layout::SlotLayout;
use crate::gpu::{self, Buffer, Element};
use crate::ops::neighbourhood::gpu::{DeviceInverse, DeviceNeighbourhood};

/// A crate error as candle's.
pub(crate) fn wrap_err(e: crate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// This crate's device on candle's GPU `dev`: the same stream and context,
/// kernels loaded once per candle device.
pub(crate) fn device_for(dev: &CudaDevice) -> Result<gpu::Device> {
    static DEVICES: OnceLock<Mutex<HashMap<DeviceId, gpu::Device>>> = OnceLock::new();
    let mut devices = DEVICES
        .get_or_init(Mutex::default)
        .lock()
        .map_err(|_| candle_core::Error::msg("autofocus: device cache lock poisoned"))?;
    if let Some(device) = devices.get(&dev.id()) {
        return Ok(device.clone());
    }
    let device = gpu::Device::cuda_on_stream(dev.cuda_stream()).map_err(wrap_err)?;
    devices.insert(dev.id(), device.clone());
    Ok(device)
}

/// A contiguous candle tensor's storage: its first element's address and
/// its element count. `what` names the input in errors.
pub(crate) fn address<T: CudaDType>(
    op: &str,
    what: &str,
    storage: &CudaStorage,
    layout: &Layout,
) -> Result<(gpu::params::Ptr, usize)> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op}: `{what}` must be contiguous (call `.contiguous()`)")
    };
    let slice = storage.as_cuda_slice::<T>()?;
    let stream = storage.device().cuda_stream();
    // With cudarc's event tracking on, the stream first waits for the
    // tensor's last write (from any stream). The read is recorded by
    // `read_done`, once the kernels that read it are launched.
    let (base, _guard) = slice.device_ptr(&stream);
    Ok((base + (start * size_of::<T>()) as u64, end - start))
}

/// Records on candle's stream that the kernels launched so far read
/// `storage`, as cudarc's own launches do: with event tracking on (a device
/// from candle's `new_cuda_with_stream`), a write to the tensor from
/// another stream then waits for them. Without tracking, nothing.
pub(crate) fn read_done<T: CudaDType>(storage: &CudaStorage) -> Result<()> {
    let slice = storage.as_cuda_slice::<T>()?;
    let stream = storage.device().cuda_stream();
    drop(slice.device_ptr(&stream));
    Ok(())
}

/// `len` elements of `T` from element `offset` of what `address` gave, as a
/// buffer the kernels can take.
///
/// # Safety
/// The tensor `at` came from must outlive every kernel launched with the
/// view, and `offset + len` must not pass its end.
pub(crate) unsafe fn view<T: Element>(
    device: &gpu::Device,
    at: (gpu::params::Ptr, usize),
    offset: usize,
    len: usize,
) -> Result<Buffer<T>> {
    debug_assert!(offset + len <= at.1);
    let addr = at.0 + (offset * size_of::<T>()) as u64;
    // SAFETY: the caller's contract.
    unsafe { Buffer::borrowed_cuda(device, addr, len) }.map_err(wrap_err)
}

/// A result buffer of this crate's device as candle's storage on `dev`,
/// once the kernels that write it are launched.
pub(crate) fn storage_of<T: Element + CudaDType>(
    buffer: Buffer<T>,
    dev: &CudaDevice,
) -> Result<CudaStorage> {
    let mut slice = buffer.into_cuda_slice().map_err(wrap_err)?;
    // The slice's events are new: its write is recorded now, after the
    // kernels that wrote it, so that with event tracking on a read from
    // another stream waits for them (without tracking, nothing).
    let stream = Arc::clone(slice.stream());
    drop(slice.device_ptr_mut(&stream));
    Ok(CudaStorage::wrap_cuda_slice(slice, dev.clone()))
}

/// A result buffer as a candle tensor of `shape` (for the backwards, which
/// return tensors).
pub(crate) fn tensor_of<T: Element + CudaDType>(
    buffer: Buffer<T>,
    dev: &CudaDevice,
    shape: impl Into<Shape>,
) -> Result<Tensor> {
    let storage = Storage::Cuda(storage_of(buffer, dev)?);
    Ok(Tensor::from_storage(
        storage,
        shape,
        BackpropOp::none(),
        false,
    ))
}

/// A candle tensor on a GPU: its storage (read-locked) and layout.
pub(crate) fn cuda_storage<'a>(
    op: &str,
    what: &str,
    t: &'a Tensor,
) -> Result<(impl std::ops::Deref<Target = Storage> + 'a, &'a Layout)> {
    let (storage, layout) = t.storage_and_layout();
    if !matches!(&*storage, Storage::Cuda(_)) {
        bail!("{op}: `{what}` is not on the GPU the other inputs are on");
    }
    Ok((storage, layout))
}

/// The CUDA half of a [`Storage`] that [`cuda_storage`] checked.
pub(crate) fn as_cuda(storage: &Storage) -> &CudaStorage {
    match storage {
        Storage::Cuda(s) => s,
        _ => unreachable!("checked by cuda_storage"),
    }
}

/// A stage layout on one GPU, for one batch size: the neighbourhood, the
/// positions (repeated for the batch when the layout is shared), and the
/// inverse lists, uploaded by the first backward.
pub(crate) struct GpuSlots {
    pub nbhd: DeviceNeighbourhood,
    pub pos: Buffer<f32>,
    inverse: OnceLock<DeviceInverse>,
}

impl GpuSlots {
    /// The inverse lists on the GPU, uploaded once.
    pub fn inverse(&self, device: &gpu::Device, layout: &SlotLayout) -> Result<&DeviceInverse> {
        if let Some(inverse) = self.inverse.get() {
            return Ok(inverse);
        }
        let inverse = DeviceInverse::upload(device, layout.inverse()).map_err(wrap_err)?;
        uploaded(device)?;
        Ok(self.inverse.get_or_init(|| inverse))
    }
}

/// What a layout has uploaded, by (candle GPU, batch size). A cloned layout
/// starts empty: a clone is made to change the layout, so the uploads
/// would be stale.
pub(crate) struct GpuCache<V>(Mutex<HashMap<(DeviceId, usize), Arc<V>>>);

impl<V> Default for GpuCache<V> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

impl<V> Clone for GpuCache<V> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl<V> std::fmt::Debug for GpuCache<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GpuCache")
    }
}

impl<V> GpuCache<V> {
    /// The value for (`dev`, `batch`), made by `upload` on `device` (this
    /// crate's device on `dev`) the first time.
    pub fn get_or_upload(
        &self,
        dev: &CudaDevice,
        device: &gpu::Device,
        batch: usize,
        upload: impl FnOnce() -> Result<V>,
    ) -> Result<Arc<V>> {
        let mut cache = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::msg("autofocus: GPU cache lock poisoned"))?;
        if let Some(v) = cache.get(&(dev.id(), batch)) {
            return Ok(Arc::clone(v));
        }
        let v = Arc::new(upload()?);
        uploaded(device)?;
        cache.insert((dev.id(), batch), Arc::clone(&v));
        Ok(v)
    }
}

/// Waits for what was just uploaded to a cache, before other threads may
/// take it: candle's default stream is the per-thread one, so another
/// thread's kernels are not ordered after this thread's copies.
fn uploaded(device: &gpu::Device) -> Result<()> {
    device.synchronize().map_err(wrap_err)
}

impl SlotLayout {
    /// This layout on candle's GPU `dev` for a batch of `batch`, uploaded
    /// on first use.
    pub fn on_gpu(
        &self,
        op: &str,
        dev: &CudaDevice,
        device: &gpu::Device,
        batch: usize,
    ) -> Result<Arc<GpuSlots>> {
        self.on_gpu.get_or_upload(dev, device, batch, || {
            let Some(pos) = &self.positions else {
                bail!(
                    "{op}: on a GPU the kernels need the tokens' positions: build the slots \
                     with `NeighbourSlots::with_positions`"
                )
            };
            let pos = if self.nbhd.images == batch {
                device.upload(pos)
            } else {
                device.upload(&pos.repeat(batch))
            }
            .map_err(wrap_err)?;
            Ok(GpuSlots {
                nbhd: DeviceNeighbourhood {
                    // Checked against the lists by `with_cluster_size`.
                    cluster_size: self.cluster_size,
                    ..DeviceNeighbourhood::upload(device, &self.nbhd).map_err(wrap_err)?
                },
                pos,
                inverse: OnceLock::new(),
            })
        })
    }
}

/// Runs `$body` with `$t` the element type of candle dtype `$dtype` (f32,
/// f16 or bf16).
macro_rules! with_element {
    ($op:expr, $dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::F16 => {
                type $t = half::f16;
                $body
            }
            candle_core::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            other => candle_core::bail!("{}: takes f32, f16 or bf16 tensors, found {other:?}", $op),
        }
    };
}
pub(crate) use with_element;
