//! The whole AutoFocusFormer in candle (see [`AutoFocusFormer`]).

mod block;
mod layers;
mod stage;

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use self::layers::{LayerNorm, Linear, PatchEmbed, linear};
use self::stage::{Stage, StageContext};
pub use self::stage::{StageOutput, StageTokens};
use crate::config::AffConfig;
use crate::io::open_weights;
use crate::model::{GridCache, ModelKind, ModelWeights, resolve_config};
use crate::ops::clustering::{KeyScope, grid_positions};
use crate::ops::rel_pos::SEGMENTATION_OFFSET_CLAMP;

/// An AutoFocusFormer (classifier or segmentation backbone) built from
/// candle-nn layers and this crate's custom ops, every parameter a variable
/// of the [`VarBuilder`] it was built from, so that an optimizer over its
/// [`VarMap`] trains them all.
///
/// Built from a [`VarMap`] filled by [`load_varmap`] it is the checkpoint's
/// model (the same keys as the state dict); built from an empty one, a fresh
/// model initialised as the published code initialises its own. The
/// layouts (clustering, neighbourhoods, token selection) are computed on the
/// host from positions and the detached importance, by this crate's ops;
/// the patch embedding's BatchNorm uses its running statistics (evaluation
/// mode, also in training: they are not learned).
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use autofocus::candle::{AutoFocusFormer, load_varmap};
/// use candle_core::{DType, Device, Tensor};
/// let device = Device::Cpu;
/// let (config, kind, varmap) = load_varmap("weights.safetensors", None, DType::F32, &device)?;
/// let model = AutoFocusFormer::from_varmap(&config, kind, &varmap, DType::F32, &device)?;
/// let images = Tensor::zeros((1, 3, 224, 224), DType::F32, &device)?;
/// let logits = model.forward(&images)?; // 1 × classes
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct AutoFocusFormer {
    config: AffConfig,
    kind: ModelKind,
    patch_embed: PatchEmbed,
    stages: Vec<Stage>,
    head: Head,
    grids: GridCache,
    scope: KeyScope,
}

#[derive(Debug)]
enum Head {
    /// `norm` → mean over tokens → `head`.
    Classifier { norm: LayerNorm, head: Linear },
    /// One output norm per stage (`norm0..`).
    Backbone { norms: Vec<LayerNorm> },
}

/// A checkpoint's parameters as variables (safetensors or `.pth`, read and
/// checked by this crate's reader: every missing, unexpected or misshapen
/// tensor is named), under the state dict's keys (without a backbone's
/// `backbone.` prefix), in `dtype` on `device`, with the configuration
/// (`config`, else the file's) and the model kind.
///
/// # Errors
/// The reader's errors ([`crate::Error`]), naming the file.
pub fn load_varmap(
    path: impl AsRef<Path>,
    config: Option<AffConfig>,
    dtype: DType,
    device: &Device,
) -> crate::Result<(AffConfig, ModelKind, VarMap)> {
    let source = open_weights(path.as_ref())?;
    let (config, kind, prefix) = resolve_config(source.as_ref(), config)?;
    let named = ModelWeights::named_from_source(source.as_ref(), &config, kind, prefix)?;
    let varmap = varmap_of(named, dtype, device).map_err(|e| crate::Error::Device {
        op: "loading the weights into candle".into(),
        reason: e.to_string(),
    })?;
    Ok((config, kind, varmap))
}

/// Named host tensors (such as [`ModelWeights::random_tensors`] gives) as
/// variables in `dtype` on `device`.
///
/// # Errors
/// A dtype conversion or copy candle refuses.
pub fn varmap_of(
    named: Vec<(String, crate::Tensor<f32>)>,
    dtype: DType,
    device: &Device,
) -> Result<VarMap> {
    let varmap = VarMap::new();
    {
        let mut vars = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        for (name, tensor) in named {
            let values = Tensor::from_vec(tensor.data().to_vec(), tensor.shape(), &Device::Cpu)?;
            let var = Var::from_tensor(&values.to_dtype(dtype)?.to_device(device)?)?;
            vars.insert(name, var);
        }
    }
    Ok(varmap)
}

