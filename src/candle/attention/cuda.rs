//! Cluster attention's CUDA half: `cuda_fwd`, and the backward of tensors
//! on a GPU, with this crate's kernels (`kernels/cluster_attention.cu`,
//! `kernels/cluster_attention_backward.cu`) on candle's stream.

use candle_core::backend::BackendStorage;
use candle_core::cuda::CudaDType;
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Tensor, bail};

use super::{AttentionOp, OP};
use crate::candle::cuda::{
    GpuSlots, address, as_cuda, cuda_storage, device_for, read_done, storage_of, tensor_of, view,
    with_element, wrap_err,
};
use crate::gpu::{self, Buffer, Element};
use crate::ops::cluster_attention::gpu::{
    DeviceAttentionInputs, cluster_attention, cluster_attention_backward,
};

/// The op's inputs viewed in place on the GPU.
struct Views<T: Element> {
    q: Buffer<T>,
    kv: Buffer<T>,
    pos_weight: Buffer<f32>,
    pos_bias: Buffer<f32>,
    blank_k: Buffer<f32>,
    blank_v: Buffer<f32>,
}

/// [`read_done`] for the op's inputs: `q` and `kv` (of `T`) and the packed
/// f32 parameters.
fn reads_done<T: CudaDType>(inputs: [(&CudaStorage, &Layout); 3]) -> Result<()> {
    read_done::<T>(inputs[0].0)?;
    read_done::<T>(inputs[1].0)?;
    read_done::<f32>(inputs[2].0)
}

impl AttentionOp {
    /// Views `q`, `kv` and the packed f32 parameters (storage and layout
    /// each).
    ///
    /// # Safety
    /// The storages must outlive every kernel launched with the views.
    unsafe fn views<T: Element + CudaDType>(
        &self,
        device: &gpu::Device,
        [q, kv, packed]: [(&CudaStorage, &Layout); 3],
        (b, n, c): (usize, usize, usize),
    ) -> Result<Views<T>> {
        if kv.0.dtype() != q.0.dtype() {
            bail!(
                "{OP}: `kv` is {:?}, `q` {:?}: they must share a dtype",
                kv.0.dtype(),
                q.0.dtype()
            );
        }
        let h = self.layout.heads;
        let q_at = address::<T>(OP, "q", q.0, q.1)?;
        let kv_at = address::<T>(OP, "kv", kv.0, kv.1)?;
        let p_at = address::<f32>(OP, "parameters", packed.0, packed.1)?;
        // SAFETY: the caller's contract; `check` sized every tensor.
        unsafe {
            Ok(Views {
                q: view(device, q_at, 0, b * n * c)?,
                kv: view(device, kv_at, 0, b * n * 2 * c)?,
                pos_weight: view(device, p_at, 0, 5 * h)?,
                pos_bias: view(device, p_at, 5 * h, h)?,
                blank_k: view(device, p_at, 6 * h, c)?,
                blank_v: view(device, p_at, 6 * h + c, c)?,
            })
        }
    }

