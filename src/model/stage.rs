//! One stage: layout → blocks → (importance, selection, PointConv merge).

use std::borrow::Cow;

use super::AutoFocusFormer;
use super::block::StageGeometry;
use super::layout::{StageLayout, plan_stage_layout};
use super::tables::{bias_table, merge_table};
use super::trace::{Trace, f32_tensor, i32_tensor, record};
use crate::error::{Error, Result, check_len};
use crate::ops::pointconv_merge::{MergeInputs, pointconv_merge};
use crate::ops::token_selection::{importance, select_tokens};
use crate::profile;

/// A batch of token sets between stages: `batch` images of `tokens` tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    pub batch: usize,
    pub tokens: usize,
    pub channels: usize,
    /// b×n×2 positions `(x, y)` in stage-0 token units.
    pub pos: Vec<f32>,
    /// b×n×c features.
    pub feat: Vec<f32>,
}

impl Tokens {
    /// Checks that the buffers agree with the sizes.
    ///
    /// # Errors
    /// [`Error::Shape`] naming the buffer that does not.
    pub fn validate(&self) -> Result<()> {
        let (b, n, c) = (self.batch, self.tokens, self.channels);
        check_len("tokens", "pos", &[b, n, 2], self.pos.len())?;
        check_len("tokens", "feat", &[b, n, c], self.feat.len())?;
        // Positions are ranked and used as grid cells: a NaN must not reach them.
        match crate::tensor::first_non_finite(&[b, n, 2], &self.pos) {
            None => Ok(()),
            Some((index, value)) => Err(Error::NonFinite {
                tensor: "tokens.pos".into(),
                index,
                value,
            }),
        }
    }
}

/// What a stage hands on: its output tokens, and the features before merging
/// (what a segmentation backbone outputs).
#[derive(Debug, Clone)]
pub struct StageResult {
    /// The next stage's input (for the last stage, its own output).
    pub output: Tokens,
    /// The tokens after the blocks, before merging, in the stage's order.
    pub before_merge: Tokens,
}

impl AutoFocusFormer {
    /// The layout of stage `s` for `tokens` on the stage-0 `grid`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a stage index out of range; op errors.
    pub fn stage_layout(
        &self,
        s: usize,
        tokens: &Tokens,
        grid: (usize, usize),
    ) -> Result<StageLayout> {
        tokens.validate()?;
        plan_stage_layout(
            self.config(),
            s,
            &tokens.pos,
            tokens.batch,
            tokens.tokens,
            self.geometry(grid),
            self.key_scope(),
        )
    }

    /// Runs stage `s` on `tokens` (stage-0 grid `grid`), recording into `trace`.
    ///
    /// # Errors
    /// [`Error::Shape`] when `tokens` does not have the stage's channels; op errors.
    pub fn run_stage(
        &self,
        s: usize,
        tokens: &Tokens,
        grid: (usize, usize),
        mut trace: Option<&mut Trace>,
    ) -> Result<StageResult> {
        let layout = profile::timed("layout", || self.stage_layout(s, tokens, grid))?;
        let c = self.config().embed_dim[s];
        if tokens.channels != c {
            return Err(Error::shape("stage", "feat channels", c, tokens.channels));
        }
        let (b, n) = (tokens.batch, tokens.tokens);
        record_layout(&mut trace, s, &layout);

        let mut feat = profile::timed("reorder", || layout.reorder_feat(&tokens.feat, c));
        record(
            &mut trace,
            || format!("stage{s}.blocks.in"),
            || f32_tensor(&[b, n, c], &feat),
        );
        for j in 0..self.weights.stages[s].blocks.len() {
            let _block = crate::nvtx::range_with(|| format!("block{j}"));
            self.run_block(s, j, &mut feat, &layout)?;
            record(
                &mut trace,
                || format!("stage{s}.block{j}.out"),
                || f32_tensor(&[b, n, c], &feat),
            );
        }
        let before_merge = Tokens {
            batch: b,
            tokens: n,
            channels: c,
            pos: layout.pos.clone(),
            feat,
        };
        let output = match self.weights.stages[s].merge {
            Some(_) => self.merge(s, &before_merge, &layout, trace.as_deref_mut())?,
            None => before_merge.clone(),
        };
        let (n_out, c_out) = (output.tokens, output.channels);
        record(
            &mut trace,
            || format!("stage{s}.out.pos"),
            || f32_tensor(&[b, n_out, 2], &output.pos),
        );
        record(
            &mut trace,
            || format!("stage{s}.out.feat"),
            || f32_tensor(&[b, n_out, c_out], &output.feat),
        );
        Ok(StageResult {
            output,
            before_merge,
        })
    }

