//! The model's parameters, built by name from a tensor source (a checkpoint),
//! from a seeded generator (benchmarks), or only recorded (to check which
//! presets a checkpoint fits). One builder serves all three, so the key names
//! and shapes are written down once (spec §11).

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::config::{AffConfig, PRESET_NAMES};
use crate::error::{Error, Result, TensorProblem};
use crate::io::{F32Buffer, TensorSource};
use crate::ops::patch_embed::PatchEmbed;
use crate::ops::pointconv_merge::INNER_CHANNELS;
use crate::ops::{BatchNorm, LayerNorm, Linear};
use crate::rng::SplitMix64;
use crate::tensor::Tensor;

/// Weights of one cluster attention.
#[derive(Debug, Clone)]
pub struct AttentionWeights {
    pub q: Linear,
    pub kv: Linear,
    pub proj: Linear,
    /// Linear(5 → heads): the relative-position bias.
    pub pos_embed: Linear,
    pub blank_k: F32Buffer,
    pub blank_v: F32Buffer,
}

/// Weights of one transformer block.
#[derive(Debug, Clone)]
pub struct BlockWeights {
    pub norm1: LayerNorm,
    pub attn: AttentionWeights,
    pub norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    /// Layer-scale vectors, when the config has layer scale.
    pub gamma1: Option<F32Buffer>,
    pub gamma2: Option<F32Buffer>,
}

/// Weights of the importance score and the PointConv merge ending a stage.
#[derive(Debug, Clone)]
pub struct MergeWeights {
    /// Linear(C → 1) whose sigmoid is the importance.
    pub prob_net: Linear,
    /// Linear(5 → 4) of the weight net.
    pub weight_net: Linear,
    /// LayerNorm(4) of the weight net.
    pub weight_norm: LayerNorm,
    /// LayerNorm(4C).
    pub norm: LayerNorm,
    /// Linear(4C → C_next).
    pub linear: Linear,
}

/// Weights of one stage.
#[derive(Debug, Clone)]
pub struct StageWeights {
    pub blocks: Vec<BlockWeights>,
    /// Absent on the last stage.
    pub merge: Option<MergeWeights>,
}

/// What sits after the stages.
#[derive(Debug, Clone)]
pub enum Head {
    /// Classification: `norm` then mean over tokens then `head`.
    Classifier { norm: LayerNorm, head: Linear },
    /// Segmentation backbone: one output norm per stage (`norm0..`).
    Backbone { norms: Vec<LayerNorm> },
}

/// The kind of checkpoint: which keys follow the stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    Classifier,
    Backbone,
}

/// All parameters of an AutoFocusFormer.
#[derive(Debug, Clone)]
pub struct ModelWeights {
    pub patch_embed: PatchEmbed,
    pub stages: Vec<StageWeights>,
    pub head: Head,
}

/// How a parameter is initialised when generated.
#[derive(Debug, Clone, Copy)]
enum Init {
    /// Uniform in ±1/√fan_in, as PyTorch's default Linear and Conv init.
    FanIn(usize),
    Ones,
    Zeros,
    /// Standard-normal-like (blank tokens).
    Unit,
    Constant(f32),
}

enum Mode<'a> {
    Source(&'a dyn TensorSource, &'a str),
    Random(SplitMix64),
    ShapesOnly,
}

/// Builds parameters by name, recording every problem instead of stopping at
/// the first, so one error can list all of them.
struct Builder<'a> {
    mode: Mode<'a>,
    expected: BTreeMap<String, Vec<usize>>,
    problems: Vec<TensorProblem>,
    /// Every parameter built, by name (shares the buffers).
    built: Vec<(String, F32Buffer)>,
}

impl<'a> Builder<'a> {
    fn new(mode: Mode<'a>) -> Self {
        Self {
            mode,
            expected: BTreeMap::new(),
            problems: Vec::new(),
            built: Vec::new(),
        }
    }

    fn take(&mut self, name: &str, shape: &[usize], init: Init) -> F32Buffer {
        let value = self.make(name, shape, init);
        self.expected.insert(name.to_string(), shape.to_vec());
        self.built.push((name.to_string(), value.clone()));
        value
    }

    /// Every parameter built, as a tensor of its shape.
    fn into_named(self) -> Vec<(String, Tensor<f32>)> {
        let shapes = self.expected;
        self.built
            .into_iter()
            .map(|(name, values)| {
                let tensor = Tensor::new(shapes[&name].clone(), values.to_vec())
                    .expect("built to its shape");
                (name, tensor)
            })
            .collect()
    }

