//! One transformer block (spec §6): `x += g1·attn(LN1(x))`, `x += g2·MLP(LN2(x))`.

use super::weights::{AttentionWeights, BlockWeights};
use crate::error::Result;
use crate::io::F32Buffer;
use crate::ops::cluster_attention::{AttentionInputs, cluster_attention};
use crate::ops::linear::Epilogue;
use crate::ops::neighbourhood::Neighbourhood;
use crate::profile;

/// What the blocks of a stage share: neighbourhoods and relative offsets.
#[derive(Debug, Clone, Copy)]
pub struct StageGeometry<'a> {
    pub batch: usize,
    pub tokens: usize,
    pub nbhd: &'a Neighbourhood,
    /// b×n×m offset-table row of every neighbour slot.
    pub bias_rows: &'a [u32],
}

impl AttentionWeights {
    fn heads(&self) -> usize {
        self.pos_embed.out_dim
    }

    /// The cluster attention of `y` (b×n×c, already normalised), after
    /// `proj`, with the block's position-bias table (heads×rows).
    fn forward(&self, y: &[f32], geo: &StageGeometry<'_>, bias_table: &[f32]) -> Result<Vec<f32>> {
        let rows = geo.batch * geo.tokens;
        let c = self.q.out_dim;
        let heads = self.heads();
        let head_dim = c / heads;
        let (q, kv) = profile::timed("attn.qkv", || -> Result<_> {
            Ok((self.q.forward(y, rows)?, self.kv.forward(y, rows)?))
        })?;
        let _t = profile::scope("attn.cluster_attention");
        let attended = cluster_attention(&AttentionInputs {
            q: &q,
            q_scale: (head_dim as f64).powf(-0.5) as f32,
            kv: &kv,
            nbhd: geo.nbhd,
            bias_rows: geo.bias_rows,
            bias_table,
            blank_k: &self.blank_k,
            blank_v: &self.blank_v,
            batch: geo.batch,
            tokens: geo.tokens,
            heads,
            head_dim,
        })?;
        drop(_t);
        let _t = profile::scope("attn.proj");
        self.proj.forward(&attended, rows)
    }
}

/// `x += gamma · delta` row by row (`gamma` absent: plain residual).
fn add_scaled(x: &mut [f32], delta: &[f32], gamma: Option<&F32Buffer>) {
    match gamma {
        None => x.iter_mut().zip(delta).for_each(|(a, d)| *a += d),
        Some(g) => {
            for (xr, dr) in x.chunks_exact_mut(g.len()).zip(delta.chunks_exact(g.len())) {
                for ((a, d), gv) in xr.iter_mut().zip(dr).zip(g.iter()) {
                    *a += gv * d;
                }
            }
        }
    }
}

impl BlockWeights {
    /// Runs the block on `x` (b×n×c, in the stage's token order) in place,
    /// with its position-bias table (heads×rows, see [`super::bias_table`]).
    ///
    /// # Errors
    /// Shape errors from the ops when `x` or the geometry disagree.
    pub fn forward(
        &self,
        x: &mut [f32],
        geo: &StageGeometry<'_>,
        bias_table: &[f32],
    ) -> Result<()> {
        let rows = geo.batch * geo.tokens;
        let normed = profile::timed("layer_norm", || self.norm1.forward(x))?;
        let attended = self.attn.forward(&normed, geo, bias_table)?;
        profile::timed("residual", || {
            add_scaled(x, &attended, self.gamma1.as_ref())
        });
        let normed = profile::timed("layer_norm", || self.norm2.forward(x))?;
        let hidden = profile::timed("mlp.fc1+gelu", || {
            self.fc1.forward_with(&normed, rows, Epilogue::Gelu)
        })?;
        let mlp = profile::timed("mlp.fc2", || self.fc2.forward(&hidden, rows))?;
        profile::timed("residual", || add_scaled(x, &mlp, self.gamma2.as_ref()));
        Ok(())
    }
}
