//! The PointConv merge as a candle custom op (see [`PointConvMerge`]).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, bail};

use super::layout::{NeighbourSlots, SlotLayout};
use super::storage::{f32_values, pack_params, storage_of, tensor_of, tensor_values};
use crate::io::F32Buffer;
use crate::ops::pointconv_merge::backward::{MergeGradInputs, pointconv_merge_backward};
use crate::ops::pointconv_merge::{INNER_CHANNELS, MergeInputs, pointconv_merge, weight_net_table};
use crate::ops::{LayerNorm, Linear};

#[cfg(feature = "candle-cuda")]
mod cuda;

const OP: &str = "autofocus pointconv_merge";

/// The weight net's parameters: Linear(5 → 4) weight and bias, LayerNorm(4)
/// weight and bias.
const NET_PARAMS: usize = 5 * INNER_CHANNELS + 3 * INNER_CHANNELS;

/// One stage's PointConv merge (spec §7) for candle tensors: the
/// neighbourhoods, the kept centres and the offset rows are fixed at
/// construction (a stage layout and its token selection), the features,
/// importance and weight net are the arguments of
/// [`PointConvMerge::forward`], and the result is differentiable in all of
/// them. The importance's gradient is how `prob_net` learns: the selection
/// used the detached score, the merge weights use `p`.
#[derive(Debug, Clone)]
pub struct PointConvMerge {
    layout: Arc<MergeLayout>,
}

#[derive(Debug)]
struct MergeLayout {
    /// The neighbourhood and its weight-table rows.
    slots: Arc<SlotLayout>,
    /// batch×n' centres (indices into each image's n tokens).
    centres: Vec<u32>,
    batch: usize,
    /// The centres uploaded to each GPU the merge has run on.
    #[cfg(feature = "candle-cuda")]
    centres_on_gpu: super::cuda::GpuCache<crate::gpu::Buffer<i32>>,
}

impl PointConvMerge {
    /// The merge over `slots` (each centre's neighbours, with each slot's
    /// weight-net row) of the `centres` kept in each image of a batch of
    /// `batch` (batch×n', as the selection gives them).
    ///
    /// # Errors
    /// When the centres do not split into `batch` images of tokens below n,
    /// or the slots are per image for another batch.
    pub fn new(slots: &NeighbourSlots, centres: Vec<u32>, batch: usize) -> Result<Self> {
        let nbhd = slots.neighbourhood();
        if batch == 0
            || !centres.len().is_multiple_of(batch)
            || centres.iter().any(|&i| i as usize >= nbhd.tokens)
        {
            bail!(
                "{OP}: `centres` must be {batch} images' indices below {} tokens, found {} values",
                nbhd.tokens,
                centres.len()
            );
        }
        if nbhd.images != 1 && nbhd.images != batch {
            bail!(
                "{OP}: the neighbourhood has {} images, the centres a batch of {batch}",
                nbhd.images
            );
        }
        Ok(Self {
            layout: Arc::new(MergeLayout {
                slots: Arc::clone(&slots.0),
                centres,
                batch,
                #[cfg(feature = "candle-cuda")]
                centres_on_gpu: Default::default(),
            }),
        })
    }

    /// The merged features `u`, b×n'×4c (inner-channel major, before the
    /// merge's linear layer), of the token features `feat` (b×n×c) and their
    /// importance `p` (b×n, or b×n×1), with the weight net `net_weight`
    /// (4×5, out × in), `net_bias`, `norm_weight` and `norm_bias` (4
    /// values each, any shape). f32, f16 or bf16; the weight net in one
    /// dtype.
    ///
    /// # Errors
    /// A shape that disagrees with the others or with the layout (the
    /// message names the tensor, the expected and the found shape), or a
    /// dtype the op does not take.
    pub fn forward(
        &self,
        feat: &Tensor,
        importance: &Tensor,
        net_weight: &Tensor,
        net_bias: &Tensor,
        norm_weight: &Tensor,
        norm_bias: &Tensor,
    ) -> Result<Tensor> {
        let (b, n, _) = feat.dims3()?;
        if importance.elem_count() != b * n {
            bail!(
                "{OP}: `importance` must hold {b} × {n} values (one per token), found shape {:?}",
                importance.dims()
            );
        }
        let params = pack_params(
            OP,
            ("net_weight", net_weight, [INNER_CHANNELS, 5], "out × in"),
            [
                ("net_bias", net_bias, INNER_CHANNELS),
                ("norm_weight", norm_weight, INNER_CHANNELS),
                ("norm_bias", norm_bias, INNER_CHANNELS),
            ],
        )?
        // In f32 whatever the tensors' dtype: the kernels read them so.
        .to_dtype(DType::F32)?;
        let op = MergeOp {
            layout: Arc::clone(&self.layout),
        };
        feat.contiguous()?.apply_op3_arc(
            &importance
                .reshape((b, n))?
                .to_dtype(DType::F32)?
                .contiguous()?,
            &params,
            Arc::new(Box::new(op)),
        )
    }
}

struct MergeOp {
    layout: Arc<MergeLayout>,
}

/// The weight net, split out of the packed input.
struct WeightNet {
    linear: Linear,
    norm: LayerNorm,
    table: Vec<f32>,
}

