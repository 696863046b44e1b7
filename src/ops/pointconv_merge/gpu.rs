//! PointConv merge on a [`Device`] (`kernels/pointconv_merge.cu`): the
//! weight net is evaluated from the positions per neighbour (no table).

use crate::error::{Error, Result};
use crate::gpu::params::MergeParams;
use crate::gpu::{Buffer, Device, Element, LaunchConfig, dim, kernel_name};
use crate::ops::neighbourhood::gpu::DeviceNeighbourhood;
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
    let (nbhd, mask) = inp.nbhd.check(device, OP, b, n)?;
    let net = inp.weight_net;
    let params = MergeParams {
        feat: device.check(OP, "feat", inp.feat, &[b, n, c])?,
        importance: device.check(OP, "importance", inp.importance, &[b, n])?,
        nbhd,
        mask,
        centres: device.check(OP, "centres", inp.centres, &[b, kept])?,
        pos: device.check(OP, "pos", inp.pos, &[b, n, 2])?,
        net_weight: device.check(
            OP,
            "weight_net.weight",
            &net.linear_weight,
            &[INNER_CHANNELS, 5],
        )?,
        net_bias: device.check(OP, "weight_net.bias", &net.linear_bias, &[INNER_CHANNELS])?,
        norm_weight: device.check(
            OP,
            "weight_net.norm.weight",
            &net.norm_weight,
            &[INNER_CHANNELS],
        )?,
        norm_bias: device.check(
            OP,
            "weight_net.norm.bias",
            &net.norm_bias,
            &[INNER_CHANNELS],
        )?,
        out: device.check_mut(OP, "out", out, &[b, kept, INNER_CHANNELS * c])?,
        batch: dim(OP, "batch", b)?,
        n: dim(OP, "n", n)?,
        m: dim(OP, "m", m)?,
        nbhd_images: dim(OP, "nbhd.images", inp.nbhd.images)?,
        kept: dim(OP, "kept", kept)?,
        channels: dim(OP, "channels", c)?,
        offset_clamp: inp.offset_clamp.unwrap_or(f32::INFINITY),
        eps: EPS,
    };
    if b * kept * c == 0 {
        return Ok(());
    }
    if n == 0 || m == 0 {
        return Err(Error::InvalidArgument(format!(
            "{OP}: centres but no tokens to merge"
        )));
    }
    let per_warp = INNER_CHANNELS * m * size_of::<f32>();
    let what = format!("a neighbourhood of {m} tokens");
    let config = LaunchConfig::warp_per_row(OP, b * kept, per_warp, what)?;
    // SAFETY: every buffer was checked against the shapes the kernel indexes;
    // centre and neighbour indices are clamped into range by the kernel.
    unsafe { device.launch(&kernel_name::<T>(OP), config, &params) }
}
