//! `autofocus focus`: a picture of where the model kept its tokens.

use std::path::PathBuf;

use autofocus::focus::focus_picture;
use autofocus::io::image::{Preprocess, decode, normalise};
use autofocus::ops::clustering::KeyScope;
use autofocus::{Error, ModelKind, Result, Tensor};

/// Arguments of `autofocus focus`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: super::ModelArgs,
    /// A PNG or JPEG file.
    image: PathBuf,
    /// The PNG to write: one panel per stage after the first.
    #[arg(long)]
    out: PathBuf,
    /// Draw the importance scores that chose the tokens as a heat map
    /// (blue low, red high) behind the dots.
    #[arg(long)]
    heatmap: bool,
    /// Overwrite `--out` if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args) -> Result<()> {
    super::check_output(&args.out, &[&args.model.weights, &args.image], args.force)?;
    let model = args.model.load(KeyScope::Image)?; // one image: both scopes agree
    let photo = decode(&args.image)?;
    // Classifiers see the evaluation crop; backbones the whole image.
    let photo = match model.kind() {
        ModelKind::Classifier => Preprocess::for_config(model.config()).apply(&photo)?,
        ModelKind::Backbone => photo,
    };
    let (w, h) = photo.dimensions();
    let input = Tensor::new(vec![1, 3, h as usize, w as usize], normalise(&photo))?;
    let picture = focus_picture(&model, &input, args.heatmap)?;
    let overwrite = autofocus::io::Overwrite::when(args.force);
    autofocus::io::output::write_file(&args.out, overwrite, |w| {
        picture
            .write_with_encoder(image::codecs::png::PngEncoder::new(w))
            .map_err(|e| Error::Image {
                path: args.out.clone(),
                reason: e.to_string(),
            })
    })?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
