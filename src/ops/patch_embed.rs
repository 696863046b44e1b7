//! Patch embedding (spec §2): conv3×3/2 → BatchNorm → GELU → conv3×3/2 →
//! tokens (row-major) → LayerNorm. Convolutions run as im2col + GEMM.

use super::activation::gelu;
use super::linear::Linear;
use super::norm::{BatchNorm, LayerNorm};
use crate::error::{Error, Result};

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

/// im2col of a 3×3/2/1 convolution. `at(ci, y, x)` reads the input (zero
/// outside); returns `oh·ow × ci·9` patches in PyTorch's weight order.
fn im2col(
    channels: usize,
    (ih, iw): (usize, usize),
    at: impl Fn(usize, usize, usize) -> f32,
) -> Vec<f32> {
    let (oh, ow) = (conv_out(ih), conv_out(iw));
    let mut cols = vec![0.0f32; oh * ow * channels * 9];
    for oy in 0..oh {
        for ox in 0..ow {
            let patch = &mut cols[(oy * ow + ox) * channels * 9..][..channels * 9];
            for ci in 0..channels {
                for ky in 0..3 {
                    let y = (2 * oy + ky).wrapping_sub(1);
                    if y >= ih {
                        continue;
                    }
                    for kx in 0..3 {
                        let x = (2 * ox + kx).wrapping_sub(1);
                        if x < iw {
                            patch[ci * 9 + ky * 3 + kx] = at(ci, y, x);
                        }
                    }
                }
            }
        }
    }
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
            let cols = im2col(3, (height, width), |c, y, x| {
                img[(c * height + y) * width + x]
            });
            let mut hidden = self.proj1.forward(&cols, h1 * w1)?; // h1·w1 × mid, channels last
            self.bn.forward_channels_last(&mut hidden)?;
            gelu(&mut hidden);
            let cols = im2col(mid, (h1, w1), |c, y, x| hidden[(y * w1 + x) * mid + c]);
            tokens.extend(self.proj2.forward(&cols, h2 * w2)?);
        }
        self.norm.forward_in_place(&mut tokens)?;
        Ok((tokens, (h2, w2)))
    }
}
