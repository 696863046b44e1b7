//! Patch embedding (spec §2): conv3×3/2 → BatchNorm → GELU → conv3×3/2 →
//! tokens (row-major) → LayerNorm. Convolutions run as im2col + GEMM.

use rayon::prelude::*;

use super::activation::gelu;
use super::linear::Linear;
use super::norm::{BatchNorm, LayerNorm};
use crate::error::{Error, Result};

pub mod gpu;

/// Output side of a 3×3, stride-2, padding-1 convolution.
pub fn conv_out(side: usize) -> usize {
    side.div_ceil(2)
}

/// The patch-embedding weights.
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    /// 3×3 convolution 3 → D/2, as a linear layer over `(ci, ky, kx)` patches.
    pub proj1: Linear,
    pub bn: BatchNorm,
    /// 3×3 convolution D/2 → D, as a linear layer over `(ci, ky, kx)` patches.
    pub proj2: Linear,
    pub norm: LayerNorm,
}

/// im2col of a 3×3/2/1 convolution over an input whose channel `ci` at
/// `(y, x)` is `input[ci·channel_stride + (y·iw + x)·pixel_stride]` (zero
/// outside): returns `oh·ow × ci·9` patches in PyTorch's weight order
/// `(ci, ky, kx)`. Output rows are filled in parallel.
fn im2col(
    input: &[f32],
    channels: usize,
    (ih, iw): (usize, usize),
    (channel_stride, pixel_stride): (usize, usize),
) -> Vec<f32> {
    let (oh, ow) = (conv_out(ih), conv_out(iw));
    let width = channels * 9;
    let mut cols = vec![0.0f32; oh * ow * width];
    cols.par_chunks_mut(ow * width)
        .enumerate()
        .for_each(|(oy, row)| {
            for (ox, patch) in row.chunks_exact_mut(width).enumerate() {
                for ky in 0..3 {
                    let y = (2 * oy + ky).wrapping_sub(1);
                    if y >= ih {
                        continue;
                    }
                    for kx in 0..3 {
                        let x = (2 * ox + kx).wrapping_sub(1);
                        if x >= iw {
                            continue;
                        }
                        let pixel = (y * iw + x) * pixel_stride;
                        for ci in 0..channels {
                            patch[ci * 9 + ky * 3 + kx] = input[ci * channel_stride + pixel];
                        }
                    }
                }
            }
        });
    cols
}

impl PatchEmbed {
    /// Embeds `batch` images (b×3×H×W, channel-major) into tokens:
    /// returns b×(h·w)×D features and the token grid `(h, w) = (⌈H/4⌉, ⌈W/4⌉)`.
    ///
    /// # Errors
    /// [`Error::Shape`] when `image` is not b×3×H×W.
    pub fn forward(
        &self,
        image: &[f32],
        batch: usize,
        (height, width): (usize, usize),
    ) -> Result<(Vec<f32>, (usize, usize))> {
        if image.len() != batch * 3 * height * width || height == 0 || width == 0 {
            return Err(Error::shape(
                "patch_embed",
                "image",
                [batch, 3, height, width],
                image.len(),
            ));
        }
        let (h1, w1) = (conv_out(height), conv_out(width));
        let (h2, w2) = (conv_out(h1), conv_out(w1));
        let mid = self.proj1.out_dim;
        let dim = self.proj2.out_dim;
        let mut tokens = Vec::with_capacity(batch * h2 * w2 * dim);
        for img in image.chunks_exact(3 * height * width) {
            // The image is channel-major; the hidden map channels-last.
            let cols = im2col(img, 3, (height, width), (height * width, 1));
            let mut hidden = self.proj1.forward(&cols, h1 * w1)?; // h1·w1 × mid, channels last
            self.bn.forward_channels_last(&mut hidden)?;
            gelu(&mut hidden);
            let cols = im2col(&hidden, mid, (h1, w1), (1, mid));
            tokens.extend(self.proj2.forward(&cols, h2 * w2)?);
        }
        self.norm.forward_in_place(&mut tokens)?;
        Ok((tokens, (h2, w2)))
    }
}
