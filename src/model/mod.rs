//! The AutoFocusFormer model: weights, stages and the forward pass.
//!
//! ```text
//! image b×3×H×W ─ patch_embed ─► tokens on the ⌈H/4⌉×⌈W/4⌉ grid
//!   stage s: layout (cluster, reorder, neighbourhoods) → blocks → merge (s < last)
//! ─ norm → mean over tokens → head ─► logits
//! ```

mod block;
mod device;
mod layout;
mod stage;
mod tables;
mod trace;
mod weights;

use std::path::Path;

pub use self::block::StageGeometry;
pub use self::device::DeviceModel;
pub use self::layout::{
    Attention, ClusterLayout, GridCache, GridGeometry, StageLayout, plan_stage_layout,
};
pub use self::stage::{StageResult, Tokens};
pub use self::tables::{PositionTables, bias_table, merge_table};
pub use self::trace::{Trace, TraceLevel};
pub use self::weights::{
    AttentionWeights, BlockWeights, Head, MergeWeights, ModelKind, ModelWeights, StageWeights,
    detect_kind, expected_tensors, fitting_presets,
};

use self::trace::{f32_tensor, i32_tensor, record};
use crate::config::AffConfig;
use crate::error::{Error, Result};
use crate::io::{TensorSource, open_weights};
use crate::ops::clustering::KeyScope;
use crate::ops::dense::{DenseOptions, to_dense};
use crate::ops::rel_pos::SEGMENTATION_OFFSET_CLAMP;
use crate::tensor::Tensor;

/// The multi-scale output of a segmentation backbone.
#[derive(Debug, Clone)]
pub struct BackboneFeatures {
    /// The stage-0 token grid `(h, w)`, after padding the input to a multiple of 4.
    pub grid: (usize, usize),
    /// Per stage (`res2`, `res3`, …): the tokens after the stage's blocks,
    /// before merging, normalised; positions in stage-0 token units.
    pub stages: Vec<Tokens>,
}

impl BackboneFeatures {
    /// Stage `s`'s features on the pixel grid of stage 0: b×c×h×w, empty
    /// cells filled by inverse-distance weighting (see [`to_dense`]).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a stage out of range or bad options.
    pub fn to_dense(&self, s: usize, options: DenseOptions) -> Result<Tensor> {
        let t = self.stages.get(s).ok_or_else(|| {
            Error::InvalidArgument(format!("no stage {s} (there are {})", self.stages.len()))
        })?;
        let dense = to_dense(
            &t.pos,
            &t.feat,
            (t.batch, t.tokens, t.channels),
            self.grid,
            options,
        )?;
        Tensor::new(vec![t.batch, t.channels, self.grid.0, self.grid.1], dense)
    }

    /// [`to_dense`](Self::to_dense) computed by the `to_dense` kernel on `device`.
    ///
    /// # Errors
    /// As [`to_dense`](Self::to_dense) (`k` at most 16); device errors.
    pub fn to_dense_on(
        &self,
        device: &crate::gpu::Device,
        s: usize,
        options: DenseOptions,
    ) -> Result<Tensor> {
        let t = self.stages.get(s).ok_or_else(|| {
            Error::InvalidArgument(format!("no stage {s} (there are {})", self.stages.len()))
        })?;
        let (h, w) = self.grid;
        let pos = device.upload(&t.pos)?;
        let feat = device.upload(&t.feat)?;
        let mut out = device.alloc::<f32>(t.batch * t.channels * h * w)?;
        let sizes = (t.batch, t.tokens, t.channels);
        crate::ops::dense::gpu::to_dense(device, &pos, &feat, &mut out, sizes, self.grid, options)?;
        Tensor::new(vec![t.batch, t.channels, h, w], device.download(&out)?)
    }
}

/// The `(b, H, W)` of a non-empty b×3×H×W image batch.
///
/// # Errors
/// [`Error::Shape`] naming the image when it is not one.
pub(crate) fn image_batch_shape(images: &Tensor) -> Result<(usize, usize, usize)> {
    let &[b, 3, height, width] = images.shape() else {
        return Err(Error::shape(
            "forward",
            "image",
            "[b, 3, H, W]",
            images.shape(),
        ));
    };
    if b == 0 || height == 0 || width == 0 {
        return Err(Error::shape(
            "forward",
            "image",
            "non-empty [b, 3, H, W]",
            images.shape(),
        ));
    }
    let side = crate::limits::MAX_IMAGE_SIDE;
    if height > side || width > side {
        return Err(Error::TooLarge {
            what: format!("image of {height}×{width} pixels"),
            asked: format!("a side of {}", height.max(width)),
            limit: format!("{side} pixels"),
        });
    }
    images.check_finite("image")?;
    Ok((b, height, width))
}