impl MergeOp {
    /// Checks the shapes against each other and the layout; returns
    /// (batch, tokens, channels, kept centres per image).
    fn check(&self, feat: &[usize], importance: &[usize]) -> Result<(usize, usize, usize, usize)> {
        let layout = &self.layout;
        let (b, n, c) = layout.slots.check_tokens(OP, "feat", feat)?;
        if b != layout.batch {
            bail!(
                "{OP}: `feat` has a batch of {b}, the centres {} (shape {feat:?})",
                layout.batch
            );
        }
        if importance != [b, n] {
            bail!(
                "{OP}: `importance` must have shape {:?}, found {importance:?}",
                [b, n]
            );
        }
        Ok((b, n, c, layout.centres.len() / b))
    }

    fn weight_net(&self, packed: &[f32]) -> Result<WeightNet> {
        if packed.len() != NET_PARAMS {
            bail!(
                "{OP}: packed weight net of {} values, expected {NET_PARAMS}",
                packed.len()
            );
        }
        let (weight, rest) = packed.split_at(5 * INNER_CHANNELS);
        let (bias, rest) = rest.split_at(INNER_CHANNELS);
        let (norm_weight, norm_bias) = rest.split_at(INNER_CHANNELS);
        let linear = Linear {
            weight: F32Buffer::owned(weight.to_vec()),
            bias: Some(F32Buffer::owned(bias.to_vec())),
            in_dim: 5,
            out_dim: INNER_CHANNELS,
        };
        let norm = LayerNorm {
            weight: F32Buffer::owned(norm_weight.to_vec()),
            bias: F32Buffer::owned(norm_bias.to_vec()),
        };
        let table = weight_net_table(&self.layout.slots.offsets, &linear, &norm)
            .map_err(candle_core::Error::wrap)?;
        Ok(WeightNet {
            linear,
            norm,
            table,
        })
    }

    fn inputs<'a>(
        &'a self,
        feat: &'a [f32],
        importance: &'a [f32],
        net: &'a WeightNet,
        weight_rows: &'a [u32],
        (b, n, c): (usize, usize, usize),
    ) -> MergeInputs<'a> {
        MergeInputs {
            feat,
            importance,
            nbhd: &self.layout.slots.nbhd,
            centres: &self.layout.centres,
            weight_rows,
            weight_table: &net.table,
            batch: b,
            tokens: n,
            channels: c,
        }
    }
}

impl CustomOp3 for MergeOp {
    fn name(&self) -> &'static str {
        "autofocus-pointconv-merge"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, n, c, kept) = self.check(l1.dims(), l2.dims())?;
        let feat = f32_values(OP, "feat", s1, l1)?;
        let importance = f32_values(OP, "importance", s2, l2)?;
        let net = self.weight_net(&f32_values(OP, "weight net", s3, l3)?)?;
        let rows = self.layout.slots.rows_for(b);
        let inputs = self.inputs(&feat, &importance, &net, &rows, (b, n, c));
        let merged = pointconv_merge(&inputs).map_err(candle_core::Error::wrap)?;
        Ok((
            storage_of(merged, s1.dtype())?,
            Shape::from((b, kept, INNER_CHANNELS * c)),
        ))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = self.check(l1.dims(), l2.dims())?;
        let (b, _, c, kept) = dims;
        let inputs = [(s1, l1), (s2, l2), (s3, l3)];
        let merged = crate::candle::cuda::with_element!(
            OP, s1.dtype(), T => self.cuda_forward::<T>(inputs, dims)?
        );
        Ok((merged, Shape::from((b, kept, INNER_CHANNELS * c))))
    }

    fn bwd(
        &self,
        feat: &Tensor,
        importance: &Tensor,
        packed: &Tensor,
        _merged: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "candle-cuda")]
        if let candle_core::Device::Cuda(dev) = feat.device() {
            let dims = self.check(feat.dims(), importance.dims())?;
            let [df, dp, dnet] =
                self.cuda_backward(dev, [feat, importance, packed, grad_out], dims)?;
            return Ok((Some(df), Some(dp), Some(dnet)));
        }
        let (b, n, c, _) = self.check(feat.dims(), importance.dims())?;
        let (feat_values, importance_values) = (tensor_values(feat)?, tensor_values(importance)?);
        let net = self.weight_net(&tensor_values(packed)?)?;
        let rows = self.layout.slots.rows_for(b);
        let inputs = self.inputs(&feat_values, &importance_values, &net, &rows, (b, n, c));
        let grad_out = tensor_values(grad_out)?;
        let grads = pointconv_merge_backward(&MergeGradInputs {
            forward: &inputs,
            grad_out: &grad_out,
            inverse: self.layout.slots.inverse(),
            offsets: &self.layout.slots.offsets,
            weight_net: &net.linear,
            weight_norm: &net.norm,
        })
        .map_err(candle_core::Error::wrap)?;
        let packed_grad = [
            grads.net_weight,
            grads.net_bias,
            grads.norm_weight,
            grads.norm_bias,
        ]
        .concat();
        Ok((
            Some(tensor_of(
                grads.feat,
                feat.dims(),
                feat.dtype(),
                feat.device(),
            )?),
            Some(tensor_of(
                grads.importance,
                importance.dims(),
                importance.dtype(),
                importance.device(),
            )?),
            Some(tensor_of(
                packed_grad,
                packed.dims(),
                packed.dtype(),
                packed.device(),
            )?),
        ))
    }
}
