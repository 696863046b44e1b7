//! Image decoding and the evaluation preprocessing of spec §11.

use std::path::Path;

use image::RgbImage;
use image::imageops::FilterType;

use crate::config::AffConfig;
use crate::error::{Error, Result};
use crate::limits::{MAX_DECODED_SIDE, MAX_DECODER_ALLOC, MAX_RESIZED_PIXELS};
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
    ///
    /// # Errors
    /// [`Error::TooLarge`] when the size or the image's aspect ratio would
    /// make the resized image larger than [`MAX_RESIZED_PIXELS`] (checked
    /// before resizing); [`Error::InvalidArgument`] for an empty image or size.
    pub fn apply(&self, img: &RgbImage) -> Result<RgbImage> {
        let (w, h) = img.dimensions();
        let too_large = |nw: u64, nh: u64| Error::TooLarge {
            what: format!(
                "a {w}×{h} image resized for a {0}×{0} model input",
                self.size
            ),
            asked: format!("{nw}×{nh} pixels"),
            limit: format!("{MAX_RESIZED_PIXELS} pixels"),
        };
        let size =
            u32::try_from(self.size).map_err(|_| too_large(self.size as u64, self.size as u64))?;
        if w == 0 || h == 0 || size == 0 {
            return Err(Error::InvalidArgument(format!(
                "cannot resize a {w}×{h} image to {size}×{size}"
            )));
        }
        // Catmull-Rom is the a = -0.5 bicubic of PIL, which the published
        // evaluation uses; the image crate widens it when downscaling as PIL does.
        if !self.crop {
            let side = size as u64;
            if side * side > MAX_RESIZED_PIXELS {
                return Err(too_large(side, side));
            }
            return Ok(image::imageops::resize(
                img,
                size,
                size,
                FilterType::CatmullRom,
            ));
        }
        let short = ((self.size as u64 * 256) / 224).max(size as u64);
        let (nw, nh) = if w <= h {
            (short, short * h as u64 / w as u64)
        } else {
            (short * w as u64 / h as u64, short)
        };
        if nw.saturating_mul(nh) > MAX_RESIZED_PIXELS {
            return Err(too_large(nw, nh));
        }
        let (nw, nh) = (nw as u32, nh as u32);
        let resized = image::imageops::resize(img, nw, nh, FilterType::CatmullRom);
        let top = round_half_even((nh - size) as f64 / 2.0) as u32;
        let left = round_half_even((nw - size) as f64 / 2.0) as u32;
        Ok(image::imageops::crop_imm(&resized, left, top, size, size).to_image())
    }
}

/// Decodes the PNG or JPEG at `path` to RGB.
///
/// # Errors
/// [`Error::Image`] naming the file when it cannot be read or decoded;
/// [`Error::TooLarge`] when it declares more than the decoder's limits.
pub fn decode(path: &Path) -> Result<RgbImage> {
    let bad = |reason: String| Error::Image {
        path: path.to_path_buf(),
        reason,
    };
    let mut reader = image::ImageReader::open(path)
        .map_err(|e| bad(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?;
    // The decoder checks the declared size before it allocates.
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_DECODED_SIDE);
    limits.max_image_height = Some(MAX_DECODED_SIDE);
    limits.max_alloc = Some(MAX_DECODER_ALLOC);
    reader.limits(limits);
    let img = match reader.decode() {
        Ok(img) => img,
        Err(image::ImageError::Limits(e)) => {
            let declared = image::image_dimensions(path).map_or_else(
                |_| "its size".to_string(),
                |(w, h)| format!("{w}×{h} pixels"),
            );
            return Err(Error::TooLarge {
                what: format!("{}: image of {declared}", path.display()),
                asked: format!("more than the decoder allows ({e})"),
                limit: format!(
                    "{MAX_DECODED_SIDE} pixels a side and {} MiB",
                    MAX_DECODER_ALLOC >> 20
                ),
            });
        }
        Err(e) => return Err(bad(format!("cannot decode: {e}"))),
    };
    // RGBA → RGB allocates one more image: the decoder's limit bounds it too.
    let img = img.to_rgb8();
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
/// [`Error::Image`] naming the file when it cannot be read or decoded;
/// [`Error::TooLarge`] naming it when it is too large to decode or resize.
pub fn load_image(path: &Path, pre: Preprocess) -> Result<Vec<f32>> {
    let img = decode(path)?;
    let ready = pre.apply(&img).map_err(|e| match e {
        Error::TooLarge { what, asked, limit } => Error::TooLarge {
            what: format!("{}: {what}", path.display()),
            asked,
            limit,
        },
        other => other,
    })?;
    Ok(normalise(&ready))
}