    /// Runs block `j` of stage `s` in place on `feat` (b×n×c in the order of `layout`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an index out of range; shape errors.
    pub fn run_block(
        &self,
        s: usize,
        j: usize,
        feat: &mut [f32],
        layout: &StageLayout,
    ) -> Result<()> {
        let block = self
            .weights
            .stages
            .get(s)
            .and_then(|st| st.blocks.get(j))
            .ok_or_else(|| Error::InvalidArgument(format!("no block {j} in stage {s}")))?;
        let geo = StageGeometry {
            batch: layout.batch,
            tokens: layout.tokens,
            nbhd: layout.nbhd(),
            bias_rows: &layout.bias_rows,
        };
        let cached = layout
            .geometry
            .tables(&self.weights)
            .map(|t| t.bias[s][j].as_slice());
        let table = match cached {
            Some(table) => Cow::Borrowed(table),
            None => Cow::Owned(profile::timed("attn.bias_table", || {
                bias_table(block, &layout.geometry.offsets)
            })?),
        };
        block.forward(feat, &geo, &table)
    }

    /// Importance, token selection and PointConv merge at the end of stage
    /// `s`, on the tokens after its blocks (in the order of `layout`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when stage `s` has no merge; shape errors.
    pub fn merge(
        &self,
        s: usize,
        tokens: &Tokens,
        layout: &StageLayout,
        trace: Option<&mut Trace>,
    ) -> Result<Tokens> {
        let mut trace = trace;
        let trace = &mut trace;
        let w = self
            .weights
            .stages
            .get(s)
            .and_then(|st| st.merge.as_ref())
            .ok_or_else(|| Error::InvalidArgument(format!("stage {s} has no merge")))?;
        tokens.validate()?;
        if tokens.tokens != layout.tokens || tokens.batch != layout.batch {
            return Err(Error::shape(
                "merge",
                "tokens",
                [layout.batch, layout.tokens],
                [tokens.batch, tokens.tokens],
            ));
        }
        let offsets = &layout.geometry.offsets;
        let grid = layout.geometry.grid;
        let config = self.config();
        let (b, n, c) = (tokens.batch, tokens.tokens, tokens.channels);
        let prob_bias = w.prob_net.bias.as_ref().map_or(0.0, |bias| bias[0]);
        let importance = profile::timed("merge.importance", || {
            importance(&tokens.feat, &w.prob_net.weight, prob_bias, b * n, c)
        })?;
        record(
            trace,
            || format!("stage{s}.importance"),
            || f32_tensor(&[b, n, 1], &importance),
        );

        let stride = 2usize << s;
        let selection = profile::timed("merge.selection", || {
            select_tokens(
                &tokens.pos,
                &importance,
                b,
                n,
                stride,
                grid,
                config.alpha as f32,
                config.ds_rate,
            )
        })?;
        record(
            trace,
            || format!("stage{s}.merge.reserve_num"),
            || i32_tensor(&[1], [selection.reserve as i32]),
        );

        // The weight net GELU(LN(Linear(f))) for every offset.
        let cached = layout
            .geometry
            .tables(&self.weights)
            .and_then(|t| t.weight_net[s].as_deref());
        let weight_table = match cached {
            Some(table) => Cow::Borrowed(table),
            None => Cow::Owned(profile::timed("merge.weight_table", || {
                merge_table(w, offsets)
            })?),
        };
        let _t = profile::scope("merge.pointconv");
        let mut merged = pointconv_merge(&MergeInputs {
            feat: &tokens.feat,
            importance: &importance,
            nbhd: layout.nbhd(),
            centres: &selection.order,
            weight_rows: &layout.bias_rows,
            weight_table: &weight_table,
            batch: b,
            tokens: n,
            channels: c,
        })?;
        drop(_t);
        profile::timed("merge.norm", || w.norm.forward_in_place(&mut merged))?;
        let kept = selection.kept;
        let feat = profile::timed("merge.linear", || w.linear.forward(&merged, b * kept))?;
        let pos = selection.kept_positions(&tokens.pos, n);
        let out = Tokens {
            batch: b,
            tokens: kept,
            channels: w.linear.out_dim,
            pos,
            feat,
        };
        record(
            trace,
            || format!("stage{s}.merge.pos"),
            || f32_tensor(&[b, kept, 2], &out.pos),
        );
        record(
            trace,
            || format!("stage{s}.merge.feat"),
            || f32_tensor(&[b, kept, out.channels], &out.feat),
        );
        Ok(out)
    }
}

