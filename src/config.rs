//! Model configuration (spec §1): the JSON the goldens carry and the eight
//! published presets.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// An AutoFocusFormer configuration, in the JSON form of spec §1.
///
/// Reserve tokens and the patch-embedding norm are always on, as in every
/// published model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AffConfig {
    /// Classes of the head (ignored by segmentation backbones, which have none).
    #[serde(default = "default_num_classes")]
    pub num_classes: usize,
    /// Channels per stage.
    pub embed_dim: Vec<usize>,
    /// Blocks per stage.
    pub depths: Vec<usize>,
    /// Attention heads per stage.
    pub num_heads: Vec<usize>,
    /// MLP hidden width as a multiple of the stage's channels.
    pub mlp_ratio: f64,
    /// Tokens per cluster.
    pub cluster_size: usize,
    /// Neighbourhood size per stage (rounded to whole clusters; global when ≥ tokens).
    pub nbhd_size: Vec<usize>,
    /// Weight of the learned importance in the selection score.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Fraction of tokens each merge keeps.
    pub ds_rate: f64,
    /// Layer-scale initial value; `> 0` means the blocks carry `gamma1/gamma2`.
    #[serde(default)]
    pub layer_scale: f64,
    /// Training resolution: the classification crop size.
    #[serde(default = "default_img_size")]
    pub img_size: usize,
}

fn default_num_classes() -> usize {
    1000
}
fn default_alpha() -> f64 {
    4.0
}
fn default_img_size() -> usize {
    224
}

/// Names of the published presets, in the order of the spec's table.
pub const PRESET_NAMES: [&str; 8] = [
    "aff_mini",
    "aff_mini_1_5th",
    "aff_tiny",
    "aff_tiny_1_5th",
    "aff_small",
    "aff_small_1_5th",
    "aff_base_22kto1k_384",
    "aff_base_22k",
];

impl AffConfig {
    /// The published preset called `name` (see [`PRESET_NAMES`]).
    pub fn preset(name: &str) -> Option<Self> {
        let small_family = |embed_dim: [usize; 4], depths: [usize; 4], heads: [usize; 4]| Self {
            num_classes: 1000,
            embed_dim: embed_dim.to_vec(),
            depths: depths.to_vec(),
            num_heads: heads.to_vec(),
            mlp_ratio: 3.0,
            cluster_size: 8,
            nbhd_size: vec![48, 48, 48, 49],
            alpha: 4.0,
            ds_rate: 0.25,
            layer_scale: 0.0,
            img_size: 224,
        };
        let mini = Self {
            mlp_ratio: 2.0,
            ..small_family([32, 128, 256, 384], [2, 2, 6, 2], [2, 4, 8, 16])
        };
        let tiny = small_family([64, 128, 256, 512], [3, 4, 18, 5], [2, 4, 8, 16]);
        let small = Self {
            layer_scale: 1e-5,
            ..small_family([96, 192, 384, 768], [3, 4, 18, 2], [3, 6, 12, 24])
        };
        let base_384 = Self {
            cluster_size: 24,
            nbhd_size: vec![144; 4],
            layer_scale: 1e-5,
            img_size: 384,
            ..small_family([128, 256, 512, 1024], [3, 4, 18, 2], [4, 8, 16, 32])
        };
        let fifth = |c: Self| Self { ds_rate: 0.2, ..c };
        Some(match name {
            "aff_mini" => mini,
            "aff_mini_1_5th" => fifth(mini),
            "aff_tiny" => tiny,
            "aff_tiny_1_5th" => fifth(tiny),
            "aff_small" => small,
            "aff_small_1_5th" => fifth(small),
            "aff_base_22kto1k_384" => base_384,
            // The published 22k config keeps the small cluster and neighbourhood
            // sizes of the other presets; only its 384 fine-tune enlarges them.
            "aff_base_22k" => Self {
                num_classes: 21841,
                layer_scale: 1e-5,
                ..small_family([128, 256, 512, 1024], [3, 4, 18, 2], [4, 8, 16, 32])
            },
            _ => return None,
        })
    }

