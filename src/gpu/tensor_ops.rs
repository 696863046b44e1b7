//! Small tensor kernels (`kernels/tensor_ops.cu`): row gathers and the mean
//! over tokens.

use super::params::{GatherRowsParams, MeanTokensParams};
use super::{Buffer, Device, Element, LaunchConfig, dim, kernel_name};
use crate::error::{Error, Result};

const THREADS: u32 = 256;

/// `out[img][r] = input[img][index[img][r]]` for rows of `width` elements:
/// `input` is batch×in_rows×width, `index` batch×out_rows, or out_rows
/// shared by every image, `out` batch×out_rows×width.
///
/// Indices out of range are clamped into it (memory stays safe; the rows
/// gathered are then meaningless).
///
/// # Errors
/// Shape errors naming the buffer; device errors.
pub fn gather_rows<T: Element>(
    device: &Device,
    input: &Buffer<T>,
    index: &Buffer<i32>,
    out: &mut Buffer<T>,
    (batch, in_rows, out_rows, width): (usize, usize, usize, usize),
) -> Result<()> {
    const OP: &str = "gather_rows";
    let index_images = if index.len() == out_rows && batch > 1 {
        1
    } else {
        batch
    };
    let params = GatherRowsParams {
        input: device.check(OP, "input", input, &[batch, in_rows, width])?,
        index: device.check(OP, "index", index, &[index_images, out_rows])?,
        out: device.check_mut(OP, "out", out, &[batch, out_rows, width])?,
        batch: dim(OP, "batch", batch)?,
        in_rows: dim(OP, "in_rows", in_rows)?,
        out_rows: dim(OP, "out_rows", out_rows)?,
        width: dim(OP, "width", width)?,
        index_images: dim(OP, "index images", index_images)?,
    };
    let total = batch * out_rows * width;
    if total == 0 {
        return Ok(());
    }
    if in_rows == 0 {
        return Err(Error::InvalidArgument(format!(
            "{OP}: no rows to gather from"
        )));
    }
    let config = LaunchConfig::grid_stride(OP, total, THREADS)?;
    // SAFETY: every buffer was checked against the shapes the kernel indexes.
    unsafe { device.launch(&kernel_name::<T>(OP), config, &params) }
}

/// `out[img][c]` = mean over tokens of `x[img][·][c]` (batch×tokens×channels → batch×channels).
///
/// # Errors
/// Shape errors naming the buffer; device errors.
pub fn mean_tokens<T: Element>(
    device: &Device,
    x: &Buffer<T>,
    out: &mut Buffer<T>,
    (batch, tokens, channels): (usize, usize, usize),
) -> Result<()> {
    const OP: &str = "mean_tokens";
    let params = MeanTokensParams {
        x: device.check(OP, "x", x, &[batch, tokens, channels])?,
        out: device.check_mut(OP, "out", out, &[batch, channels])?,
        batch: dim(OP, "batch", batch)?,
        tokens: dim(OP, "tokens", tokens)?,
        channels: dim(OP, "channels", channels)?,
    };
    if batch * channels == 0 {
        return Ok(());
    }
    let config = LaunchConfig::per_item(OP, batch * channels, THREADS)?;
    // SAFETY: both buffers were checked against the shapes the kernel indexes.
    unsafe { device.launch(&kernel_name::<T>(OP), config, &params) }
}