    fn make(&mut self, name: &str, shape: &[usize], init: Init) -> F32Buffer {
        let numel: usize = shape.iter().product();
        match &mut self.mode {
            Mode::ShapesOnly => F32Buffer::owned(Vec::new()),
            Mode::Random(rng) => F32Buffer::owned(match init {
                Init::FanIn(fan_in) => {
                    let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
                    (0..numel).map(|_| rng.float() * bound).collect()
                }
                Init::Ones => (0..numel).map(|_| 1.0 + 0.1 * rng.float()).collect(),
                Init::Zeros => (0..numel).map(|_| 0.1 * rng.float()).collect(),
                Init::Unit => (0..numel).map(|_| 1.7 * rng.float()).collect(),
                Init::Constant(v) => vec![v; numel],
            }),
            Mode::Source(src, prefix) => {
                let key = format!("{prefix}{name}");
                // Stands in for a tensor with a problem: the load fails with
                // the full list, so it is never read and need not be allocated.
                let placeholder = F32Buffer::owned(Vec::new());
                match src.shape(&key) {
                    None => {
                        self.problems.push(TensorProblem::Missing {
                            name: key,
                            expected: shape.to_vec(),
                        });
                        placeholder
                    }
                    Some(found) if found != shape => {
                        self.problems.push(TensorProblem::WrongShape {
                            name: key,
                            expected: shape.to_vec(),
                            found,
                        });
                        placeholder
                    }
                    Some(_) if !src.is_float(&key) => {
                        self.problems.push(TensorProblem::WrongDtype {
                            name: key,
                            found: "an integer type".into(),
                        });
                        placeholder
                    }
                    Some(_) => match src.f32(&key) {
                        Ok(values) => {
                            if let Some((index, value)) =
                                crate::tensor::first_non_finite(shape, &values)
                            {
                                self.problems.push(TensorProblem::NonFinite {
                                    name: key,
                                    index,
                                    value,
                                });
                            }
                            values
                        }
                        Err(e) => {
                            self.problems.push(TensorProblem::WrongDtype {
                                name: key,
                                found: e.to_string(),
                            });
                            placeholder
                        }
                    },
                }
            }
        }
    }

    fn linear(&mut self, name: &str, in_dim: usize, out_dim: usize) -> Linear {
        Linear {
            weight: self.take(
                &format!("{name}.weight"),
                &[out_dim, in_dim],
                Init::FanIn(in_dim),
            ),
            bias: Some(self.take(&format!("{name}.bias"), &[out_dim], Init::FanIn(in_dim))),
            in_dim,
            out_dim,
        }
    }

    fn layer_norm(&mut self, name: &str, dim: usize) -> LayerNorm {
        LayerNorm {
            weight: self.take(&format!("{name}.weight"), &[dim], Init::Ones),
            bias: self.take(&format!("{name}.bias"), &[dim], Init::Zeros),
        }
    }

    /// A 3×3 convolution, kept as the linear layer over its im2col patches.
    fn conv3x3(&mut self, name: &str, cin: usize, cout: usize) -> Linear {
        let fan_in = cin * 9;
        Linear {
            weight: self.take(
                &format!("{name}.weight"),
                &[cout, cin, 3, 3],
                Init::FanIn(fan_in),
            ),
            bias: Some(self.take(&format!("{name}.bias"), &[cout], Init::FanIn(fan_in))),
            in_dim: fan_in,
            out_dim: cout,
        }
    }

    fn build(&mut self, config: &AffConfig, kind: ModelKind) -> ModelWeights {
        let d0 = config.embed_dim[0];
        let patch_embed = PatchEmbed {
            proj1: self.conv3x3("patch_embed.proj1", 3, d0 / 2),
            bn: BatchNorm {
                weight: self.take("patch_embed.bn.weight", &[d0 / 2], Init::Ones),
                bias: self.take("patch_embed.bn.bias", &[d0 / 2], Init::Zeros),
                running_mean: self.take("patch_embed.bn.running_mean", &[d0 / 2], Init::Zeros),
                running_var: self.take("patch_embed.bn.running_var", &[d0 / 2], Init::Ones),
            },
            proj2: self.conv3x3("patch_embed.proj2", d0 / 2, d0),
            norm: self.layer_norm("patch_embed.norm", d0),
        };
        let stages = (0..config.num_stages())
            .map(|s| self.stage(config, s))
            .collect();
        let last = *config
            .embed_dim
            .last()
            .expect("validated config has stages");
        let head = match kind {
            ModelKind::Classifier => Head::Classifier {
                norm: self.layer_norm("norm", last),
                head: self.linear("head", last, config.num_classes),
            },
            ModelKind::Backbone => Head::Backbone {
                norms: (0..config.num_stages())
                    .map(|s| self.layer_norm(&format!("norm{s}"), config.embed_dim[s]))
                    .collect(),
            },
        };
        ModelWeights {
            patch_embed,
            stages,
            head,
        }
    }

