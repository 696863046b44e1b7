//! # autofocus
//!
//! [AutoFocusFormer](https://arxiv.org/abs/2304.12406) (AFF, CVPR 2023)
//! inference in Rust, exact to the published PyTorch model.
//!
//! AFF drops the pixel grid: each stage clusters its tokens along a
//! space-filling curve, lets every token attend to its nearest clusters,
//! scores token importance and keeps only the best tokens, merging their
//! neighbourhoods with a PointConv.
//!
//! ```no_run
//! use autofocus::{AutoFocusFormer, Tensor};
//!
//! # fn main() -> autofocus::Result<()> {
//! let model = AutoFocusFormer::load("aff_mini.safetensors", None)?;
//! let image = Tensor::new(vec![1, 3, 224, 224], vec![0.0; 3 * 224 * 224])?;
//! let logits = model.forward(&image)?; // 1 × 1000
//! # Ok(()) }
//! ```
//!
//! Layout: [`ops`] holds one module per op (the CPU reference, and in its
//! `gpu` submodule the wrapper of its CUDA kernel), [`gpu`] the device seam
//! (a GPU through cudarc, or the CPU emulator of the kernels), [`model`]
//! composes the ops ([`DeviceModel`] on a device), [`io`] reads and writes
//! checkpoints and images, [`dataset`] runs a model over whole datasets,
//! and `candle` (feature `candle`) wraps the ops that carry a gradient as
//! candle custom ops.

#[cfg(feature = "candle")]
pub mod candle;
pub mod config;
pub mod dataset;
pub mod error;
pub mod focus;
pub mod gpu;
pub mod io;
pub mod limits;
pub mod model;
pub mod nvtx;
pub mod ops;
pub mod profile;
pub mod rng;
pub mod tensor;

pub use config::AffConfig;
pub use error::{Error, Result};
pub use model::{AutoFocusFormer, BackboneFeatures, DeviceModel, ModelKind, Trace, TraceLevel};
pub use tensor::{AnyTensor, Tensor};