impl AutoFocusFormer {
    /// A `kind` model of `config` whose parameters come from `vb` (created
    /// there when absent).
    ///
    /// # Errors
    /// An invalid configuration; a parameter of the wrong shape in `vb`.
    pub fn new(config: &AffConfig, kind: ModelKind, vb: VarBuilder) -> Result<Self> {
        config.validate().map_err(candle_core::Error::wrap)?;
        let stages = (0..config.num_stages())
            .map(|s| Stage::new(config, s, &vb))
            .collect::<Result<_>>()?;
        let last = config.embed_dim[config.num_stages() - 1];
        let head = match kind {
            ModelKind::Classifier => Head::Classifier {
                norm: LayerNorm::new(last, vb.pp("norm"))?,
                head: linear(last, config.num_classes, vb.pp("head"))?,
            },
            ModelKind::Backbone => Head::Backbone {
                norms: (0..config.num_stages())
                    .map(|s| LayerNorm::new(config.embed_dim[s], vb.pp(format!("norm{s}"))))
                    .collect::<Result<_>>()?,
            },
        };
        Ok(Self {
            config: config.clone(),
            kind,
            patch_embed: PatchEmbed::new(config.embed_dim[0], vb.pp("patch_embed"))?,
            stages,
            head,
            grids: GridCache::default(),
            scope: KeyScope::Batch,
        })
    }

    /// [`new`](Self::new) over the variables of `varmap`.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn from_varmap(
        config: &AffConfig,
        kind: ModelKind,
        varmap: &VarMap,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::new(config, kind, VarBuilder::from_varmap(varmap, dtype, device))
    }

    /// The same model, clustering with `scope` (see
    /// [`crate::model::AutoFocusFormer::with_key_scope`]).
    #[must_use]
    pub fn with_key_scope(mut self, scope: KeyScope) -> Self {
        self.scope = scope;
        self
    }

    /// The configuration.
    pub fn config(&self) -> &AffConfig {
        &self.config
    }

    /// Classifier or segmentation backbone.
    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    /// Every stage on normalised images (b×3×H×W): the stage-0 grid and
    /// each stage's output (tokens before and after merging).
    ///
    /// # Errors
    /// A malformed input; op errors.
    pub fn forward_stages(&self, images: &Tensor) -> Result<((usize, usize), Vec<StageOutput>)> {
        let (b, channels, _, _) = images.dims4()?;
        if channels != 3 {
            candle_core::bail!(
                "autofocus model: `images` must be batch × 3 × height × width, found shape {:?}",
                images.dims()
            );
        }
        let (feat, grid) = self.patch_embed.forward(images)?;
        let clamp = (self.kind == ModelKind::Backbone).then_some(SEGMENTATION_OFFSET_CLAMP);
        let ctx = StageContext {
            config: &self.config,
            geometry: self.grids.get(grid, clamp),
            scope: self.scope,
        };
        let mut tokens = StageTokens {
            feat,
            pos: grid_positions(grid.0, grid.1).repeat(b),
        };
        let mut outputs: Vec<StageOutput> = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            let out = stage.forward(&tokens, &ctx)?;
            if let Some(merged) = &out.merged {
                tokens = merged.clone();
            }
            outputs.push(out);
        }
        Ok((grid, outputs))
    }

    /// Classifies normalised images (b×3×H×W): b×classes logits.
    ///
    /// # Errors
    /// A backbone (no head); a malformed input; op errors.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let Head::Classifier { norm, head } = &self.head else {
            candle_core::bail!(
                "autofocus model: this is a segmentation backbone: it has no classification head"
            );
        };
        let (_, stages) = self.forward_stages(images)?;
        let last = &stages.last().expect("a model has stages").before_merge;
        head.forward(&norm.forward(&last.feat)?.mean(1)?)
    }

    /// A segmentation backbone's features (spec §10) of normalised images
    /// (zero-padded right and bottom to a multiple of 4 first): per stage,
    /// the tokens after its blocks, normalised by `norm{s}`, with their
    /// positions; and the stage-0 grid.
    ///
    /// # Errors
    /// A classifier; a malformed input; op errors.
    pub fn features(&self, images: &Tensor) -> Result<((usize, usize), Vec<StageTokens>)> {
        let Head::Backbone { norms } = &self.head else {
            candle_core::bail!(
                "autofocus model: features need a segmentation backbone; this is a classifier"
            );
        };
        let (_, _, height, width) = images.dims4()?;
        let padded = images
            .pad_with_zeros(2, 0, height.next_multiple_of(4) - height)?
            .pad_with_zeros(3, 0, width.next_multiple_of(4) - width)?;
        let (grid, stages) = self.forward_stages(&padded)?;
        let features = stages
            .into_iter()
            .zip(norms)
            .map(|(out, norm)| {
                Ok(StageTokens {
                    feat: norm.forward(&out.before_merge.feat)?,
                    pos: out.before_merge.pos,
                })
            })
            .collect::<Result<_>>()?;
        Ok((grid, features))
    }
}
