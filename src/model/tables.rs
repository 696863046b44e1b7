//! Per-offset tables built from the weights: the position bias of every
//! block and the PointConv weight net of every merge (spec §5, §7).
//!
//! They depend on the input only through the grid size (which offsets
//! exist), so the model caches them with the other per-grid data, unless
//! they would be large (huge inputs on wide models): then each block builds
//! its own table as it runs.

use rayon::prelude::*;

use super::weights::{BlockWeights, MergeWeights, ModelWeights};
use crate::error::Result;
use crate::ops::pointconv_merge::{INNER_CHANNELS, weight_net_table};
use crate::ops::rel_pos::OffsetTable;

/// Largest table set cached per grid size.
const CACHE_LIMIT_BYTES: usize = 64 << 20;

/// Every table of a model for one grid size.
#[derive(Debug)]
pub struct PositionTables {
    /// `[stage][block]`: heads×rows position bias.
    pub bias: Vec<Vec<Vec<f32>>>,
    /// `[stage]`: 4×rows weight net of the stage's merge, if it has one.
    pub weight_net: Vec<Option<Vec<f32>>>,
}

/// The position-bias table `P_t(f)` of one block: heads×rows.
///
/// # Errors
/// Shape errors when the block's `pos_embed` is not 5 → heads.
pub fn bias_table(block: &BlockWeights, offsets: &OffsetTable) -> Result<Vec<f32>> {
    offsets.apply(&block.attn.pos_embed)
}

/// The weight-net table of one merge: 4×rows.
///
/// # Errors
/// Shape errors when the weight net is not 5 → 4 with LayerNorm(4).
pub fn merge_table(merge: &MergeWeights, offsets: &OffsetTable) -> Result<Vec<f32>> {
    weight_net_table(offsets, &merge.weight_net, &merge.weight_norm)
}

impl PositionTables {
    /// Builds every table for `offsets`, or `None` when they would take more
    /// than the cache limit (or a table cannot be built: the uncached path
    /// then reports the error).
    pub fn build(weights: &ModelWeights, offsets: &OffsetTable) -> Option<Self> {
        let columns: usize = weights
            .stages
            .iter()
            .map(|st| {
                let heads: usize = st.blocks.iter().map(|b| b.attn.pos_embed.out_dim).sum();
                heads + st.merge.as_ref().map_or(0, |_| INNER_CHANNELS)
            })
            .sum();
        if columns * offsets.len() * size_of::<f32>() > CACHE_LIMIT_BYTES {
            return None;
        }
        let bias = weights
            .stages
            .iter()
            .map(|st| {
                st.blocks
                    .par_iter()
                    .map(|b| bias_table(b, offsets))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()
            .ok()?;
        let weight_net = weights
            .stages
            .iter()
            .map(|st| {
                st.merge
                    .as_ref()
                    .map(|m| merge_table(m, offsets))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()
            .ok()?;
        Some(Self { bias, weight_net })
    }
}
