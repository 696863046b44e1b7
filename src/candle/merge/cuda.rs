//! The PointConv merge's CUDA half: `cuda_fwd`, and the backward of tensors
//! on a GPU, with this crate's kernels (`kernels/pointconv_merge.cu`,
//! `kernels/pointconv_merge_backward.cu`) on candle's stream.

use candle_core::backend::BackendStorage;
use candle_core::cuda::CudaDType;
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Tensor, bail};

use super::{MergeOp, NET_PARAMS, OP};
use crate::candle::cuda::{
    GpuSlots, address, as_cuda, cuda_storage, device_for, read_done, storage_of, tensor_of, view,
    with_element, wrap_err,
};
use crate::gpu::{self, Buffer, Element};
use crate::ops::pointconv_merge::INNER_CHANNELS;
use crate::ops::pointconv_merge::gpu::{
    DeviceMergeInputs, DeviceWeightNet, pointconv_merge, pointconv_merge_backward,
};

/// The op's inputs viewed in place on the GPU.
struct Views<T: Element> {
    feat: Buffer<T>,
    importance: Buffer<f32>,
    net: DeviceWeightNet,
}

/// (batch, tokens, channels, kept centres per image).
type Dims = (usize, usize, usize, usize);

/// [`read_done`] for the op's inputs: the features (of `T`), the f32
/// importance and the packed f32 weight net.
fn reads_done<T: CudaDType>(inputs: [(&CudaStorage, &Layout); 3]) -> Result<()> {
    read_done::<T>(inputs[0].0)?;
    read_done::<f32>(inputs[1].0)?;
    read_done::<f32>(inputs[2].0)
}

impl MergeOp {
    /// Views the features, the f32 importance and the packed f32 weight net
    /// (storage and layout each).
    ///
    /// # Safety
    /// The storages must outlive every kernel launched with the views.
    unsafe fn views<T: Element + CudaDType>(
        device: &gpu::Device,
        [feat, importance, packed]: [(&CudaStorage, &Layout); 3],
        (b, n, c, _): Dims,
    ) -> Result<Views<T>> {
        let f_at = address::<T>(OP, "feat", feat.0, feat.1)?;
        let p_at = address::<f32>(OP, "importance", importance.0, importance.1)?;
        let w_at = address::<f32>(OP, "weight net", packed.0, packed.1)?;
        if w_at.1 != NET_PARAMS {
            bail!(
                "{OP}: packed weight net of {} values, expected {NET_PARAMS}",
                w_at.1
            );
        }
        let four = INNER_CHANNELS;
        // SAFETY: the caller's contract; `check` sized every tensor.
        unsafe {
            Ok(Views {
                feat: view(device, f_at, 0, b * n * c)?,
                importance: view(device, p_at, 0, b * n)?,
                net: DeviceWeightNet {
                    linear_weight: view(device, w_at, 0, 5 * four)?,
                    linear_bias: view(device, w_at, 5 * four, four)?,
                    norm_weight: view(device, w_at, 6 * four, four)?,
                    norm_bias: view(device, w_at, 7 * four, four)?,
                },
            })
        }
    }

