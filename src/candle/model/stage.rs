//! One stage of the candle model: layout (this crate's, on the host) →
//! reorder → blocks → importance, selection and PointConv merge.

use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::block::Block;
use super::layers::{LayerNorm, Linear, linear};
use crate::candle::storage::tensor_values;
use crate::candle::{ClusterAttention, NeighbourSlots, PointConvMerge};
use crate::config::AffConfig;
use crate::model::{Attention, GridGeometry, StageLayout, plan_stage_layout};
use crate::ops::clustering::KeyScope;
use crate::ops::neighbourhood::Neighbourhood;
use crate::ops::pointconv_merge::INNER_CHANNELS;
use crate::ops::token_selection::select_tokens;

/// Tokens between stages: features (b×n×c, differentiable) and their
/// positions (b×n×2 on the host: integers, no gradient).
#[derive(Debug, Clone)]
pub struct StageTokens {
    pub feat: Tensor,
    pub pos: Vec<f32>,
}

/// What a stage produces.
#[derive(Debug, Clone)]
pub struct StageOutput {
    /// The tokens after the blocks, in the stage's (clustered) order.
    pub before_merge: StageTokens,
    /// The merged tokens for the next stage; `None` after the last stage.
    pub merged: Option<StageTokens>,
}

/// Where a stage runs: the model's configuration, the stage-0 grid's
/// geometry and the clustering keys' scope.
pub(crate) struct StageContext<'a> {
    pub config: &'a AffConfig,
    pub geometry: Arc<GridGeometry>,
    pub scope: KeyScope,
}

#[derive(Debug, Clone)]
pub(crate) struct Stage {
    index: usize,
    heads: usize,
    blocks: Vec<Block>,
    merge: Option<Merge>,
}

/// Importance and PointConv merge ending a stage (spec §7).
#[derive(Debug, Clone)]
struct Merge {
    prob_net: Linear,
    /// The weight net: Linear(5 → 4) and LayerNorm(4), as the op takes them.
    net_weight: Tensor,
    net_bias: Tensor,
    net_norm_weight: Tensor,
    net_norm_bias: Tensor,
    norm: LayerNorm,
    linear: Linear,
}

impl Stage {
    /// Stage `s` of `config` under `vb` (the model root).
    pub fn new(config: &AffConfig, s: usize, vb: &VarBuilder) -> Result<Self> {
        let dim = config.embed_dim[s];
        let heads = config.num_heads[s];
        let layer = vb.pp(format!("layers.{s}"));
        let blocks = (0..config.depths[s])
            .map(|j| {
                Block::new(
                    dim,
                    heads,
                    config.mlp_hidden(s),
                    config.layer_scale,
                    layer.pp(format!("blocks.{j}")),
                )
            })
            .collect::<Result<_>>()?;
        let merge = if s + 1 < config.num_stages() {
            let down = layer.pp("downsample");
            let (net, net_norm) = (down.pp("weight_net.0"), down.pp("weight_net.1"));
            let wide = INNER_CHANNELS * dim;
            Some(Merge {
                prob_net: linear(dim, 1, layer.pp("prob_net"))?,
                net_weight: net.get_with_hints(
                    (INNER_CHANNELS, 5),
                    "weight",
                    Init::Randn {
                        mean: 0.0,
                        stdev: 0.02,
                    },
                )?,
                net_bias: net.get_with_hints(INNER_CHANNELS, "bias", Init::Const(0.0))?,
                net_norm_weight: net_norm.get_with_hints(
                    INNER_CHANNELS,
                    "weight",
                    Init::Const(1.0),
                )?,
                net_norm_bias: net_norm.get_with_hints(INNER_CHANNELS, "bias", Init::Const(0.0))?,
                norm: LayerNorm::new(wide, down.pp("norm"))?,
                linear: linear(wide, config.embed_dim[s + 1], down.pp("linear"))?,
            })
        } else {
            None
        };
        Ok(Self {
            index: s,
            heads,
            blocks,
            merge,
        })
    }

