//! Small tensor kernels (`kernels/tensor_ops.cu`): row gathers, the mean
//! over tokens and column sums.

use super::params::{ColumnSumsParams, GatherRowsParams, MeanTokensParams};
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

/// Rows per partial sum of [`column_sums`]: fixed, so the order of the
/// additions, and the bits of the sums, depend on the matrix's shape alone
/// (never on the GPU, its occupancy or a thread count).
pub const COLUMN_SUM_CHUNK: usize = 64;

/// `out[k]` = the sum of column `k` of `input` (rows×cols, f32): the
/// backward's parameter gradients from each row's share, without atomics.
///
/// A tree of fixed shape: each pass adds chunks of [`COLUMN_SUM_CHUNK`] rows
/// in row order into one row each, until one row is left (so 200 704 rows
/// take three passes: 3136, 49, 1). A column is never summed by one thread
/// over all rows, which at a training batch would leave the GPU idle behind
/// a few hundred threads each reading 10⁵ rows. With no rows the one pass
/// writes zeros.
///
/// # Errors
/// Shape errors naming the buffer; device errors.
pub fn column_sums(
    device: &Device,
    input: &Buffer<f32>,
    out: &mut Buffer<f32>,
    (rows, cols): (usize, usize),
) -> Result<()> {
    const OP: &str = "column_sums";
    device.check(OP, "input", input, &[rows, cols])?;
    let out = device.check_mut(OP, "out", out, &[cols])?;
    if cols == 0 {
        return Ok(());
    }
    // The pass's input: the caller's matrix, then the previous pass's sums
    // (freed in stream order once the next pass has read them).
    let mut level: Option<Buffer<f32>> = None;
    let mut rows = rows;
    loop {
        let chunks = rows.div_ceil(COLUMN_SUM_CHUNK).max(1);
        let mut next = if chunks == 1 {
            None
        } else {
            Some(device.alloc::<f32>(chunks * cols)?)
        };
        let source = level.as_ref().unwrap_or(input);
        let sums = match next.as_mut() {
            Some(next) => device.check_mut(OP, "partial sums", next, &[chunks, cols])?,
            None => out,
        };
        let params = ColumnSumsParams {
            input: device.check(OP, "input", source, &[rows, cols])?,
            sums,
            rows: dim(OP, "rows", rows)?,
            cols: dim(OP, "cols", cols)?,
            chunk: dim(OP, "chunk", COLUMN_SUM_CHUNK)?,
        };
        // Threads over columns: a warp's reads of one row are coalesced.
        let threads = cols.next_multiple_of(32).min(THREADS as usize);
        let config = LaunchConfig::blocks(OP, chunks, cols.div_ceil(threads), threads as u32, 0)?;
        // SAFETY: the input and the sums were checked against the shapes the
        // kernel indexes (rows×cols in, ceil(rows / chunk)×cols out).
        unsafe { device.launch(OP, config, &params)? };
        match next {
            Some(next) => {
                level = Some(next);
                rows = chunks;
            }
            None => return Ok(()),
        }
    }
}
