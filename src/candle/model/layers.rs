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
        let conv = Conv2dConfig {
            padding: 1,
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
        let x = self.proj1.forward(images)?;
        let per_channel = |t: &Tensor| t.reshape((1, (), 1, 1));
        let scale = self
            .bn_weight
            .broadcast_div(&(&self.running_var + EPS)?.sqrt()?)?;
        let x = x
            .broadcast_sub(&per_channel(&self.running_mean)?)?
            .broadcast_mul(&per_channel(&scale)?)?
            .broadcast_add(&per_channel(&self.bn_bias)?)?
            .gelu_erf()?;
        let x = self.proj2.forward(&x)?;
        let (_, _, h, w) = x.dims4()?;
        let tokens = x.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
        Ok((self.norm.forward(&tokens)?, (h, w)))
    }
}
