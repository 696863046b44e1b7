//! The dense layers of the candle model: linear layers and LayerNorm through
//! [`crate::candle::dense`] (fused custom ops on the CPU, candle's ops
//! elsewhere), the patch embedding from candle-nn's convolutions.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Init, VarBuilder};

use crate::candle::dense;

/// LayerNorm eps everywhere in AFF (spec §2).
const EPS: f64 = 1e-5;

/// The published initialisation of linear weights (truncated normal, std 0.02).
const LINEAR_INIT: Init = Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

/// Linear layer `in_dim → out_dim` under `vb` (`weight` out×in, `bias`),
/// initialised as the published model initialises its own.
pub(crate) fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear {
        weight: vb.get_with_hints((out_dim, in_dim), "weight", LINEAR_INIT)?,
        bias: vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?,
    })
}

/// A linear layer `y = x·Wᵀ + b` over the last axis.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// `GELU(x·Wᵀ + b)` (the erf GELU), fused on the CPU.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        dense::linear(x, &self.weight, &self.bias, true)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        dense::linear(x, &self.weight, &self.bias, false)
    }
}

/// LayerNorm over the last axis, differentiable in its input and
/// parameters, computed in f32 whatever the storage dtype.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        dense::layer_norm(x, &self.weight, &self.bias)
    }
}

/// The patch embedding (spec §2): conv 3×3/2 → BatchNorm (running
/// statistics, as in evaluation) → GELU → conv 3×3/2 → tokens → LayerNorm.
#[derive(Debug, Clone)]
pub(crate) struct PatchEmbed {
    proj1: Conv2d,
    /// BatchNorm as the affine map it is with fixed statistics:
    /// `x · scale + shift`, `scale = weight / √(running_var + eps)`. The
    /// running statistics are buffers, detached: they get no gradient.
    bn_weight: Tensor,
    bn_bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    proj2: Conv2d,
    norm: LayerNorm,
}

impl PatchEmbed {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        // Padding 1 is applied by `conv3x3_stride2`, not by the convolution.
        let conv = Conv2dConfig {
            padding: 0,
            stride: 2,
            ..Default::default()
        };
        let half = dim / 2;
        let bn = vb.pp("bn");
        Ok(Self {
            proj1: candle_nn::conv2d(3, half, 3, conv, vb.pp("proj1"))?,
            bn_weight: bn.get_with_hints(half, "weight", Init::Const(1.0))?,
            bn_bias: bn.get_with_hints(half, "bias", Init::Const(0.0))?,
            running_mean: bn
                .get_with_hints(half, "running_mean", Init::Const(0.0))?
                .detach(),
            running_var: bn
                .get_with_hints(half, "running_var", Init::Const(1.0))?
                .detach(),
            proj2: candle_nn::conv2d(half, dim, 3, conv, vb.pp("proj2"))?,
            norm: LayerNorm::new(dim, vb.pp("norm"))?,
        })
    }

    /// Images b×3×H×W → tokens b×(h·w)×D (row-major over the grid) and the
    /// grid `(h, w)`.
    pub fn forward(&self, images: &Tensor) -> Result<(Tensor, (usize, usize))> {
        let x = conv3x3_stride2(&self.proj1, images)?;
        let per_channel = |t: &Tensor| t.reshape((1, (), 1, 1));
        let scale = self
            .bn_weight
            .broadcast_div(&(&self.running_var + EPS)?.sqrt()?)?;
        let x = x
            .broadcast_sub(&per_channel(&self.running_mean)?)?
            .broadcast_mul(&per_channel(&scale)?)?
            .broadcast_add(&per_channel(&self.bn_bias)?)?
            .gelu_erf()?;
        let x = conv3x3_stride2(&self.proj2, &x)?;
        let (_, _, h, w) = x.dims4()?;
        let tokens = x.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
        Ok((self.norm.forward(&tokens)?, (h, w)))
    }
}

/// A 3×3 stride-2 convolution with zero padding 1, the padding made
/// explicit: one row and column before, and one after only where the size is
/// odd (where even, the conv never reads it). Then neither axis needs the
/// transposed convolution's output padding in the backward, which matters
/// because candle (0.11) derives that padding from the height alone and
/// applies it to both axes: with padding inside the conv, an image whose
/// height and width differ in parity gets a wrongly shaped gradient.
fn conv3x3_stride2(conv: &Conv2d, x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let x = x.pad_with_zeros(2, 1, h % 2)?.pad_with_zeros(3, 1, w % 2)?;
    conv.forward(&x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::candle::test_util::var;

    fn conv(weight: &Tensor, bias: &Tensor, padding: usize) -> Conv2d {
        let config = Conv2dConfig {
            padding,
            stride: 2,
            ..Default::default()
        };
        Conv2d::new(weight.clone(), Some(bias.clone()), config)
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        values.iter().map(|v| v.to_bits()).collect()
    }

    /// Forward and gradients for every parity of height and width against
    /// candle's padded convolution on the input grown to even sizes with a
    /// zero row and column (the same outputs, since the padding there was
    /// zeros too, and a backward candle gets right: both axes even). The
    /// same products in the same order: the same bits.
    #[test]
    fn conv3x3_stride2_is_padded_conv_for_every_parity() {
        for (h, w) in [(6, 6), (6, 7), (7, 6), (7, 7)] {
            let [x, weight, bias] = [var(&[2, 3, h, w], 1), var(&[4, 3, 3, 3], 2), var(&[4], 3)];
            let y = conv3x3_stride2(&conv(&weight, &bias, 0), &x).unwrap();
            let grown = x.pad_with_zeros(2, 0, h % 2).unwrap();
            let grown = grown.pad_with_zeros(3, 0, w % 2).unwrap();
            let want = conv(&weight, &bias, 1).forward(&grown).unwrap();
            assert_eq!(y.dims(), want.dims(), "{h}x{w}: shape");
            assert_eq!(bits(&y), bits(&want), "{h}x{w}: forward");

            let mix = var(y.dims(), 4);
            let loss = |t: Tensor| (t * mix.as_tensor()).unwrap().sum_all().unwrap();
            let grads = loss(y).backward().unwrap();
            let want_grads = loss(want).backward().unwrap();
            for v in [&x, &weight, &bias] {
                let (got, want) = (grads.get(v).unwrap(), want_grads.get(v).unwrap());
                assert_eq!(got.dims(), want.dims(), "{h}x{w}: gradient shape");
                assert_eq!(bits(got), bits(want), "{h}x{w}: gradient");
            }
        }
    }
}