    fn stage(&mut self, config: &AffConfig, s: usize) -> StageWeights {
        let c = config.embed_dim[s];
        let heads = config.num_heads[s];
        let hidden = config.mlp_hidden(s);
        let blocks = (0..config.depths[s])
            .map(|j| {
                let p = format!("layers.{s}.blocks.{j}");
                let gamma = |b: &mut Self, g: &str| {
                    config.has_layer_scale().then(|| {
                        b.take(
                            &format!("{p}.{g}"),
                            &[c],
                            Init::Constant(config.layer_scale as f32),
                        )
                    })
                };
                BlockWeights {
                    norm1: self.layer_norm(&format!("{p}.norm1"), c),
                    attn: AttentionWeights {
                        q: self.linear(&format!("{p}.attn.q"), c, c),
                        kv: self.linear(&format!("{p}.attn.kv"), c, 2 * c),
                        proj: self.linear(&format!("{p}.attn.proj"), c, c),
                        pos_embed: self.linear(&format!("{p}.attn.pos_embed"), 5, heads),
                        blank_k: self.take(&format!("{p}.attn.blank_k"), &[c], Init::Unit),
                        blank_v: self.take(&format!("{p}.attn.blank_v"), &[c], Init::Unit),
                    },
                    norm2: self.layer_norm(&format!("{p}.norm2"), c),
                    fc1: self.linear(&format!("{p}.mlp.fc1"), c, hidden),
                    fc2: self.linear(&format!("{p}.mlp.fc2"), hidden, c),
                    gamma1: gamma(self, "gamma1"),
                    gamma2: gamma(self, "gamma2"),
                }
            })
            .collect();
        let merge = (s + 1 < config.num_stages()).then(|| {
            let p = format!("layers.{s}");
            let wide = INNER_CHANNELS * c;
            MergeWeights {
                prob_net: self.linear(&format!("{p}.prob_net"), c, 1),
                weight_net: self.linear(&format!("{p}.downsample.weight_net.0"), 5, INNER_CHANNELS),
                weight_norm: self
                    .layer_norm(&format!("{p}.downsample.weight_net.1"), INNER_CHANNELS),
                norm: self.layer_norm(&format!("{p}.downsample.norm"), wide),
                linear: self.linear(
                    &format!("{p}.downsample.linear"),
                    wide,
                    config.embed_dim[s + 1],
                ),
            }
        });
        StageWeights { blocks, merge }
    }
}

/// Keys every checkpoint may carry that inference has no use for.
fn is_ignorable(name: &str) -> bool {
    name.ends_with("num_batches_tracked")
}

/// Tensor names and shapes a model of `config` and `kind` has.
pub fn expected_tensors(config: &AffConfig, kind: ModelKind) -> BTreeMap<String, Vec<usize>> {
    let mut b = Builder::new(Mode::ShapesOnly);
    b.build(config, kind);
    b.expected
}

/// The key prefix and model kind of a checkpoint: segmentation backbones have
/// `norm0` instead of `norm`/`head`, possibly under `backbone.` (as in a
/// Mask2Former checkpoint, whose other keys are then ignored).
pub fn detect_kind(source: &dyn TensorSource) -> (ModelKind, &'static str) {
    if source.shape("backbone.norm0.weight").is_some() {
        (ModelKind::Backbone, "backbone.")
    } else if source.shape("norm0.weight").is_some() {
        (ModelKind::Backbone, "")
    } else {
        (ModelKind::Classifier, "")
    }
}