/// Records the clustering and neighbourhoods under the golden names.
fn record_layout(trace: &mut Option<&mut Trace>, s: usize, layout: &StageLayout) {
    let (b, n) = (layout.batch, layout.tokens);
    let global = layout.cluster_layout().is_none();
    record(
        trace,
        || format!("stage{s}.global_attn"),
        || i32_tensor(&[1], [global as i32]),
    );
    let Some(cl) = layout.cluster_layout() else {
        return;
    };
    let c = &cl.clustering;
    let (k, cs) = (c.clusters, c.cluster_size);
    let images = if c.batch == 1 { b } else { 1 };
    let tile = |v: &[u32]| -> Vec<i32> {
        v.iter()
            .map(|&x| x as i32)
            .collect::<Vec<_>>()
            .repeat(images)
    };
    record(
        trace,
        || format!("stage{s}.cluster.pos"),
        || f32_tensor(&[b, n, 2], &layout.pos),
    );
    record(
        trace,
        || format!("stage{s}.cluster.mean_pos"),
        || f32_tensor(&[b, k, 2], &c.means.repeat(images)),
    );
    record(
        trace,
        || format!("stage{s}.cluster.reorder"),
        || i32_tensor(&[b, n], tile(&c.reorder)),
    );
    record(
        trace,
        || format!("stage{s}.cluster.member_idx"),
        || {
            let members: Vec<i32> = (0..k * cs)
                .map(|m| if m < n { m as i32 } else { 0 })
                .collect();
            i32_tensor(&[b, k, cs], members.repeat(b))
        },
    );
    if c.is_padded() {
        record(
            trace,
            || format!("stage{s}.cluster.mask"),
            || {
                let mask: Vec<i32> = (0..k * cs).map(|m| (m < n) as i32).collect();
                i32_tensor(&[b, k, cs], mask.repeat(b))
            },
        );
    }
    record(
        trace,
        || format!("stage{s}.nearest_clusters"),
        || i32_tensor(&[b, n, cl.nnc], tile(&cl.nearest)),
    );
    let m = cl.nbhd.size;
    record(
        trace,
        || format!("stage{s}.nbhd.idx"),
        || i32_tensor(&[b, n, m], tile(&cl.nbhd.idx)),
    );
    if let Some(mask) = &cl.nbhd.mask {
        record(
            trace,
            || format!("stage{s}.nbhd.mask"),
            || {
                let mask: Vec<i32> = mask.iter().map(|&v| v as i32).collect();
                i32_tensor(&[b, n, m], mask.repeat(images))
            },
        );
    }
}
