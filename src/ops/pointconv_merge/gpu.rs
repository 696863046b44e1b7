//! PointConv merge on a [`Device`] (`kernels/pointconv_merge.cu`): the
//! weight net is evaluated from the positions per neighbour (no table).

use crate::error::{Error, Result};
use crate::gpu::params::{MergeBackwardParams, MergeParams};
use crate::gpu::tensor_ops::column_sums;
use crate::gpu::{Buffer, Device, Element, LaunchConfig, dim, kernel_name};
use crate::ops::neighbourhood::gpu::{DeviceInverse, DeviceNeighbourhood};
use crate::ops::norm::EPS;

use super::INNER_CHANNELS;

/// The weight net `GELU(LN(Linear(5 → 4)(f)))` on a device, in f32.
#[derive(Debug)]
pub struct DeviceWeightNet {
    /// 4×5 and 4.
    pub linear_weight: Buffer<f32>,
    pub linear_bias: Buffer<f32>,
    /// LayerNorm(4) weight and bias.
    pub norm_weight: Buffer<f32>,
    pub norm_bias: Buffer<f32>,
}

impl DeviceWeightNet {
    /// Uploads the weight net's layers.
    ///
    /// # Errors
    /// [`Error::Shape`] unless the layers are 5 → 4 with a bias and
    /// LayerNorm(4); device errors.
    pub fn upload(
        device: &Device,
        linear: &crate::ops::Linear,
        norm: &crate::ops::LayerNorm,
    ) -> Result<Self> {
        let Some(bias) = linear.bias.as_ref().filter(|_| {
            linear.in_dim == 5 && linear.out_dim == INNER_CHANNELS && norm.dim() == INNER_CHANNELS
        }) else {
            return Err(Error::shape(
                "weight_net",
                "linear",
                [INNER_CHANNELS, 5],
                [linear.out_dim, linear.in_dim],
            ));
        };
        Ok(Self {
            linear_weight: device.upload(&linear.weight)?,
            linear_bias: device.upload(bias)?,
            norm_weight: device.upload(&norm.weight)?,
            norm_bias: device.upload(&norm.bias)?,
        })
    }
}

/// Inputs of [`pointconv_merge`]: as [`super::MergeInputs`], with positions
/// and the weight net in place of its table.
#[derive(Debug, Clone, Copy)]
pub struct DeviceMergeInputs<'a, T: Element> {
    /// b×n×c token features.
    pub feat: &'a Buffer<T>,
    /// b×n importance.
    pub importance: &'a Buffer<f32>,
    pub nbhd: &'a DeviceNeighbourhood,
    /// b×kept indices of the centres.
    pub centres: &'a Buffer<i32>,
    /// b×n×2 positions.
    pub pos: &'a Buffer<f32>,
    pub weight_net: &'a DeviceWeightNet,
    pub offset_clamp: Option<f32>,
    pub batch: usize,
    pub tokens: usize,
    pub kept: usize,
    pub channels: usize,
}

/// The merge's checked launch fields, shared by the forward and the backward.
fn forward_params<T: Element>(
    device: &Device,
    op: &'static str,
    inp: &DeviceMergeInputs<'_, T>,
) -> Result<MergeParams> {
    let (b, n, kept, c) = (inp.batch, inp.tokens, inp.kept, inp.channels);
    let m = inp.nbhd.size;
    let (nbhd, mask) = inp.nbhd.check(device, op, b, n)?;
    let net = inp.weight_net;
    Ok(MergeParams {
        feat: device.check(op, "feat", inp.feat, &[b, n, c])?,
        importance: device.check(op, "importance", inp.importance, &[b, n])?,
        nbhd,
        mask,
        centres: device.check(op, "centres", inp.centres, &[b, kept])?,
        pos: device.check(op, "pos", inp.pos, &[b, n, 2])?,
        net_weight: device.check(
            op,
            "weight_net.weight",
            &net.linear_weight,
            &[INNER_CHANNELS, 5],
        )?,
        net_bias: device.check(op, "weight_net.bias", &net.linear_bias, &[INNER_CHANNELS])?,
        norm_weight: device.check(
            op,
            "weight_net.norm.weight",
            &net.norm_weight,
            &[INNER_CHANNELS],
        )?,
        norm_bias: device.check(
            op,
            "weight_net.norm.bias",
            &net.norm_bias,
            &[INNER_CHANNELS],
        )?,
        out: 0,
        batch: dim(op, "batch", b)?,
        n: dim(op, "n", n)?,
        m: dim(op, "m", m)?,
        nbhd_images: dim(op, "nbhd.images", inp.nbhd.images)?,
        kept: dim(op, "kept", kept)?,
        channels: dim(op, "channels", c)?,
        offset_clamp: inp.offset_clamp.unwrap_or(f32::INFINITY),
        eps: EPS,
    })
}