/// Presets whose tensors match the file's exactly (names and shapes).
pub fn fitting_presets(source: &dyn TensorSource, kind: ModelKind, prefix: &str) -> Vec<String> {
    let found: BTreeMap<String, Vec<usize>> = source
        .names()
        .into_iter()
        .filter_map(|n| {
            let key = n.strip_prefix(prefix)?.to_string();
            (!is_ignorable(&key)).then(|| (key, source.shape(&n).unwrap_or_default()))
        })
        .collect();
    PRESET_NAMES
        .iter()
        .filter(|name| {
            let config = AffConfig::preset(name).expect("listed presets exist");
            expected_tensors(&config, kind) == found
        })
        .map(|s| s.to_string())
        .collect()
}

impl ModelWeights {
    /// Reads every parameter of a `kind` model of `config` from `source`
    /// (keys under `prefix`).
    ///
    /// # Errors
    /// [`Error::Weights`] listing every missing, unexpected or misshapen
    /// tensor, and the presets the file would fit.
    pub fn from_source(
        source: &dyn TensorSource,
        config: &AffConfig,
        kind: ModelKind,
        prefix: &str,
    ) -> Result<Self> {
        read_checked(source, config, kind, prefix).map(|(weights, _)| weights)
    }

    /// Every parameter of a `kind` model of `config` read from `source`
    /// (keys under `prefix`) as named tensors under their key names without
    /// the prefix (what another framework loads), checked as
    /// [`from_source`](Self::from_source) checks them.
    ///
    /// # Errors
    /// As [`from_source`](Self::from_source).
    pub fn named_from_source(
        source: &dyn TensorSource,
        config: &AffConfig,
        kind: ModelKind,
        prefix: &str,
    ) -> Result<Vec<(String, Tensor<f32>)>> {
        read_checked(source, config, kind, prefix).map(|(_, b)| b.into_named())
    }

    /// Generates reproducible random parameters for `config` (benchmarks, tests).
    pub fn random(config: &AffConfig, kind: ModelKind, seed: u64) -> Self {
        Builder::new(Mode::Random(SplitMix64(seed))).build(config, kind)
    }

    /// The parameters [`random`](Self::random) generates, as named tensors
    /// under the checkpoint key names (to write a random checkpoint).
    pub fn random_tensors(
        config: &AffConfig,
        kind: ModelKind,
        seed: u64,
    ) -> Vec<(String, Tensor<f32>)> {
        let mut b = Builder::new(Mode::Random(SplitMix64(seed)));
        b.build(config, kind);
        b.into_named()
    }
}

/// Reads and checks every parameter (see [`ModelWeights::from_source`]);
/// returns the builder too, which holds them by name.
fn read_checked<'a>(
    source: &'a dyn TensorSource,
    config: &AffConfig,
    kind: ModelKind,
    prefix: &'a str,
) -> Result<(ModelWeights, Builder<'a>)> {
    let mut b = Builder::new(Mode::Source(source, prefix));
    let weights = b.build(config, kind);
    let mut problems = std::mem::take(&mut b.problems);
    for name in source.names() {
        // Keys outside the prefix belong to the rest of a larger checkpoint.
        let Some(key) = name.strip_prefix(prefix) else {
            continue;
        };
        if !b.expected.contains_key(key) && !is_ignorable(key) {
            problems.push(TensorProblem::Unexpected {
                found: source.shape(&name).unwrap_or_default(),
                name,
            });
        }
    }
    if problems.is_empty() {
        Ok((weights, b))
    } else {
        Err(Error::Weights {
            path: PathBuf::from(source.path()),
            problems,
            fitting_presets: fitting_presets(source, kind, prefix),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aff_mini_has_the_published_key_count() {
        // Spec §11: 261 entries including `patch_embed.bn.num_batches_tracked`.
        let config = AffConfig::preset("aff_mini").unwrap();
        let keys = expected_tensors(&config, ModelKind::Classifier);
        assert_eq!(keys.len(), 260);
        assert_eq!(keys["layers.2.blocks.5.attn.pos_embed.weight"], [8, 5]);
        assert_eq!(keys["layers.0.downsample.norm.weight"], [128]);
        assert_eq!(keys["patch_embed.proj2.weight"], [32, 16, 3, 3]);
        assert!(!keys.contains_key("layers.3.prob_net.weight"));
    }

    #[test]
    fn random_weights_are_reproducible() {
        let config = AffConfig::preset("aff_mini").unwrap();
        let a = ModelWeights::random(&config, ModelKind::Classifier, 7);
        let b = ModelWeights::random(&config, ModelKind::Classifier, 7);
        assert_eq!(
            &a.stages[1].blocks[0].fc1.weight[..],
            &b.stages[1].blocks[0].fc1.weight[..]
        );
    }
}
