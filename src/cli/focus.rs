//! `autofocus focus`: a picture of where the model kept its tokens.

use std::path::{Path, PathBuf};

use autofocus::focus::{enlarged, focus_picture};
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
    /// Resize straight to the model's size instead of resize + centre crop
    /// (classifiers; as `classify --no-crop`).
    #[arg(long)]
    no_crop: bool,
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
        ModelKind::Classifier => {
            let mut pre = Preprocess::for_config(model.config());
            pre.crop &= !args.no_crop;
            pre.apply(&photo)?
        }
        ModelKind::Backbone => photo,
    };
    let (w, h) = photo.dimensions();
    let input = Tensor::new(vec![1, 3, h as usize, w as usize], normalise(&photo))?;
    let picture = focus_picture(&model, &input, args.heatmap)?;
    write_png(&args.out, &enlarged(picture), args.force)
}

/// Writes `picture` to `out` atomically (an output that appeared since the
/// checks is not clobbered unless `force`).
pub(super) fn write_png(out: &Path, picture: &image::RgbImage, force: bool) -> Result<()> {
    let overwrite = autofocus::io::Overwrite::when(force);
    autofocus::io::output::write_file(out, overwrite, |w| {
        picture
            .write_with_encoder(image::codecs::png::PngEncoder::new(w))
            .map_err(|e| Error::Image {
                path: out.to_path_buf(),
                reason: e.to_string(),
            })
    })?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
