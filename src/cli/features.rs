//! `autofocus features`: a segmentation backbone's multi-scale features.

use std::path::PathBuf;

use autofocus::io::image::{decode, normalise};
use autofocus::{AnyTensor, Error, Result, Tensor};

/// Arguments of `autofocus features`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: super::ModelArgs,
    /// PNG or JPEG files, all of one size (normalised, not resized).
    #[arg(required_unless_present = "input", conflicts_with = "input")]
    images: Vec<PathBuf>,
    /// Instead of images: a safetensors file holding `input.image`
    /// (b×3×H×W f32, already normalised).
    #[arg(long)]
    input: Option<PathBuf>,
    /// Where to write `res2..res5`, `res2_pos..res5_pos` and `spatial_shape`.
    #[arg(long)]
    out: PathBuf,
    /// Overwrite `--out` if it exists.
    #[arg(long)]
    force: bool,
}

/// The images as one normalised batch; they must share their size.
fn image_batch(paths: &[PathBuf]) -> Result<Tensor> {
    let mut pixels = Vec::new();
    let mut size = None;
    for path in paths {
        let img = decode(path)?;
        let dims = img.dimensions();
        match size {
            None => size = Some(dims),
            Some(first) if first != dims => {
                return Err(Error::Image {
                    path: path.clone(),
                    reason: format!(
                        "is {}×{}, the first image {}×{}: one batch needs one size",
                        dims.0, dims.1, first.0, first.1
                    ),
                });
            }
            Some(_) => {}
        }
        pixels.extend(normalise(&img));
    }
    let (w, h) = size.expect("clap requires at least one image");
    Tensor::new(vec![paths.len(), 3, h as usize, w as usize], pixels)
}

pub fn run(args: Args) -> Result<()> {
    let mut inputs: Vec<&std::path::Path> = vec![&args.model.weights];
    inputs.extend(args.images.iter().map(PathBuf::as_path));
    inputs.extend(args.input.as_deref());
    super::check_output(&args.out, &inputs, args.force)?;
    let model = args.model.load()?;
    let images = match &args.input {
        Some(path) => super::read_input_image(path)?,
        None => image_batch(&args.images)?,
    };
    let features = args.model.backend.runner(&model)?.features(&images)?;
    let mut tensors: Vec<(String, AnyTensor)> = Vec::new();
    for (s, t) in features.stages.iter().enumerate() {
        let (b, n, c) = (t.batch, t.tokens, t.channels);
        tensors.push((
            format!("res{}", s + 2),
            Tensor::new(vec![b, n, c], t.feat.clone())?.into(),
        ));
        tensors.push((
            format!("res{}_pos", s + 2),
            Tensor::new(vec![b, n, 2], t.pos.clone())?.into(),
        ));
    }
    let (h, w) = features.grid;
    tensors.push((
        "spatial_shape".into(),
        Tensor::new(vec![2], vec![h as i32, w as i32])?.into(),
    ));
    super::write_tensors(&args.out, &tensors, model.config(), args.force)
}
