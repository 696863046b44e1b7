//! Image decoding and the evaluation preprocessing of spec §11.

use std::path::Path;

use image::RgbImage;
use image::imageops::FilterType;

use crate::config::AffConfig;
use crate::error::{Error, Result};
use crate::ops::clustering::round_half_even;

/// ImageNet channel means and standard deviations used by every AFF model.
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// See [`MEAN`].
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How an image becomes a model input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preprocess {
    /// Side of the square model input.
    pub size: usize,
    /// Resize the shorter side to `int(size·256/224)` and centre-crop (true),
    /// or resize straight to `size × size` (false, as the 384 model is evaluated).
    pub crop: bool,
}

impl Preprocess {
    /// The published evaluation transform for `config`: crop at 224, none at 384.
    pub fn for_config(config: &AffConfig) -> Self {
        Self {
            size: config.img_size,
            crop: config.img_size < 384,
        }
    }
}

impl Preprocess {
    /// Resizes (and crops) a decoded image to the model input.
    pub fn apply(&self, img: &RgbImage) -> RgbImage {
        let (w, h) = img.dimensions();
        let size = self.size as u32;
        // Catmull-Rom is the a = -0.5 bicubic of PIL, which the published
        // evaluation uses; the image crate widens it when downscaling as PIL does.
        if !self.crop {
            return image::imageops::resize(img, size, size, FilterType::CatmullRom);
        }
        let short = ((self.size * 256) / 224) as u32;
        let (nw, nh) = if w <= h {
            (short, (short as u64 * h as u64 / w as u64) as u32)
        } else {
            ((short as u64 * w as u64 / h as u64) as u32, short)
        };
        let resized = image::imageops::resize(img, nw, nh, FilterType::CatmullRom);
        let top = round_half_even((nh - size) as f64 / 2.0) as u32;
        let left = round_half_even((nw - size) as f64 / 2.0) as u32;
        image::imageops::crop_imm(&resized, left, top, size, size).to_image()
    }
}

/// Decodes the PNG or JPEG at `path` to RGB.
///
/// # Errors
/// [`Error::Image`] naming the file when it cannot be read or decoded.
pub fn decode(path: &Path) -> Result<RgbImage> {
    let bad = |reason: String| Error::Image {
        path: path.to_path_buf(),
        reason,
    };
    let img = image::ImageReader::open(path)
        .map_err(|e| bad(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?
        .decode()
        .map_err(|e| bad(format!("cannot decode: {e}")))?
        .to_rgb8();
    if img.width() == 0 || img.height() == 0 {
        return Err(bad("empty image".into()));
    }
    Ok(img)
}

/// An RGB image as the model input: `3 × H × W` (channel-major), scaled to
/// [0, 1] and normalised with the ImageNet [`MEAN`] and [`STD`].
pub fn normalise(img: &RgbImage) -> Vec<f32> {
    let plane = (img.width() * img.height()) as usize;
    let mut out = vec![0.0f32; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (px[c] as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    out
}

/// The inverse of [`normalise`]: a `3 × h × w` model input back to RGB.
pub fn denormalise(chw: &[f32], (h, w): (usize, usize)) -> RgbImage {
    let plane = h * w;
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let i = y as usize * w + x as usize;
        image::Rgb(std::array::from_fn(|c| {
            ((chw[c * plane + i] * STD[c] + MEAN[c]) * 255.0)
                .round()
                .clamp(0.0, 255.0) as u8
        }))
    })
}

/// Decodes the image at `path` and returns it preprocessed as a normalised
/// `3 × size × size` f32 array (channel-major).
///
/// # Errors
/// [`Error::Image`] naming the file when it cannot be read or decoded.
pub fn load_image(path: &Path, pre: Preprocess) -> Result<Vec<f32>> {
    Ok(normalise(&pre.apply(&decode(path)?)))
}
