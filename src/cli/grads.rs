//! `autofocus grads`: every parameter's gradient of `Σ logits · loss_coef`,
//! through the candle model, under the state dict's key names: how anyone
//! checks this crate's gradients against PyTorch's.

use std::path::PathBuf;

use autofocus::io::SafetensorsFile;
use autofocus::{Error, Result};

/// Arguments of `autofocus grads`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Weights: safetensors (or a .pth checkpoint) of a classifier.
    #[arg(long)]
    weights: PathBuf,
    /// Preset name, JSON, or JSON file; default: the weights' `config` metadata.
    #[arg(long)]
    config: Option<String>,
    /// safetensors file holding `input.image` (b×3×H×W f32, normalised) and
    /// `grad.loss_coef` (one value per class, or b×classes).
    #[arg(long)]
    input: PathBuf,
    /// Where to write `logits` and `grad.<parameter>` for every parameter.
    #[arg(long)]
    out: PathBuf,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Overwrite `--out` if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args) -> Result<()> {
    super::check_output(&args.out, &[&args.weights, &args.input], args.force)?;
    super::set_threads(args.threads)?;
    let config = args
        .config
        .as_deref()
        .map(autofocus::AffConfig::resolve)
        .transpose()?;
    let image = super::read_input_image(&args.input)?;
    let coef = SafetensorsFile::open(&args.input)?.tensor_f32("grad.loss_coef")?;
    with_candle::gradients(&args, config, image, coef)
}

#[cfg(feature = "candle")]
mod with_candle {
    use autofocus::candle::{AutoFocusFormer, load_varmap};
    use autofocus::model::ModelKind;
    use autofocus::{AffConfig, AnyTensor, Error, Result, Tensor};
    use candle_core::{DType, Device};

    use super::{Args, coef_error};

    /// A candle error here is a bug: inputs were checked before.
    fn internal(e: candle_core::Error) -> Error {
        Error::Internal(format!("candle: {e}"))
    }

    pub fn gradients(
        args: &Args,
        config: Option<AffConfig>,
        image: Tensor,
        coef: Tensor,
    ) -> Result<()> {
        let device = Device::Cpu;
        let (config, kind, varmap) = load_varmap(&args.weights, config, DType::F32, &device)?;
        if kind != ModelKind::Classifier {
            return Err(Error::Unsupported(format!(
                "{}: a segmentation backbone has no logits to differentiate",
                args.weights.display()
            )));
        }
        let (b, classes) = (image.shape()[0], config.num_classes);
        if coef.shape() != [classes] && coef.shape() != [b, classes] {
            return Err(coef_error(args, classes, b, coef.shape()));
        }
        let model = AutoFocusFormer::from_varmap(&config, kind, &varmap, DType::F32, &device)
            .map_err(internal)?;
        let to_candle = |t: &Tensor| {
            candle_core::Tensor::from_vec(t.data().to_vec(), t.shape(), &device).map_err(internal)
        };
        let logits = model.forward(&to_candle(&image)?).map_err(internal)?;
        let loss = logits
            .broadcast_mul(&to_candle(&coef)?)
            .and_then(|t| t.sum_all())
            .map_err(internal)?;
        let grads = loss.backward().map_err(internal)?;
        let host = |t: &candle_core::Tensor| -> Result<AnyTensor> {
            let values = t
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(internal)?;
            Ok(Tensor::new(t.dims().to_vec(), values)?.into())
        };
        let mut tensors = vec![("logits".to_string(), host(&logits)?)];
        let vars = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        for name in names {
            // Buffers (BatchNorm's running statistics) are not learned.
            if let Some(grad) = grads.get(vars[name].as_tensor()) {
                tensors.push((format!("grad.{name}"), host(grad)?));
            }
        }
        super::super::write_tensors(&args.out, &tensors, &config, args.force)
    }
}

#[cfg(not(feature = "candle"))]
mod with_candle {
    use autofocus::{AffConfig, Error, Result, Tensor};

    use super::Args;

    pub fn gradients(_: &Args, _: Option<AffConfig>, _: Tensor, _: Tensor) -> Result<()> {
        Err(Error::Unsupported(
            "gradients need the candle backend: build with `--features candle`".into(),
        ))
    }
}

/// `grad.loss_coef` of the wrong shape.
#[cfg_attr(not(feature = "candle"), allow(dead_code))]
fn coef_error(args: &Args, classes: usize, batch: usize, found: &[usize]) -> Error {
    Error::InputTensor {
        path: args.input.clone(),
        name: "grad.loss_coef".into(),
        reason: format!("expected shape [{classes}] or [{batch}, {classes}], found {found:?}"),
    }
}