/// Computes the merged features `u` (b×kept×4c, inner-channel major) into `out`.
///
/// # Errors
/// Shape errors naming the buffer; [`Error::Unsupported`] when a
/// neighbourhood does not fit in shared memory; device errors.
pub fn pointconv_merge<T: Element>(
    device: &Device,
    inp: &DeviceMergeInputs<'_, T>,
    out: &mut Buffer<T>,
) -> Result<()> {
    const OP: &str = "pointconv_merge";
    let (b, n, kept, c) = (inp.batch, inp.tokens, inp.kept, inp.channels);
    let m = inp.nbhd.size;
    let params = MergeParams {
        out: device.check_mut(OP, "out", out, &[b, kept, INNER_CHANNELS * c])?,
        ..forward_params(device, OP, inp)?
    };
    if b * kept * c == 0 {
        return Ok(());
    }
    if n == 0 || m == 0 {
        return Err(Error::InvalidArgument(format!(
            "{OP}: centres but no tokens to merge"
        )));
    }
    // Per slot: the four weights (a 16-byte load) and the neighbour's row
    // offset (8 bytes): 6·m floats, in whole 16 bytes.
    let per_warp = (6 * m).next_multiple_of(4) * size_of::<f32>();
    let what = format!("a neighbourhood of {m} tokens");
    let config = LaunchConfig::warp_per_row(OP, b * kept, per_warp, what)?;
    // SAFETY: every buffer was checked against the shapes the kernel indexes;
    // centre and neighbour indices are clamped into range by the kernel.
    unsafe { device.launch(&kernel_name::<T>(OP), config, &params) }
}

/// Gradients of the merge on a device.
#[derive(Debug)]
pub struct DeviceMergeGrads<T: Element> {
    /// b×n×c: the token features.
    pub feat: Buffer<T>,
    /// b×n: the importance of every token.
    pub importance: Buffer<f32>,
    /// 32 values: `weight_net.0.weight` (4×5), `weight_net.0.bias` (4),
    /// `weight_net.1.weight` (4), `weight_net.1.bias` (4).
    pub weight_net: Buffer<f32>,
}

/// The backward of [`pointconv_merge`] (`kernels/pointconv_merge_backward.cu`),
/// as [`super::backward::pointconv_merge_backward`] on the CPU: from the
/// forward's inputs (distinct centres, as selections are) and the gradient
/// of the merged features. Feature and importance gradients are gathered
/// over `inverse`; the weight net's are each centre's share, added by
/// [`crate::gpu::tensor_ops::column_sums`] in a fixed order. No atomics: the
/// same bits on every run.
///
/// # Errors
/// Shape errors naming the buffer; [`Error::InvalidArgument`] for inverse
/// lists that do not match the neighbourhoods; device errors.
pub fn pointconv_merge_backward<T: Element>(
    device: &Device,
    inp: &DeviceMergeInputs<'_, T>,
    grad_out: &Buffer<T>,
    inverse: &DeviceInverse,
) -> Result<DeviceMergeGrads<T>> {
    const OP: &str = "pointconv_merge_backward";
    const NET_PARAMS: usize = 32;
    let (b, n, kept, c) = (inp.batch, inp.tokens, inp.kept, inp.channels);
    let m = inp.nbhd.size;
    let (inv_start, inv_pairs) = inverse.check(device, OP, inp.nbhd)?;
    let mut grads = DeviceMergeGrads {
        feat: device.alloc::<T>(b * n * c)?,
        importance: device.alloc::<f32>(b * n)?,
        weight_net: device.alloc::<f32>(NET_PARAMS)?,
    };
    let mut centre_row = device.alloc::<i32>(b * n)?;
    let mut partials = device.alloc::<f32>(b * kept * NET_PARAMS)?;
    let params = MergeBackwardParams {
        forward: forward_params(device, OP, inp)?,
        grad_out: device.check(OP, "grad_out", grad_out, &[b, kept, INNER_CHANNELS * c])?,
        inv_start,
        inv_pairs,
        centre_row: device.check_mut(OP, "centre_row", &mut centre_row, &[b, n])?,
        grad_feat: device.check_mut(OP, "grad_feat", &mut grads.feat, &[b, n, c])?,
        grad_importance: device.check_mut(OP, "grad_importance", &mut grads.importance, &[b, n])?,
        row_partials: device.check_mut(
            OP,
            "row_partials",
            &mut partials,
            &[b * kept, NET_PARAMS],
        )?,
    };
    if b * n == 0 || c == 0 || m == 0 {
        return Ok(DeviceMergeGrads {
            feat: device.zeros(b * n * c)?,
            importance: device.zeros(b * n)?,
            weight_net: device.zeros(NET_PARAMS)?,
        });
    }
    let per_token = LaunchConfig::per_item(OP, b * n, 128)?;
    let per_centre = LaunchConfig::per_item(OP, b * kept, 128)?;
    let rows = LaunchConfig::warp_per_row(OP, b * kept, 0, "")?;
    let staged = (INNER_CHANNELS + 1) * 32 * size_of::<f32>();
    let tokens = LaunchConfig::warp_per_row(OP, b * n, staged, "")?;
    // SAFETY: every buffer was checked against the shapes the kernels index;
    // centre, neighbour and inverse indices are clamped into range by the
    // kernels; each kernel reads only what the ones before it (same stream)
    // wrote.
    unsafe {
        device.launch("pointconv_merge_backward_clear", per_token, &params)?;
        if b * kept > 0 {
            device.launch("pointconv_merge_backward_centres", per_centre, &params)?;
            device.launch(
                &kernel_name::<T>("pointconv_merge_backward_rows"),
                rows,
                &params,
            )?;
        }
        device.launch(
            &kernel_name::<T>("pointconv_merge_backward_tokens"),
            tokens,
            &params,
        )?;
    }
    column_sums(
        device,
        &partials,
        &mut grads.weight_net,
        (b * kept, NET_PARAMS),
    )?;
    Ok(grads)
}