    fn device_inputs<'a, T: Element>(
        &self,
        views: &'a Views<T>,
        slots: &'a GpuSlots,
        centres: &'a Buffer<i32>,
        (b, n, c, kept): Dims,
    ) -> DeviceMergeInputs<'a, T> {
        DeviceMergeInputs {
            feat: &views.feat,
            importance: &views.importance,
            nbhd: &slots.nbhd,
            centres,
            pos: &slots.pos,
            weight_net: &views.net,
            offset_clamp: self.layout.slots.offsets.clamp().map(|v| v as f32),
            batch: b,
            tokens: n,
            kept,
            channels: c,
        }
    }

    /// The layout and the centres on candle's GPU `dev`, uploaded once.
    fn on_gpu(
        &self,
        dev: &CudaDevice,
        device: &gpu::Device,
        batch: usize,
    ) -> Result<(std::sync::Arc<GpuSlots>, std::sync::Arc<Buffer<i32>>)> {
        let slots = self.layout.slots.on_gpu(OP, dev, device, batch)?;
        let centres = self
            .layout
            .centres_on_gpu
            .get_or_upload(dev, device, batch, || {
                let centres: Vec<i32> = self.layout.centres.iter().map(|&i| i as i32).collect();
                device.upload(&centres).map_err(wrap_err)
            })?;
        Ok((slots, centres))
    }

    /// `cuda_fwd` for storage type `T`.
    pub(super) fn cuda_forward<T: Element + CudaDType>(
        &self,
        inputs: [(&CudaStorage, &Layout); 3],
        dims: Dims,
    ) -> Result<CudaStorage> {
        let (b, _, c, kept) = dims;
        let dev = inputs[0].0.device();
        let device = device_for(dev)?;
        let (slots, centres) = self.on_gpu(dev, &device, b)?;
        // SAFETY: candle keeps the inputs alive for this call, and frees
        // them in the order of its stream, after these launches.
        let views = unsafe { Self::views::<T>(&device, inputs, dims) }?;
        let mut out = device
            .alloc::<T>(b * kept * INNER_CHANNELS * c)
            .map_err(wrap_err)?;
        let merge_inputs = self.device_inputs(&views, &slots, &centres, dims);
        pointconv_merge(&device, &merge_inputs, &mut out).map_err(wrap_err)?;
        reads_done::<T>(inputs)?;
        storage_of(out, dev)
    }

    /// The backward of tensors on candle's GPU `dev`.
    pub(super) fn cuda_backward(
        &self,
        dev: &CudaDevice,
        [feat, importance, packed, grad_out]: [&Tensor; 4],
        dims: Dims,
    ) -> Result<[Tensor; 3]> {
        let grad_out = grad_out.contiguous()?;
        let (f_s, f_l) = cuda_storage(OP, "feat", feat)?;
        let (p_s, p_l) = cuda_storage(OP, "importance", importance)?;
        let (w_s, w_l) = cuda_storage(OP, "weight net", packed)?;
        let (g_s, g_l) = cuda_storage(OP, "grad_out", &grad_out)?;
        let inputs = [
            (as_cuda(&f_s), f_l),
            (as_cuda(&p_s), p_l),
            (as_cuda(&w_s), w_l),
        ];
        let grad_out = (as_cuda(&g_s), g_l);
        with_element!(OP, feat.dtype(), T => self.cuda_backward_as::<T>(dev, inputs, grad_out, packed.dims(), dims))
    }

    fn cuda_backward_as<T: Element + CudaDType>(
        &self,
        dev: &CudaDevice,
        inputs: [(&CudaStorage, &Layout); 3],
        grad_out: (&CudaStorage, &Layout),
        packed_dims: &[usize],
        dims: Dims,
    ) -> Result<[Tensor; 3]> {
        let (b, n, c, kept) = dims;
        let device = device_for(dev)?;
        let (slots, centres) = self.on_gpu(dev, &device, b)?;
        let grad_at = address::<T>(OP, "grad_out", grad_out.0, grad_out.1)?;
        // SAFETY: the tensors are borrowed for this call, and candle frees
        // them in the order of its stream, after these launches.
        let (views, grad_view) = unsafe {
            (
                Self::views::<T>(&device, inputs, dims)?,
                view::<T>(&device, grad_at, 0, b * kept * INNER_CHANNELS * c)?,
            )
        };
        let inverse = slots.inverse(&device, &self.layout.slots)?;
        let grads = pointconv_merge_backward(
            &device,
            &self.device_inputs(&views, &slots, &centres, dims),
            &grad_view,
            inverse,
        )
        .map_err(wrap_err)?;
        reads_done::<T>(inputs)?;
        read_done::<T>(grad_out.0)?;
        Ok([
            tensor_of(grads.feat, dev, (b, n, c))?,
            tensor_of(grads.importance, dev, (b, n))?,
            tensor_of(grads.weight_net, dev, packed_dims)?,
        ])
    }
}
