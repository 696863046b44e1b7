//! `autofocus convert`: PyTorch `.pth` checkpoint → safetensors.

use std::collections::HashMap;
use std::path::PathBuf;

use autofocus::io::pth::{EntryChoice, PthCheckpoint, PthTensor};
use autofocus::io::{Overwrite, TensorSource, write_safetensors_with};
use autofocus::model::{ModelWeights, detect_kind, fitting_presets};
use autofocus::{AffConfig, AnyTensor, Result};

/// Arguments of `autofocus convert`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The `torch.save` checkpoint to read.
    input: PathBuf,
    /// The safetensors file to write.
    output: PathBuf,
    /// Preset name, JSON, or JSON file: checked against the tensors and stored
    /// in the output's metadata, so later commands need no `--config`.
    #[arg(long)]
    config: Option<String>,
    /// Read the `model_ema` state dict instead of `model`.
    #[arg(long)]
    ema: bool,
    /// Overwrite the output if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args) -> Result<()> {
    super::check_output(&args.output, &[&args.input], args.force)?;
    let choice = if args.ema {
        EntryChoice::ModelEma
    } else {
        EntryChoice::Model
    };
    let checkpoint = PthCheckpoint::open(&args.input, choice)?;
    let (kind, prefix) = detect_kind(&checkpoint);
    let mut metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    match args.config.as_deref().map(AffConfig::resolve).transpose()? {
        Some(config) => {
            // Fail now, with every offending key, rather than at inference.
            ModelWeights::from_source(&checkpoint, &config, kind, prefix)?;
            metadata.insert("config".into(), config.to_json());
        }
        None => {
            let fits = fitting_presets(&checkpoint, kind, prefix);
            eprintln!(
                "note: no --config given, none stored; later commands will need --config{}",
                if fits.is_empty() {
                    String::new()
                } else {
                    format!(" (the tensors fit {})", fits.join(", "))
                }
            );
        }
    }
    let tensors: Vec<(String, AnyTensor)> = checkpoint
        .tensors()
        .iter()
        .map(|(name, t)| {
            let t = match t {
                PthTensor::Float(t) => AnyTensor::F32(t.clone()),
                PthTensor::Int(t) => AnyTensor::I64(t.clone()),
            };
            (name.clone(), t)
        })
        .collect();
    write_safetensors_with(
        &args.output,
        &tensors,
        metadata,
        Overwrite::when(args.force),
    )?;
    eprintln!(
        "wrote {} tensor(s) from {} to {}{}",
        tensors.len(),
        checkpoint.path().display(),
        args.output.display(),
        if checkpoint.skipped().is_empty() {
            String::new()
        } else {
            format!(
                "; skipped non-tensor entries: {}",
                checkpoint.skipped().join(", ")
            )
        }
    );
    Ok(())
}