    fn device_inputs<'a, T: Element>(
        &self,
        views: &'a Views<T>,
        slots: &'a GpuSlots,
        (b, n, c): (usize, usize, usize),
    ) -> DeviceAttentionInputs<'a, T> {
        let h = self.layout.heads;
        let d = c / h;
        DeviceAttentionInputs {
            q: &views.q,
            q_scale: (d as f32).powf(-0.5),
            kv: &views.kv,
            nbhd: &slots.nbhd,
            pos: &slots.pos,
            pos_weight: &views.pos_weight,
            pos_bias: &views.pos_bias,
            blank_k: &views.blank_k,
            blank_v: &views.blank_v,
            offset_clamp: self.layout.slots.offsets.clamp().map(|v| v as f32),
            batch: b,
            tokens: n,
            heads: h,
            head_dim: d,
        }
    }

    /// `cuda_fwd` for storage type `T`.
    pub(super) fn cuda_forward<T: Element + CudaDType>(
        &self,
        inputs: [(&CudaStorage, &Layout); 3],
        dims: (usize, usize, usize),
    ) -> Result<CudaStorage> {
        let dev = inputs[0].0.device();
        let device = device_for(dev)?;
        let slots = self.layout.slots.on_gpu(OP, dev, &device, dims.0)?;
        // SAFETY: candle keeps the inputs alive for this call, and frees
        // them in the order of its stream, after these launches.
        let views = unsafe { self.views::<T>(&device, inputs, dims) }?;
        let mut out = device
            .alloc::<T>(dims.0 * dims.1 * dims.2)
            .map_err(wrap_err)?;
        cluster_attention(&device, &self.device_inputs(&views, &slots, dims), &mut out)
            .map_err(wrap_err)?;
        reads_done::<T>(inputs)?;
        storage_of(out, dev)
    }

    /// The backward of tensors on candle's GPU `dev`: the device kernels,
    /// which recompute the log-sum-exp (the forward kept none).
    pub(super) fn cuda_backward(
        &self,
        dev: &CudaDevice,
        [q, kv, packed, out, grad_out]: [&Tensor; 5],
        dims: (usize, usize, usize),
    ) -> Result<[Tensor; 3]> {
        let grad_out = grad_out.contiguous()?;
        let (q_s, q_l) = cuda_storage(OP, "q", q)?;
        let (kv_s, kv_l) = cuda_storage(OP, "kv", kv)?;
        let (p_s, p_l) = cuda_storage(OP, "parameters", packed)?;
        let (out_s, out_l) = cuda_storage(OP, "out", out)?;
        let (g_s, g_l) = cuda_storage(OP, "grad_out", &grad_out)?;
        let inputs = [
            (as_cuda(&q_s), q_l),
            (as_cuda(&kv_s), kv_l),
            (as_cuda(&p_s), p_l),
        ];
        let (out_s, g_s) = ((as_cuda(&out_s), out_l), (as_cuda(&g_s), g_l));
        with_element!(OP, q.dtype(), T => self.cuda_backward_as::<T>(dev, inputs, [out_s, g_s], packed.dims(), dims))
    }

    fn cuda_backward_as<T: Element + CudaDType>(
        &self,
        dev: &CudaDevice,
        inputs: [(&CudaStorage, &Layout); 3],
        [out, grad_out]: [(&CudaStorage, &Layout); 2],
        packed_dims: &[usize],
        (b, n, c): (usize, usize, usize),
    ) -> Result<[Tensor; 3]> {
        let device = device_for(dev)?;
        let slots = self.layout.slots.on_gpu(OP, dev, &device, b)?;
        let len = b * n * c;
        let out_at = address::<T>(OP, "out", out.0, out.1)?;
        let grad_at = address::<T>(OP, "grad_out", grad_out.0, grad_out.1)?;
        // SAFETY: the tensors are borrowed for this call, and candle frees
        // them in the order of its stream, after these launches.
        let (views, out_view, grad_view) = unsafe {
            (
                self.views::<T>(&device, inputs, (b, n, c))?,
                view::<T>(&device, out_at, 0, len)?,
                view::<T>(&device, grad_at, 0, len)?,
            )
        };
        let inverse = slots.inverse(&device, &self.layout.slots)?;
        let grads = cluster_attention_backward(
            &device,
            &self.device_inputs(&views, &slots, (b, n, c)),
            &out_view,
            &grad_view,
            inverse,
        )
        .map_err(wrap_err)?;
        reads_done::<T>(inputs)?;
        read_done::<T>(out.0)?;
        read_done::<T>(grad_out.0)?;
        Ok([
            tensor_of(grads.q, dev, (b, n, c))?,
            tensor_of(grads.kv, dev, (b, n, 2 * c))?,
            tensor_of(grads.params, dev, packed_dims)?,
        ])
    }
}
