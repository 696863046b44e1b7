//! The candle backend (feature `candle`): AFF's ops as candle custom ops,
//! with forward and backward, so that a candle model can train through them.
//!
//! - [`ClusterAttention`]: cluster attention (spec §6) with its
//!   relative-position bias and blank token, differentiable in `q`, `kv`,
//!   the position-bias layer and the blank token.
//! - [`PointConvMerge`]: the PointConv merge (spec §7), differentiable in
//!   the token features, their importance and the weight net.
//! - [`AutoFocusFormer`]: the whole model (classifier or segmentation
//!   backbone) from candle-nn's convolutions, the dense layers of `dense`
//!   (linear and LayerNorm as fused custom ops on the CPU, candle's ops
//!   elsewhere) and these ops, its parameters in a
//!   `VarMap` ([`load_varmap`] reads a checkpoint into one), trainable.
//!
//! The neighbourhoods and everything else that is an index (masks, bias
//! rows, inverse lists) come from this crate's layout ops and are carried
//! in the op: they have no gradient. On the CPU the ops run this crate's
//! CPU kernels (f32 inside; f16 and bf16 tensors are converted); the
//! backwards are [`crate::ops::cluster_attention::backward`] (recomputing
//! the softmax from the log-sum-exp its forward saved) and
//! [`crate::ops::pointconv_merge::backward`]. Their gradients are the same
//! bits on every run (no atomics), as those ops'.

mod attention;
#[cfg(feature = "candle-cuda")]
mod cuda;
mod dense;
mod layout;
mod merge;
mod model;
mod storage;
#[cfg(test)]
mod test_util;

pub use attention::ClusterAttention;
pub use layout::NeighbourSlots;
pub use merge::PointConvMerge;
pub use model::{AutoFocusFormer, StageOutput, StageTokens, load_varmap, varmap_of};
