//! One transformer block (spec §6): LN → cluster attention → residual →
//! LN → MLP → residual, with optional layer scale.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::layers::{LayerNorm, Linear, linear};
use crate::candle::ClusterAttention;

#[derive(Debug, Clone)]
pub(crate) struct Block {
    norm1: LayerNorm,
    q: Linear,
    kv: Linear,
    proj: Linear,
    /// Linear(5 → heads) of the relative-position bias, as the op takes it.
    pos_weight: Tensor,
    pos_bias: Tensor,
    blank_k: Tensor,
    blank_v: Tensor,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    /// Layer-scale vectors, when the model has layer scale.
    gammas: Option<(Tensor, Tensor)>,
}

impl Block {
    /// Block of `dim` channels, `heads` heads and an MLP of `hidden`
    /// channels, under `vb` (`layers.S.blocks.J`); `layer_scale` is the
    /// layer-scale init (0: none).
    pub fn new(
        dim: usize,
        heads: usize,
        hidden: usize,
        layer_scale: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let attn = vb.pp("attn");
        let pos = attn.pp("pos_embed");
        let gammas = if layer_scale > 0.0 {
            let gamma = |name| vb.get_with_hints(dim, name, Init::Const(layer_scale));
            Some((gamma("gamma1")?, gamma("gamma2")?))
        } else {
            None
        };
        let blank = |name| {
            attn.get_with_hints(
                dim,
                name,
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )
        };
        Ok(Self {
            norm1: LayerNorm::new(dim, vb.pp("norm1"))?,
            q: linear(dim, dim, attn.pp("q"))?,
            kv: linear(dim, 2 * dim, attn.pp("kv"))?,
            proj: linear(dim, dim, attn.pp("proj"))?,
            pos_weight: pos.get_with_hints(
                (heads, 5),
                "weight",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            pos_bias: pos.get_with_hints(heads, "bias", Init::Const(0.0))?,
            blank_k: blank("blank_k")?,
            blank_v: blank("blank_v")?,
            norm2: LayerNorm::new(dim, vb.pp("norm2"))?,
            fc1: linear(dim, hidden, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(hidden, dim, vb.pp("mlp").pp("fc2"))?,
            gammas,
        })
    }

    /// The block on `x` (b×n×c in the stage's token order), attending as
    /// `attention` (the stage's layout) says.
    pub fn forward(&self, x: &Tensor, attention: &ClusterAttention) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let (q, kv) = (self.q.forward(&h)?, self.kv.forward(&h)?);
        let attended = attention.forward(
            &q,
            &kv,
            &self.pos_weight,
            &self.pos_bias,
            &self.blank_k,
            &self.blank_v,
        )?;
        let attended = self.proj.forward(&attended)?;
        let x = (x + self.scaled(attended, 0)?)?;
        let mlp = self.norm2.forward(&x)?;
        let mlp = self.fc2.forward(&self.fc1.forward_gelu(&mlp)?)?;
        &x + self.scaled(mlp, 1)?
    }

    /// `branch` times layer-scale vector `which` (0 or 1), if any.
    fn scaled(&self, branch: Tensor, which: usize) -> Result<Tensor> {
        match &self.gammas {
            None => Ok(branch),
            Some((g1, g2)) => branch.broadcast_mul(if which == 0 { g1 } else { g2 }),
        }
    }
}