/// Zero-pads b×3×H×W images right and bottom to sides that are multiples of
/// `multiple` (as the published segmentation backbone does).
///
/// # Errors
/// [`Error::Shape`] for a tensor that is not b×c×H×W.
pub fn pad_to_multiple(images: &Tensor, multiple: usize) -> Result<Tensor> {
    let &[b, c, h, w] = images.shape() else {
        return Err(Error::shape("pad", "image", "[b, c, H, W]", images.shape()));
    };
    let (ph, pw) = (h.next_multiple_of(multiple), w.next_multiple_of(multiple));
    if (ph, pw) == (h, w) {
        return Ok(images.clone());
    }
    let mut out = vec![0.0f32; b * c * ph * pw];
    for (src, dst) in images
        .data()
        .chunks_exact(h * w)
        .zip(out.chunks_exact_mut(ph * pw))
    {
        for (src_row, dst_row) in src.chunks_exact(w).zip(dst.chunks_exact_mut(pw)) {
            dst_row[..w].copy_from_slice(src_row);
        }
    }
    Tensor::new(vec![b, c, ph, pw], out)
}

/// What a checkpoint holds: its configuration (`config` when given, else the
/// file's `config` metadata), its kind (told apart by its keys) and the
/// prefix of its model keys.
///
/// # Errors
/// [`Error::Config`] when no configuration is given or stored (naming the
/// presets the tensors fit), or the stored one is invalid.
pub fn resolve_config(
    source: &dyn TensorSource,
    config: Option<AffConfig>,
) -> Result<(AffConfig, ModelKind, &'static str)> {
    let (kind, prefix) = detect_kind(source);
    let config = match config {
        Some(c) => c,
        None => match source.config_json() {
            Some(json) => AffConfig::from_json(&json).map_err(|e| {
                Error::Config(format!("{}: stored config: {e}", source.path().display()))
            })?,
            None => {
                let fits = fitting_presets(source, kind, prefix);
                let hint = if fits.is_empty() {
                    String::new()
                } else {
                    format!(" (its tensors fit {})", fits.join(", "))
                };
                return Err(Error::Config(format!(
                    "{} stores no config: pass one (a preset name or a JSON file){hint}",
                    source.path().display()
                )));
            }
        },
    };
    config.validate()?;
    Ok((config, kind, prefix))
}

/// An AutoFocusFormer ready to run on the CPU.
///
/// `Sync`: one model may serve many threads; the grid cache is shared.
#[derive(Debug)]
pub struct AutoFocusFormer {
    config: AffConfig,
    kind: ModelKind,
    weights: ModelWeights,
    grid_cache: GridCache,
    /// Relative offsets are clamped to this (segmentation backbones).
    offset_clamp: Option<usize>,
    /// Which images share the clustering keys' normaliser.
    key_scope: KeyScope,
}

impl AutoFocusFormer {
    /// Loads the weights at `path` (safetensors or `.pth`).
    ///
    /// The configuration is `config` when given, else the file's `config`
    /// metadata. Classification models and segmentation backbones are told
    /// apart by their keys.
    ///
    /// # Errors
    /// I/O and format errors naming the file; [`Error::Config`] when no
    /// configuration is given or stored; [`Error::Weights`] when the tensors
    /// do not fit the configuration.
    pub fn load(path: impl AsRef<Path>, config: Option<AffConfig>) -> Result<Self> {
        let source = open_weights(path.as_ref())?;
        Self::from_source(source.as_ref(), config)
    }

    /// Builds the model from any tensor source (see [`load`](Self::load)).
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn from_source(source: &dyn TensorSource, config: Option<AffConfig>) -> Result<Self> {
        let (config, kind, prefix) = resolve_config(source, config)?;
        let weights = ModelWeights::from_source(source, &config, kind, prefix)?;
        Ok(Self::from_weights(config, kind, weights))
    }

    /// A model with reproducible random weights (benchmarks, tests).
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration; [`Error::TooLarge`]
    /// when its weights would not fit the memory available.
    pub fn random(config: AffConfig, kind: ModelKind, seed: u64) -> Result<Self> {
        config.validate()?;
        let bytes = crate::limits::parameter_count(&config, kind).saturating_mul(4);
        let budget = crate::limits::memory_budget();
        if bytes > budget {
            return Err(Error::TooLarge {
                what: "random weights for this configuration".into(),
                asked: format!("{} MiB", bytes >> 20),
                limit: format!("{} MiB available", budget >> 20),
            });
        }
        let weights = ModelWeights::random(&config, kind, seed);
        Ok(Self::from_weights(config, kind, weights))
    }

