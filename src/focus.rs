//! Focus pictures: where the model kept its tokens, one panel per stage after
//! the first (as in the paper's figure), optionally over a heat map of the
//! importance scores that chose them.

use image::{Rgb, RgbImage};

use crate::error::{Error, Result};
use crate::io::image::denormalise;
use crate::model::{AutoFocusFormer, ModelKind, Trace, TraceLevel, pad_to_multiple};
use crate::ops::dense::{DenseOptions, to_dense};
use crate::tensor::Tensor;

/// Colour of the token dots: the dimmed photo and the heat map never reach
/// a full channel, so no other pixel has it.
pub const DOT: Rgb<u8> = Rgb([255, 0, 255]);

/// Width of the white bar between panels, in pixels.
pub const SEPARATOR: u32 = 4;

/// Pictures shorter than this are enlarged for viewing (see [`enlarged`]).
pub const VIEWABLE_HEIGHT: u32 = 256;

/// Brightness of the photo behind the dots.
const DIM: f32 = 0.6;

/// Renders the focus picture of one image (`1×3×H×W`, normalised as the
/// model expects). Panel `s` (for stages 1, 2, …) shows the tokens that
/// entered stage `s`, each as a 3×3 dot inside its 4×4-pixel cell; with
/// `heatmap`, over the importance (blue low, red high) of the stage before,
/// whose top scores chose them. A segmentation backbone sees its input
/// padded to a multiple of 4, as it runs.
///
/// # Errors
/// [`Error::InvalidArgument`] for a batch other than 1; model errors.
pub fn focus_picture(model: &AutoFocusFormer, image: &Tensor, heatmap: bool) -> Result<RgbImage> {
    if image.shape().first() != Some(&1) {
        return Err(Error::InvalidArgument(format!(
            "focus pictures take one image, got shape {:?}",
            image.shape()
        )));
    }
    let input = match model.kind() {
        ModelKind::Backbone => pad_to_multiple(image, 4)?,
        ModelKind::Classifier => image.clone(),
    };
    let mut trace = Trace::new(TraceLevel::All);
    let (tokens, grid) = model.embed(&input, Some(&mut trace))?;
    let stages = model.run_stages(tokens, grid, Some(&mut trace))?;
    let (height, width) = (input.shape()[2], input.shape()[3]);
    let photo = denormalise(input.data(), (height, width));

    let panels: Vec<RgbImage> = (1..stages.len())
        .map(|s| {
            let importance = if heatmap {
                let before = &stages[s - 1].before_merge;
                let scores = trace
                    .f32(&format!("stage{}.importance", s - 1))
                    .expect("traced by every merge");
                let dense = to_dense(
                    &before.pos,
                    scores.data(),
                    (1, before.tokens, 1),
                    grid,
                    DenseOptions::default(),
                )?;
                Some(dense)
            } else {
                None
            };
            Ok(panel(
                &photo,
                grid,
                importance.as_deref(),
                &stages[s - 1].output.pos,
            ))
        })
        .collect::<Result<_>>()?;
    Ok(side_by_side(&panels))
}

/// One panel: the dimmed photo (or its blend with the heat map) and a dot per token.
fn panel(
    photo: &RgbImage,
    (h, w): (usize, usize),
    importance: Option<&[f32]>,
    pos: &[f32],
) -> RgbImage {
    let mut out = RgbImage::from_fn(photo.width(), photo.height(), |x, y| {
        let px = photo.get_pixel(x, y).0.map(|c| c as f32 * DIM);
        let cell = ((y / 4) as usize).min(h - 1) * w + ((x / 4) as usize).min(w - 1);
        let px = match importance {
            None => px,
            Some(map) => {
                let v = map[cell].clamp(0.0, 1.0);
                let heat = [200.0 * v, 40.0, 200.0 * (1.0 - v)];
                std::array::from_fn(|c| 0.5 * px[c] + 0.5 * heat[c])
            }
        };
        Rgb(px.map(|c| c.round() as u8))
    });
    for p in pos.chunks_exact(2) {
        let (cx, cy) = (4 * p[0] as u32, 4 * p[1] as u32);
        for y in cy + 1..cy + 4 {
            for x in cx + 1..cx + 4 {
                if x < out.width() && y < out.height() {
                    out.put_pixel(x, y, DOT);
                }
            }
        }
    }
    out
}

/// Panels left to right, separated by white bars.
fn side_by_side(panels: &[RgbImage]) -> RgbImage {
    let (pw, ph) = panels.first().map_or((0, 0), |p| p.dimensions());
    let count = panels.len() as u32;
    let width = count * pw + count.saturating_sub(1) * SEPARATOR;
    let mut out = RgbImage::from_pixel(width, ph, Rgb([255, 255, 255]));
    for (i, p) in panels.iter().enumerate() {
        image::imageops::replace(&mut out, p, (i as u32 * (pw + SEPARATOR)) as i64, 0);
    }
    out
}

/// `picture` enlarged by the smallest whole factor that makes it at least
/// [`VIEWABLE_HEIGHT`] pixels tall, each pixel a square block (dots stay
/// sharp); unchanged when it is tall enough. A 64-pixel input's 3×3 dots are
/// too small to see otherwise.
pub fn enlarged(picture: RgbImage) -> RgbImage {
    let factor = VIEWABLE_HEIGHT.div_ceil(picture.height().max(1));
    if factor <= 1 {
        return picture;
    }
    RgbImage::from_fn(
        picture.width() * factor,
        picture.height() * factor,
        |x, y| *picture.get_pixel(x / factor, y / factor),
    )
}
