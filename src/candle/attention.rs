//! Cluster attention as a candle custom op (see [`ClusterAttention`]).

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, bail};

use super::layout::{NeighbourSlots, SlotLayout};
use super::storage::{f32_values, pack_params, storage_of, tensor_of, tensor_values};
use crate::io::F32Buffer;
use crate::ops::Linear;
use crate::ops::cluster_attention::backward::{AttentionGradInputs, cluster_attention_backward};
use crate::ops::cluster_attention::{AttentionInputs, cluster_attention_with_lse};

#[cfg(feature = "candle-cuda")]
mod cuda;

const OP: &str = "autofocus cluster_attention";

/// One stage's cluster attention (spec §6) for candle tensors: who attends
/// to whom is fixed at construction (a stage layout), the tensors are the
/// arguments of [`ClusterAttention::forward`], and the result is
/// differentiable in all of them.
///
/// ```
/// # use autofocus::candle::{ClusterAttention, NeighbourSlots};
/// # use autofocus::ops::clustering::grid_positions;
/// # use autofocus::ops::neighbourhood::Neighbourhood;
/// # use autofocus::ops::rel_pos::OffsetTable;
/// # use candle_core::{Device, Tensor, Var};
/// # fn main() -> candle_core::Result<()> {
/// // Global attention over a 4×4 grid, 2 heads of 8 channels.
/// let (n, heads, c) = (16, 2, 16);
/// let offsets = OffsetTable::new(4, 4, None);
/// let bias_rows = vec![0u32; n * n]; // rel_pos::neighbour_rows gives the real ones
/// // The tokens' positions are read by the CUDA kernels only.
/// let slots = NeighbourSlots::new(Neighbourhood::global(n), bias_rows, offsets)?
///     .with_positions(grid_positions(4, 4))?;
/// let attention = ClusterAttention::new(&slots, heads)?;
/// let dev = Device::Cpu;
/// let q = Var::randn(0f32, 1.0, (1, n, c), &dev)?;
/// let kv = Var::randn(0f32, 1.0, (1, n, 2 * c), &dev)?;
/// let (w, b) = (Tensor::zeros((heads, 5), candle_core::DType::F32, &dev)?, Tensor::zeros(heads, candle_core::DType::F32, &dev)?);
/// let (blank_k, blank_v) = (Tensor::zeros(c, candle_core::DType::F32, &dev)?, Tensor::zeros(c, candle_core::DType::F32, &dev)?);
/// let out = attention.forward(&q, &kv, &w, &b, &blank_k, &blank_v)?; // 1 × n × c
/// let grads = out.sum_all()?.backward()?;
/// let dq = grads.get(&q).expect("q is a variable");
/// assert_eq!(dq.dims(), [1, n, c]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ClusterAttention {
    layout: Arc<AttentionLayout>,
}

/// What does not change from call to call, and has no gradient.
#[derive(Debug)]
struct AttentionLayout {
    /// The neighbourhood and its bias-table rows.
    slots: Arc<SlotLayout>,
    heads: usize,
}

impl ClusterAttention {
    /// Attention over `slots` (who attends to whom, with each slot's
    /// position-bias row) with `heads` heads. The inverse neighbourhood the
    /// backward gathers over is built by the first backward, once per
    /// `slots` (shared with the merge that uses the same slots).
    ///
    /// # Errors
    /// No heads.
    pub fn new(slots: &NeighbourSlots, heads: usize) -> Result<Self> {
        if heads == 0 {
            bail!("{OP}: `heads` must be at least 1");
        }
        Ok(Self {
            layout: Arc::new(AttentionLayout {
                slots: Arc::clone(&slots.0),
                heads,
            }),
        })
    }

    /// The attention's output, b×n×c (heads concatenated, before `proj`),
    /// for queries `q` (b×n×c, unscaled), keys and values `kv` (b×n×2c, the
    /// published `kv` layer's layout), the position-bias layer `pos_weight`
    /// (heads×5) and `pos_bias` (heads values), and the blank token's
    /// `blank_k` and `blank_v` (c values each; vectors in any shape). f32, f16 or bf16; the
    /// parameters in one dtype.
    ///
    /// # Errors
    /// A shape that disagrees with the others or with the layout (the
    /// message names the tensor, the expected and the found shape), or a
    /// dtype the op does not take.
    pub fn forward(
        &self,
        q: &Tensor,
        kv: &Tensor,
        pos_weight: &Tensor,
        pos_bias: &Tensor,
        blank_k: &Tensor,
        blank_v: &Tensor,
    ) -> Result<Tensor> {
        let h = self.layout.heads;
        let (_, _, c) = q.dims3()?;
        let params = pack_params(
            OP,
            ("pos_weight", pos_weight, [h, 5], "heads × offset features"),
            [
                ("pos_bias", pos_bias, h),
                ("blank_k", blank_k, c),
                ("blank_v", blank_v, c),
            ],
        )?
        // In f32 whatever the tensors' dtype: the kernels read them so.
        .to_dtype(DType::F32)?;
        let op = AttentionOp {
            layout: Arc::clone(&self.layout),
            lse: Mutex::new(None),
        };
        q.contiguous()?
            .apply_op3_arc(&kv.contiguous()?, &params, Arc::new(Box::new(op)))
    }
}

/// One call: the forward saves its log-sum-exp here for the backward.
struct AttentionOp {
    layout: Arc<AttentionLayout>,
    lse: Mutex<Option<Vec<f32>>>,
}