    fn from_weights(config: AffConfig, kind: ModelKind, weights: ModelWeights) -> Self {
        Self {
            config,
            kind,
            weights,
            grid_cache: GridCache::default(),
            offset_clamp: (kind == ModelKind::Backbone).then_some(SEGMENTATION_OFFSET_CLAMP),
            key_scope: KeyScope::Batch,
        }
    }

    /// The same model, clustering with `scope`: [`KeyScope::Batch`] (the
    /// default) reproduces the published model, whose result for an image
    /// can depend on the other images of its batch; [`KeyScope::Image`]
    /// makes every image's result independent of its batch (as at batch 1).
    #[must_use]
    pub fn with_key_scope(mut self, scope: KeyScope) -> Self {
        self.key_scope = scope;
        self
    }

    /// Which images share the clustering keys' normaliser (see
    /// [`with_key_scope`](Self::with_key_scope)).
    pub fn key_scope(&self) -> KeyScope {
        self.key_scope
    }

    /// The per-axis clamp of relative offsets (segmentation backbones: 511).
    pub fn offset_clamp(&self) -> Option<usize> {
        self.offset_clamp
    }

    /// The configuration.
    pub fn config(&self) -> &AffConfig {
        &self.config
    }

    /// Classifier or segmentation backbone.
    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    /// The parameters.
    pub fn weights(&self) -> &ModelWeights {
        &self.weights
    }

    /// The per-grid-size cache (offset tables, stage-0 layouts).
    pub fn grid_cache(&self) -> &GridCache {
        &self.grid_cache
    }

    /// The geometry of the stage-0 grid `(h, w)`, from the cache.
    pub fn geometry(&self, grid: (usize, usize)) -> std::sync::Arc<GridGeometry> {
        self.grid_cache.get(grid, self.offset_clamp)
    }

    /// Embeds images (b×3×H×W, normalised) into stage-0 tokens on the grid
    /// `(h, w) = (⌈H/4⌉, ⌈W/4⌉)`.
    ///
    /// # Errors
    /// [`Error::Shape`] when `images` is not b×3×H×W.
    pub fn embed(
        &self,
        images: &Tensor,
        trace: Option<&mut Trace>,
    ) -> Result<(Tokens, (usize, usize))> {
        let mut trace = trace;
        let (b, height, width) = image_batch_shape(images)?;
        let (feat, grid) = crate::profile::timed("patch_embed", || {
            self.weights
                .patch_embed
                .forward(images.data(), b, (height, width))
        })?;
        let (h, w) = grid;
        let pos = crate::ops::clustering::grid_positions(h, w).repeat(b);
        let c = self.config.embed_dim[0];
        let n = h * w;
        record(
            &mut trace,
            || "patch.pos".into(),
            || f32_tensor(&[b, n, 2], &pos),
        );
        record(
            &mut trace,
            || "patch.feat".into(),
            || f32_tensor(&[b, n, c], &feat),
        );
        record(
            &mut trace,
            || "patch.hw".into(),
            || i32_tensor(&[2], [h as i32, w as i32]),
        );
        let tokens = Tokens {
            batch: b,
            tokens: n,
            channels: c,
            pos,
            feat,
        };
        Ok((tokens, grid))
    }

    /// Runs every stage after the patch embedding; returns each stage's result.
    ///
    /// # Errors
    /// As [`run_stage`](Self::run_stage).
    pub fn run_stages(
        &self,
        tokens: Tokens,
        grid: (usize, usize),
        mut trace: Option<&mut Trace>,
    ) -> Result<Vec<StageResult>> {
        let mut results: Vec<StageResult> = Vec::with_capacity(self.config.num_stages());
        for s in 0..self.config.num_stages() {
            let input = results.last().map_or(&tokens, |r| &r.output);
            record(
                &mut trace,
                || format!("stage{s}.in.pos"),
                || f32_tensor(&[input.batch, input.tokens, 2], &input.pos),
            );
            record(
                &mut trace,
                || format!("stage{s}.in.feat"),
                || f32_tensor(&[input.batch, input.tokens, input.channels], &input.feat),
            );
            let _stage = crate::nvtx::range_with(|| format!("stage{s}"));
            let result = self.run_stage(s, input, grid, trace.as_deref_mut())?;
            results.push(result);
        }
        Ok(results)
    }

