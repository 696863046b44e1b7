//! Command-line interface: one module per subcommand.

mod bench;
mod classify;
mod collect;
mod convert;
mod dataset;
mod device;
mod features;
mod focus;
mod grads;
mod infer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use autofocus::io::{Overwrite, SafetensorsFile, write_safetensors_with};
use autofocus::ops::clustering::KeyScope;
use autofocus::{AffConfig, AnyTensor, AutoFocusFormer, Error, Result, Tensor};

/// AutoFocusFormer inference, exact to the published model.
#[derive(Debug, Parser)]
#[command(name = "autofocus", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the model on a batch of normalised images stored in safetensors.
    Infer(infer::Args),
    /// Classify images (files, folders, manifests): print the top classes or
    /// write them as JSON lines.
    Classify(classify::Args),
    /// Check that shard outputs cover every input once, and merge them.
    Collect(collect::Args),
    /// Time the model with random weights.
    Bench(bench::Args),
    /// Convert a PyTorch .pth checkpoint to safetensors.
    Convert(convert::Args),
    /// Write a segmentation backbone's multi-scale features (res2..res5).
    Features(features::Args),
    /// Draw where the model kept its tokens, one panel per stage.
    Focus(focus::Args),
    /// Write every parameter's gradient of Σ logits · loss_coef (candle
    /// backend; build with `--features candle`).
    Grads(grads::Args),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Infer(a) => infer::run(a),
        Command::Classify(a) => classify::run(a),
        Command::Collect(a) => collect::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Features(a) => features::run(a),
        Command::Focus(a) => focus::run(a),
        Command::Grads(a) => grads::run(a),
    }
}

/// Which model to load, and with how many threads to run it (shared by the
/// commands that run a checkpoint).
#[derive(Debug, clap::Args)]
struct ModelArgs {
    /// Weights: safetensors (or a .pth checkpoint).
    #[arg(long)]
    weights: PathBuf,
    /// Preset name, JSON, or JSON file; default: the weights' `config` metadata.
    #[arg(long)]
    config: Option<String>,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[command(flatten)]
    backend: device::DeviceArgs,
    /// Which images share the clustering keys' normaliser: `batch`, as the
    /// published model (an image's result can depend on its batch), or
    /// `image` (each image as if alone: batch-invariant). Default: `image`
    /// for classify and features over files, `batch` otherwise.
    #[arg(long, value_enum)]
    clustering: Option<Clustering>,
}

/// `--clustering`: see [`KeyScope`].
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Clustering {
    Batch,
    Image,
}

impl ModelArgs {
    /// Sets the thread count, then loads the model, clustering with
    /// `--clustering` or else `default`.
    fn load(&self, default: KeyScope) -> Result<AutoFocusFormer> {
        set_threads(self.threads)?;
        let config = self.config.as_deref().map(AffConfig::resolve).transpose()?;
        let scope = match self.clustering {
            None => default,
            Some(Clustering::Batch) => KeyScope::Batch,
            Some(Clustering::Image) => KeyScope::Image,
        };
        Ok(AutoFocusFormer::load(&self.weights, config)?.with_key_scope(scope))
    }
}

/// Writes a command's output tensors, with the model's config as metadata
/// (atomically; an output that appeared since the check is not clobbered
/// unless `force`).
fn write_tensors(
    out: &Path,
    tensors: &[(String, AnyTensor)],
    config: &AffConfig,
    force: bool,
) -> Result<()> {
    let metadata = HashMap::from([("config".to_string(), config.to_json())]);
    write_safetensors_with(out, tensors, metadata, Overwrite::when(force))?;
    eprintln!("wrote {} tensor(s) to {}", tensors.len(), out.display());
    Ok(())
}

/// Reads `input.image` (b×3×H×W f32, normalised) from a safetensors file.
fn read_input_image(path: &Path) -> Result<Tensor> {
    let image = SafetensorsFile::open(path)?.tensor_f32("input.image")?;
    if image.shape().len() != 4 || image.shape()[1] != 3 {
        return Err(Error::InputTensor {
            path: path.to_path_buf(),
            name: "input.image".into(),
            reason: format!("expected shape [b, 3, H, W], found {:?}", image.shape()),
        });
    }
    if let Some((index, value)) = autofocus::tensor::first_non_finite(image.shape(), image.data()) {
        return Err(Error::InputTensor {
            path: path.to_path_buf(),
            name: "input.image".into(),
            reason: format!("non-finite value {value} at index {index:?}"),
        });
    }
    Ok(image)
}

/// Uses `threads` rayon workers for everything that follows (0: one per core).
fn set_threads(threads: usize) -> Result<()> {
    if threads == 0 {
        return Ok(());
    }
    autofocus::limits::at_most(
        "--threads",
        threads as u64,
        autofocus::limits::MAX_THREADS as u64,
    )?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| Error::InvalidArgument(format!("--threads {threads}: {e}")))
}

/// Checks, before any work, that `out` can be written: not an input, not
/// existing unless `force` (a symlink counts), its folder present and
/// writable. Nothing the user gave is overwritten.
fn check_output(out: &Path, inputs: &[&Path], force: bool) -> Result<()> {
    autofocus::io::output::check_destination(out, inputs, Overwrite::when(force))
}
