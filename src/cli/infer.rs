//! `autofocus infer`: normalised images in, logits (and stage outputs) out.

use std::path::PathBuf;

use autofocus::ops::clustering::KeyScope;
use autofocus::{Error, Result, Trace, TraceLevel};

/// Arguments of `autofocus infer`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: super::ModelArgs,
    /// safetensors file holding `input.image`, b×3×H×W f32, already normalised.
    #[arg(long)]
    input: PathBuf,
    /// Where to write `logits` (b×classes f32).
    #[arg(long)]
    out: PathBuf,
    /// Also write each stage's `stage{s}.out.pos` and `stage{s}.out.feat`.
    #[arg(long)]
    stages: bool,
    /// Overwrite `--out` if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args) -> Result<()> {
    super::check_output(&args.out, &[&args.model.weights, &args.input], args.force)?;
    let model = args.model.load(KeyScope::Batch)?;
    let image = super::read_input_image(&args.input)?;
    let mut trace = args.stages.then(|| Trace::new(TraceLevel::StageOutputs));
    let logits = match (&trace, args.model.backend.device()?) {
        (_, None) => model.forward_traced(&image, trace.as_mut())?,
        (None, Some(_)) => args.model.backend.runner(&model)?.forward(&image)?,
        (Some(_), Some(_)) => {
            return Err(Error::Unsupported(
                "--stages records intermediates on the CPU backend only".into(),
            ));
        }
    };
    let mut tensors = vec![("logits".to_string(), logits.into())];
    if let Some(trace) = trace {
        tensors.extend(trace.into_tensors());
    }
    super::write_tensors(&args.out, &tensors, model.config(), args.force)
}