    /// The stage on `input` (b×n×c features at b×n×2 positions).
    pub fn forward(&self, input: &StageTokens, ctx: &StageContext) -> Result<StageOutput> {
        let (b, n, c) = input.feat.dims3()?;
        let layout = plan_stage_layout(
            ctx.config,
            self.index,
            &input.pos,
            b,
            n,
            Arc::clone(&ctx.geometry),
            ctx.scope,
        )
        .map_err(candle_core::Error::wrap)?;
        let mut x = reorder(&input.feat, &layout)?;
        let (nbhd, rows) = op_neighbourhood(&layout);
        // One set of slots for the attention and the merge: one inverse.
        // The CUDA kernels read the positions (a shared neighbourhood's
        // images share them: the first image's).
        let pos = layout.pos[..nbhd.images * n * 2].to_vec();
        let mut slots =
            NeighbourSlots::new(nbhd, rows, ctx.geometry.offsets.clone())?.with_positions(pos)?;
        if let Attention::Clustered(cl) = &layout.attention {
            // On a GPU: the tiled attention kernel.
            slots = slots.with_cluster_size(cl.clustering.cluster_size)?;
        }
        let attention = ClusterAttention::new(&slots, self.heads)?;
        for block in &self.blocks {
            x = block.forward(&x, &attention)?;
        }
        let merged = match &self.merge {
            None => None,
            Some(merge) => Some(merge.forward(&x, &layout, ctx, self.index, &slots)?),
        };
        debug_assert_eq!(x.dims3()?, (b, n, c));
        Ok(StageOutput {
            before_merge: StageTokens {
                feat: x,
                pos: layout.pos,
            },
            merged,
        })
    }
}

impl Merge {
    /// Importance, the selection of the kept tokens by the detached score,
    /// and the merge over the stage's neighbour `slots`, on `x` (b×n×c
    /// after the blocks, in the order of `layout`).
    fn forward(
        &self,
        x: &Tensor,
        layout: &StageLayout,
        ctx: &StageContext,
        s: usize,
        slots: &NeighbourSlots,
    ) -> Result<StageTokens> {
        let (b, n, _) = x.dims3()?;
        let importance = sigmoid(&self.prob_net.forward(x)?)?;
        let score = tensor_values(&importance.detach())?;
        let selection = select_tokens(
            &layout.pos,
            &score,
            b,
            n,
            2 << s,
            ctx.geometry.grid,
            ctx.config.alpha as f32,
            ctx.config.ds_rate,
        )
        .map_err(candle_core::Error::wrap)?;
        let pos = selection.kept_positions(&layout.pos, n);
        let merge = PointConvMerge::new(slots, selection.order, b)?;
        let merged = merge.forward(
            x,
            &importance,
            &self.net_weight,
            &self.net_bias,
            &self.net_norm_weight,
            &self.net_norm_bias,
        )?;
        let feat = self.linear.forward(&self.norm.forward(&merged)?)?;
        Ok(StageTokens { feat, pos })
    }
}

/// `1 / (1 + e^−x)`, in candle's differentiable ops.
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    (x.to_dtype(DType::F32)?.neg()?.exp()? + 1.0)?
        .recip()?
        .to_dtype(dtype)
}

/// `feat` (b×n×c) in the layout's token order.
fn reorder(feat: &Tensor, layout: &StageLayout) -> Result<Tensor> {
    if let Attention::Global(_) = layout.attention {
        return Ok(feat.clone());
    }
    let (b, n, c) = feat.dims3()?;
    let rows: Vec<u32> = (0..b)
        .flat_map(|img| (0..n).map(move |r| (img * n + layout.source(img, r)) as u32))
        .collect();
    let rows = Tensor::from_vec(rows, b * n, feat.device())?;
    feat.reshape((b * n, c))?
        .index_select(&rows, 0)?
        .reshape((b, n, c))
}

/// The neighbourhood and offset rows the ops take: a global stage's one
/// neighbourhood holds every image's rows (positions differ per image), so
/// it is spelled out per image.
fn op_neighbourhood(layout: &StageLayout) -> (Neighbourhood, Vec<u32>) {
    match &layout.attention {
        Attention::Clustered(cl) => (cl.nbhd.clone(), cl.bias_rows.clone()),
        Attention::Global(nbhd) => {
            let b = layout.batch;
            let per_image = Neighbourhood {
                images: b,
                idx: nbhd.idx.repeat(b),
                mask: nbhd.mask.as_ref().map(|m| m.repeat(b)),
                ..nbhd.clone()
            };
            (per_image, layout.bias_rows.clone())
        }
    }
}