    /// Parses the JSON of spec §1 and validates it.
    ///
    /// # Errors
    /// [`Error::Config`] for malformed JSON, unknown fields or inconsistent values.
    pub fn from_json(json: &str) -> Result<Self> {
        let config: Self =
            serde_json::from_str(json).map_err(|e| Error::Config(format!("invalid JSON: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    /// The config as one line of JSON (what goes into safetensors metadata).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a config always serialises")
    }

    /// Resolves a `--config` argument: a preset name, inline JSON, or a JSON file.
    ///
    /// # Errors
    /// [`Error::Config`] naming the argument when it is none of these.
    pub fn resolve(arg: &str) -> Result<Self> {
        if let Some(preset) = Self::preset(arg) {
            return Ok(preset);
        }
        if arg.trim_start().starts_with('{') {
            return Self::from_json(arg);
        }
        let path = Path::new(arg);
        if path.is_file() {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            return Self::from_json(&text)
                .map_err(|e| Error::Config(format!("{}: {e}", path.display())));
        }
        Err(Error::Config(format!(
            "`{arg}` is neither a preset ({}) nor a JSON file",
            PRESET_NAMES.join(", ")
        )))
    }

    /// Number of stages.
    pub fn num_stages(&self) -> usize {
        self.depths.len()
    }

    /// Head dimension of stage `s`.
    pub fn head_dim(&self, s: usize) -> usize {
        self.embed_dim[s] / self.num_heads[s]
    }

    /// Hidden width of the MLPs of stage `s` (`int(dim · mlp_ratio)`, as published).
    pub fn mlp_hidden(&self, s: usize) -> usize {
        (self.embed_dim[s] as f64 * self.mlp_ratio) as usize
    }

    /// Checks that the configuration describes a buildable model.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first inconsistent field.
    pub fn validate(&self) -> Result<()> {
        use crate::limits::{
            MAX_BLOCKS_PER_STAGE, MAX_CLASSES, MAX_CLUSTER_SIZE, MAX_EMBED_DIM, MAX_HEADS,
            MAX_IMAGE_SIDE, MAX_MLP_RATIO, MAX_NBHD_SIZE, MAX_STAGES,
        };
        let stages = self.depths.len();
        let bad = |msg: String| Err(Error::Config(msg));
        if stages == 0 {
            return bad("`depths` is empty".into());
        }
        // Upper bounds first: nothing below may overflow or allocate.
        let too_large = |field: &str, value: String, limit: String| {
            Err(Error::Config(format!(
                "`{field}` = {value} is beyond the limit of {limit}"
            )))
        };
        let lists: [(&str, &[usize], usize); 4] = [
            ("embed_dim", &self.embed_dim, MAX_EMBED_DIM),
            ("depths", &self.depths, MAX_BLOCKS_PER_STAGE),
            ("num_heads", &self.num_heads, MAX_HEADS),
            ("nbhd_size", &self.nbhd_size, MAX_NBHD_SIZE),
        ];
        for (field, values, limit) in lists {
            if values.len() > MAX_STAGES {
                return too_large(
                    field,
                    format!("{} stages", values.len()),
                    format!("{MAX_STAGES} stages"),
                );
            }
            if let Some(v) = values.iter().find(|&&v| v > limit) {
                return too_large(field, v.to_string(), limit.to_string());
            }
        }
        for (field, value, limit) in [
            ("num_classes", self.num_classes, MAX_CLASSES),
            ("cluster_size", self.cluster_size, MAX_CLUSTER_SIZE),
            ("img_size", self.img_size, MAX_IMAGE_SIDE),
        ] {
            if value > limit {
                return too_large(field, value.to_string(), limit.to_string());
            }
        }
        if self.mlp_ratio.is_nan() || self.mlp_ratio > MAX_MLP_RATIO {
            return too_large(
                "mlp_ratio",
                self.mlp_ratio.to_string(),
                MAX_MLP_RATIO.to_string(),
            );
        }
        if self.num_classes == 0 {
            return bad("num_classes must be at least 1".into());
        }
        for (field, len) in [
            ("embed_dim", self.embed_dim.len()),
            ("num_heads", self.num_heads.len()),
            ("nbhd_size", self.nbhd_size.len()),
        ] {
            if len != stages {
                return bad(format!(
                    "`{field}` has {len} entries but `depths` has {stages}"
                ));
            }
        }
        for s in 0..stages {
            let (c, h) = (self.embed_dim[s], self.num_heads[s]);
            if c == 0 || h == 0 || c % h != 0 {
                return bad(format!(
                    "stage {s}: embed_dim {c} is not a positive multiple of num_heads {h}"
                ));
            }
            // The patch embedding's middle has D // 2 channels (odd D is fine).
            if s == 0 && c < 2 {
                return bad(format!("embed_dim[0] = {c} must be at least 2"));
            }
            if self.nbhd_size[s] == 0 {
                return bad(format!("stage {s}: nbhd_size must be positive"));
            }
        }
        if self.cluster_size == 0 {
            return bad("cluster_size must be positive".into());
        }
        if self.mlp_ratio.is_nan() || self.mlp_ratio <= 0.0 || self.mlp_hidden(0) == 0 {
            return bad(format!("mlp_ratio {} must be positive", self.mlp_ratio));
        }
        if self.ds_rate.is_nan() || self.ds_rate <= 0.0 || self.ds_rate > 1.0 {
            return bad(format!("ds_rate {} must be in (0, 1]", self.ds_rate));
        }
        if !self.alpha.is_finite() || !self.layer_scale.is_finite() || self.layer_scale < 0.0 {
            return bad("alpha and layer_scale must be finite, layer_scale ≥ 0".into());
        }
        if self.img_size == 0 {
            return bad("img_size must be positive".into());
        }
        Ok(())
    }

    /// True when the blocks carry layer-scale vectors `gamma1`, `gamma2`.
    pub fn has_layer_scale(&self) -> bool {
        self.layer_scale > 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_is_valid_and_round_trips_through_json() {
        for name in PRESET_NAMES {
            let c = AffConfig::preset(name).unwrap();
            c.validate().unwrap();
            assert_eq!(AffConfig::from_json(&c.to_json()).unwrap(), c, "{name}");
        }
        assert!(AffConfig::preset("aff_huge").is_none());
    }

    #[test]
    fn golden_json_parses() {
        let json = r#"{"num_classes": 10, "embed_dim": [16, 32, 64, 96], "depths": [1, 1, 2, 1],
            "num_heads": [1, 2, 4, 8], "mlp_ratio": 2.0, "cluster_size": 8,
            "nbhd_size": [48, 48, 48, 49], "alpha": 4.0, "ds_rate": 0.25,
            "layer_scale": 0.0, "img_size": 128}"#;
        let c = AffConfig::from_json(json).unwrap();
        assert_eq!(c.num_classes, 10);
        assert_eq!(c.mlp_hidden(3), 192);
    }

    #[test]
    fn inconsistent_configs_are_rejected_with_the_field_named() {
        let mut c = AffConfig::preset("aff_mini").unwrap();
        c.num_heads = vec![2, 4, 8];
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("num_heads"), "{err}");
        let mut c = AffConfig::preset("aff_mini").unwrap();
        c.num_heads[1] = 3;
        assert!(c.validate().unwrap_err().to_string().contains("stage 1"));
        // An odd first embedding is valid (the published model floors D/2);
        // one channel is not (the patch embedding's middle would be empty).
        let mut c = AffConfig::preset("aff_mini").unwrap();
        (c.embed_dim[0], c.num_heads[0]) = (15, 1);
        c.validate().unwrap();
        c.embed_dim[0] = 1;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("embed_dim[0] = 1"), "{err}");
        let err = AffConfig::from_json(r#"{"embed_dim": [8]}"#).unwrap_err();
        assert!(err.to_string().contains("invalid JSON"), "{err}");
        let err = AffConfig::resolve("aff_gigantic").unwrap_err().to_string();
        assert!(
            err.contains("aff_gigantic") && err.contains("aff_mini"),
            "{err}"
        );
    }
}
