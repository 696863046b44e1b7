//! The ops of the model, one per module, each a CPU reference with a plain
//! contract (flat slices with explicit sizes); where a CUDA kernel computes
//! the op, its safe wrapper is the module's `gpu` submodule and its source
//! `kernels/<module>.cu`.
//!
//! | module | spec | computes |
//! |---|---|---|
//! | [`patch_embed`] | §2 | image → stage-0 tokens |
//! | [`clustering`] | §3 | balanced space-filling-curve clusters |
//! | [`neighbourhood`] | §4 | nearest clusters, neighbour lists |
//! | [`rel_pos`] | §5 | relative-position features, per-offset tables |
//! | [`cluster_attention`] | §6 | fused neighbourhood attention |
//! | [`token_selection`] | §7 | grid prior, reserve, stable top-k |
//! | [`pointconv_merge`] | §7 | PointConv over the centres' neighbourhoods |
//! | [`dense`] | | tokens back onto the pixel grid |
//! | [`grid_search`] | | nearest tokens on the grid |
//! | [`linear`], [`norm`], [`activation`] | | dense layers |
//! | [`gather`], [`vector_math`] | | shared loops: gathered rows, vectorised math |

pub mod activation;
pub mod cluster_attention;
pub mod clustering;
pub mod dense;
pub mod gather;
pub mod grid_search;
pub mod linear;
pub mod neighbourhood;
pub mod norm;
pub mod patch_embed;
pub mod pointconv_merge;
pub mod rel_pos;
pub mod token_selection;
pub mod vector_math;

pub use self::linear::{Linear, LinearView};
pub use self::norm::{BatchNorm, LayerNorm};