    /// The classification head on the last stage's tokens: LN → mean → Linear.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for a backbone; shape errors.
    pub fn head(&self, tokens: &Tokens, mut trace: Option<&mut Trace>) -> Result<Tensor> {
        let Head::Classifier { norm, head } = &self.weights.head else {
            return Err(Error::Unsupported(
                "this is a segmentation backbone: it has no classification head".into(),
            ));
        };
        let _t = crate::profile::scope("head");
        let (b, n, c) = (tokens.batch, tokens.tokens, tokens.channels);
        let normed = norm.forward(&tokens.feat)?;
        record(
            &mut trace,
            || "final.norm".into(),
            || f32_tensor(&[b, n, c], &normed),
        );
        let mut pooled = vec![0.0f32; b * c];
        for (img, out) in pooled.chunks_exact_mut(c).enumerate() {
            for row in normed[img * n * c..(img + 1) * n * c].chunks_exact(c) {
                out.iter_mut().zip(row).for_each(|(o, v)| *o += v);
            }
            out.iter_mut().for_each(|o| *o /= n as f32);
        }
        let logits = head.forward(&pooled, b)?;
        record(
            &mut trace,
            || "logits".into(),
            || f32_tensor(&[b, head.out_dim], &logits),
        );
        Tensor::new(vec![b, head.out_dim], logits)
    }

    /// The multi-scale features of a segmentation backbone (spec §10) for
    /// normalised images (b×3×H×W, zero-padded right and bottom to a multiple
    /// of 4 first): per stage, the tokens after its blocks (before merging),
    /// normalised by the stage's output norm, with their positions.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for a classification model; [`Error::Shape`]
    /// for a malformed input.
    pub fn features(&self, images: &Tensor) -> Result<BackboneFeatures> {
        self.features_traced(images, None)
    }

    /// [`features`](Self::features), recording intermediates into `trace`
    /// (also `res{2..}`, `res{2..}_pos` and `spatial_shape`, the names the
    /// published backbone gives its outputs).
    ///
    /// # Errors
    /// As [`features`](Self::features).
    pub fn features_traced(
        &self,
        images: &Tensor,
        mut trace: Option<&mut Trace>,
    ) -> Result<BackboneFeatures> {
        let Head::Backbone { norms } = &self.weights.head else {
            return Err(Error::Unsupported(
                "features need a segmentation backbone (a checkpoint with norm0..norm3); this is a classifier".into(),
            ));
        };
        let padded = pad_to_multiple(images, 4)?;
        let (tokens, grid) = self.embed(&padded, trace.as_deref_mut())?;
        let results = self.run_stages(tokens, grid, trace.as_deref_mut())?;
        let mut stages = Vec::with_capacity(results.len());
        for (s, (result, norm)) in results.into_iter().zip(norms).enumerate() {
            let mut out = result.before_merge;
            norm.forward_in_place(&mut out.feat)?;
            let (b, n, c) = (out.batch, out.tokens, out.channels);
            record(
                &mut trace,
                || format!("res{}", s + 2),
                || f32_tensor(&[b, n, c], &out.feat),
            );
            record(
                &mut trace,
                || format!("res{}_pos", s + 2),
                || f32_tensor(&[b, n, 2], &out.pos),
            );
            stages.push(out);
        }
        record(
            &mut trace,
            || "spatial_shape".into(),
            || i32_tensor(&[2], [grid.0 as i32, grid.1 as i32]),
        );
        Ok(BackboneFeatures { grid, stages })
    }

    /// Classifies a batch of normalised images (b×3×H×W): returns b×classes logits.
    ///
    /// # Errors
    /// [`Error::Shape`] for a malformed input; [`Error::Unsupported`] for a backbone.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        self.forward_traced(images, None)
    }

    /// [`forward`](Self::forward), recording intermediates into `trace`.
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn forward_traced(&self, images: &Tensor, mut trace: Option<&mut Trace>) -> Result<Tensor> {
        if self.kind == ModelKind::Backbone {
            return Err(Error::Unsupported(
                "this is a segmentation backbone: it has no classification head".into(),
            ));
        }
        let (tokens, grid) = self.embed(images, trace.as_deref_mut())?;
        let results = self.run_stages(tokens, grid, trace.as_deref_mut())?;
        let last = &results
            .last()
            .expect("a validated config has stages")
            .output;
        self.head(last, trace)
    }
}