/// The small parameters, split out of the packed input.
struct Params<'a> {
    bias_table: Vec<f32>,
    blank_k: &'a [f32],
    blank_v: &'a [f32],
}

impl AttentionOp {
    /// Checks the shapes against each other and the layout; returns
    /// (batch, tokens, channels).
    fn check(&self, q: &[usize], kv: &[usize], params: usize) -> Result<(usize, usize, usize)> {
        let layout = &self.layout;
        let (b, n, c) = layout.slots.check_tokens(OP, "q", q)?;
        if c % layout.heads != 0 {
            bail!(
                "{OP}: `q` has {c} channels, not a multiple of the {} heads",
                layout.heads
            );
        }
        if kv != [b, n, 2 * c] {
            bail!(
                "{OP}: `kv` must have shape {:?}, found {kv:?}",
                [b, n, 2 * c]
            );
        }
        if params != 6 * layout.heads + 2 * c {
            bail!(
                "{OP}: packed parameters of {params} values, expected {}",
                6 * layout.heads + 2 * c
            );
        }
        Ok((b, n, c))
    }

    fn params<'a>(&self, packed: &'a [f32], c: usize) -> Result<Params<'a>> {
        let h = self.layout.heads;
        let (pos_weight, rest) = packed.split_at(5 * h);
        let (pos_bias, rest) = rest.split_at(h);
        let (blank_k, blank_v) = rest.split_at(c);
        let layer = Linear {
            weight: F32Buffer::owned(pos_weight.to_vec()),
            bias: Some(F32Buffer::owned(pos_bias.to_vec())),
            in_dim: 5,
            out_dim: h,
        };
        Ok(Params {
            bias_table: self
                .layout
                .slots
                .offsets
                .apply(&layer)
                .map_err(candle_core::Error::wrap)?,
            blank_k,
            blank_v,
        })
    }

    fn inputs<'a>(
        &'a self,
        q: &'a [f32],
        kv: &'a [f32],
        params: &'a Params<'a>,
        bias_rows: &'a [u32],
        (b, n, c): (usize, usize, usize),
    ) -> AttentionInputs<'a> {
        let h = self.layout.heads;
        let d = c / h;
        AttentionInputs {
            q,
            q_scale: (d as f32).powf(-0.5),
            kv,
            nbhd: &self.layout.slots.nbhd,
            bias_rows,
            bias_table: &params.bias_table,
            blank_k: params.blank_k,
            blank_v: params.blank_v,
            batch: b,
            tokens: n,
            heads: h,
            head_dim: d,
        }
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "autofocus-cluster-attention"
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
        let dims = self.check(l1.dims(), l2.dims(), l3.shape().elem_count())?;
        let q = f32_values(OP, "q", s1, l1)?;
        let kv = f32_values(OP, "kv", s2, l2)?;
        let packed = f32_values(OP, "parameters", s3, l3)?;
        let params = self.params(&packed, dims.2)?;
        let bias_rows = self.layout.slots.rows_for(dims.0);
        let inputs = self.inputs(&q, &kv, &params, &bias_rows, dims);
        let (out, lse) = cluster_attention_with_lse(&inputs).map_err(candle_core::Error::wrap)?;
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::msg("lse lock poisoned"))? = Some(lse);
        Ok((storage_of(out, s1.dtype())?, Shape::from(l1.dims())))
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
        let dims = self.check(l1.dims(), l2.dims(), l3.shape().elem_count())?;
        let inputs = [(s1, l1), (s2, l2), (s3, l3)];
        let out = crate::candle::cuda::with_element!(
            OP, s1.dtype(), T => self.cuda_forward::<T>(inputs, dims)?
        );
        Ok((out, Shape::from(l1.dims())))
    }

    fn bwd(
        &self,
        q: &Tensor,
        kv: &Tensor,
        packed: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = self.check(q.dims(), kv.dims(), packed.elem_count())?;
        #[cfg(feature = "candle-cuda")]
        if let candle_core::Device::Cuda(dev) = q.device() {
            let [dq, dkv, dparams] =
                self.cuda_backward(dev, [q, kv, packed, out, grad_out], dims)?;
            return Ok((Some(dq), Some(dkv), Some(dparams)));
        }
        let Some(lse) = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::msg("lse lock poisoned"))?
            .clone()
        else {
            bail!("{OP}: backward before forward")
        };
        let (q_values, kv_values) = (tensor_values(q)?, tensor_values(kv)?);
        let packed_values = tensor_values(packed)?;
        let params = self.params(&packed_values, dims.2)?;
        let bias_rows = self.layout.slots.rows_for(dims.0);
        let inputs = self.inputs(&q_values, &kv_values, &params, &bias_rows, dims);
        let (out, grad_out) = (tensor_values(out)?, tensor_values(grad_out)?);
        let grads = cluster_attention_backward(&AttentionGradInputs {
            forward: &inputs,
            out: &out,
            lse: &lse,
            grad_out: &grad_out,
            inverse: self.layout.slots.inverse(),
            offsets: &self.layout.slots.offsets,
        })
        .map_err(candle_core::Error::wrap)?;
        let (b, n, c) = dims;
        let packed_grad: Vec<f32> = [
            grads.pos_weight,
            grads.pos_bias,
            grads.blank_k,
            grads.blank_v,
        ]
        .concat();
        Ok((
            Some(tensor_of(grads.q, &[b, n, c], q.dtype(), q.device())?),
            Some(tensor_of(
                grads.kv,
                &[b, n, 2 * c],
                kv.dtype(),
                kv.device(),
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
