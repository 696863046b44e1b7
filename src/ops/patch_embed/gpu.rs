//! The patch embedding on a [`Device`] (`kernels/patch_embed.cu` for the
//! im2col, the linear kernel for the convolutions). The eval-mode BatchNorm
//! is folded into the first convolution's weights and bias on upload.

use super::{PatchEmbed, conv_out};
use crate::error::{Error, Result};
use crate::gpu::params::Im2colParams;
use crate::gpu::{Buffer, Device, Element, LaunchConfig, dim, kernel_name};
use crate::io::F32Buffer;
use crate::ops::Linear;
use crate::ops::linear::gpu::{DeviceLinear, Output, linear};
use crate::ops::norm::gpu::{DeviceLayerNorm, layer_norm_in_place};

/// [`PatchEmbed`] on a device.
#[derive(Debug)]
pub struct DevicePatchEmbed<T: Element> {
    /// conv1 with the BatchNorm folded in (GELU is its epilogue).
    conv1: DeviceLinear<T>,
    conv2: DeviceLinear<T>,
    norm: DeviceLayerNorm,
}

const THREADS: u32 = 256;

impl<T: Element> DevicePatchEmbed<T> {
    /// Uploads `embed`, folding `bn(x) = x·s + t` (see
    /// [`BatchNorm::scale_shift`](crate::ops::BatchNorm::scale_shift)) into
    /// conv1: `W'ᵢ = Wᵢ·sᵢ`, `b'ᵢ = bᵢ·sᵢ + tᵢ`.
    ///
    /// # Errors
    /// [`Error::Shape`] when the BatchNorm does not have conv1's channels; device errors.
    pub fn upload(device: &Device, embed: &PatchEmbed) -> Result<Self> {
        let (conv1, bn) = (&embed.proj1, &embed.bn);
        let (mid, k) = (conv1.out_dim, conv1.in_dim);
        if bn.weight.len() != mid {
            return Err(Error::shape(
                "patch_embed",
                "bn.weight",
                [mid],
                [bn.weight.len()],
            ));
        }
        let (scale, shift) = bn.scale_shift();
        let weight: Vec<f32> = (0..mid * k)
            .map(|e| conv1.weight[e] * scale[e / k])
            .collect();
        let bias: Vec<f32> = (0..mid)
            .map(|i| conv1.bias.as_ref().map_or(0.0, |b| b[i]) * scale[i] + shift[i])
            .collect();
        let folded = Linear {
            weight: F32Buffer::owned(weight),
            bias: Some(F32Buffer::owned(bias)),
            in_dim: k,
            out_dim: mid,
        };
        Ok(Self {
            conv1: DeviceLinear::upload(device, &folded)?,
            conv2: DeviceLinear::upload(device, &embed.proj2)?,
            norm: DeviceLayerNorm::upload(device, &embed.norm)?,
        })
    }

    /// Embeds `batch` images (b×3×H×W, channel-major) into b×(h·w)×D
    /// tokens on the grid `(h, w) = (⌈H/4⌉, ⌈W/4⌉)`.
    ///
    /// # Errors
    /// Shape errors; device errors.
    pub fn forward(
        &self,
        device: &Device,
        images: &Buffer<T>,
        batch: usize,
        (height, width): (usize, usize),
    ) -> Result<(Buffer<T>, (usize, usize))> {
        let (h1, w1) = (conv_out(height), conv_out(width));
        let (h2, w2) = (conv_out(h1), conv_out(w1));
        let mid = self.conv1.out_dim;
        let d = self.conv2.out_dim;
        let mut cols = device.alloc::<T>(batch * h1 * w1 * 27)?;
        let image_layout = (3 * height * width, height * width, 1);
        im2col(
            device,
            images,
            &mut cols,
            batch,
            3,
            (height, width),
            image_layout,
        )?;
        let mut hidden = device.alloc::<T>(batch * h1 * w1 * mid)?;
        linear(
            device,
            &cols,
            &self.conv1,
            true,
            &mut hidden,
            Output::Overwrite,
            batch * h1 * w1,
        )?;
        let mut cols = device.alloc::<T>(batch * h2 * w2 * mid * 9)?;
        let hidden_layout = (h1 * w1 * mid, 1, mid);
        im2col(
            device,
            &hidden,
            &mut cols,
            batch,
            mid,
            (h1, w1),
            hidden_layout,
        )?;
        let mut tokens = device.alloc::<T>(batch * h2 * w2 * d)?;
        linear(
            device,
            &cols,
            &self.conv2,
            false,
            &mut tokens,
            Output::Overwrite,
            batch * h2 * w2,
        )?;
        layer_norm_in_place(device, &mut tokens, &self.norm, batch * h2 * w2)?;
        Ok((tokens, (h2, w2)))
    }
}

/// im2col of a 3×3/2/1 convolution over `batch` maps of `channels` at
/// `(ih, iw)`, laid out by `(image, channel, pixel)` strides, into
/// `batch × oh·ow × channels·9`.
///
/// # Errors
/// Shape errors naming the buffer; device errors.
pub fn im2col<T: Element>(
    device: &Device,
    input: &Buffer<T>,
    out: &mut Buffer<T>,
    batch: usize,
    channels: usize,
    (ih, iw): (usize, usize),
    (image_stride, channel_stride, pixel_stride): (usize, usize, usize),
) -> Result<()> {
    const OP: &str = "im2col";
    let (oh, ow) = (conv_out(ih), conv_out(iw));
    let furthest =
        (channels.max(1) - 1) * channel_stride + (ih * iw).max(1).saturating_sub(1) * pixel_stride;
    if ih * iw > 0 && channels > 0 && furthest >= image_stride {
        return Err(Error::InvalidArgument(format!(
            "{OP}: strides reach element {furthest} of images of {image_stride}"
        )));
    }
    let params = Im2colParams {
        input: device.check(OP, "input", input, &[batch, image_stride])?,
        out: device.check_mut(OP, "out", out, &[batch, oh * ow, channels * 9])?,
        batch: dim(OP, "batch", batch)?,
        channels: dim(OP, "channels", channels)?,
        ih: dim(OP, "ih", ih)?,
        iw: dim(OP, "iw", iw)?,
        oh: dim(OP, "oh", oh)?,
        ow: dim(OP, "ow", ow)?,
        image_stride: image_stride as i64,
        channel_stride: channel_stride as i64,
        pixel_stride: pixel_stride as i64,
    };
    let total = batch * oh * ow * channels * 9;
    if total == 0 {
        return Ok(());
    }
    let config = LaunchConfig::grid_stride(OP, total, THREADS)?;
    // SAFETY: the buffers were checked against the shapes the kernel
    // indexes, and the strides against the image size.
    unsafe { device.launch(&kernel_name::<T>(OP), config, &params) }
}
