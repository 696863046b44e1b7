//! `autofocus collect`: checks that shard outputs cover every input exactly
//! once and merges them, in input order.

use std::path::PathBuf;

use autofocus::dataset::collect::collect;
use autofocus::dataset::gather_inputs;
use autofocus::{Error, Result};

/// Arguments of `autofocus collect`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The manifests the shards were run over (repeatable).
    #[arg(long)]
    manifest: Vec<PathBuf>,
    /// Image files and folders the shards were run over, if not (only) a
    /// manifest, in the same order as then.
    #[arg(long = "input")]
    inputs: Vec<PathBuf>,
    /// The shard outputs: `classify --out` files or `features` index files.
    #[arg(required = true)]
    outputs: Vec<PathBuf>,
    /// Where to write the merged output.
    #[arg(long)]
    out: PathBuf,
    /// Overwrite `--out` if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args) -> Result<()> {
    if args.manifest.is_empty() && args.inputs.is_empty() {
        return Err(Error::InvalidArgument(
            "collect: name the inputs with --manifest (or --input)".into(),
        ));
    }
    let mut given: Vec<&std::path::Path> = args.outputs.iter().map(PathBuf::as_path).collect();
    given.extend(args.manifest.iter().map(PathBuf::as_path));
    super::check_output(&args.out, &given, args.force)?;
    let inputs = gather_inputs(&args.inputs, &args.manifest)?;
    let lines = collect(&inputs, &args.outputs, &args.out)?;
    eprintln!(
        "collect: {lines} input(s), each once, from {} output(s) into {}",
        args.outputs.len(),
        args.out.display()
    );
    Ok(())
}
