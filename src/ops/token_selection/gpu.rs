//! Importance and token selection on a [`Device`]
//! (`kernels/token_selection.cu`, and the stable sort of `kernels/sort.cu`).

use crate::error::{Error, Result};
use crate::gpu::params::{
    ImportanceBackwardParams, ImportanceParams, SelectionCheckParams, SelectionKeysParams,
    SelectionOrderParams,
};
use crate::gpu::sort::stable_sort;
use crate::gpu::tensor_ops::column_sums;
use crate::gpu::{Buffer, Device, Element, LaunchConfig, dim, kernel_name};

/// [`super::Selection`] with the order on the device.
#[derive(Debug)]
pub struct DeviceSelection {
    pub batch: usize,
    pub kept: usize,
    pub sampled: usize,
    pub reserve: usize,
    /// b×kept indices: sampled centres by descending score, then reserve tokens.
    pub order: Buffer<i32>,
}

const THREADS: u32 = 256;

/// `out = sigmoid(x · weight + bias)` per row of `x` (rows×dim), in f32:
/// the `prob_net` of spec §7.
///
/// # Errors
/// Shape errors naming the buffer; device errors.
pub fn importance<T: Element>(
    device: &Device,
    x: &Buffer<T>,
    weight: &Buffer<f32>,
    bias: f32,
    out: &mut Buffer<f32>,
    (rows, d): (usize, usize),
) -> Result<()> {
    const OP: &str = "importance";
    let params = ImportanceParams {
        x: device.check(OP, "x", x, &[rows, d])?,
        weight: device.check(OP, "weight", weight, &[d])?,
        out: device.check_mut(OP, "out", out, &[rows])?,
        rows: dim(OP, "rows", rows)?,
        dim: dim(OP, "dim", d)?,
        bias,
    };
    if rows == 0 {
        return Ok(());
    }
    let config = LaunchConfig::per_item(OP, rows * 32, THREADS)?;
    // SAFETY: every buffer was checked against the shapes the kernel indexes.
    unsafe { device.launch(&kernel_name::<T>(OP), config, &params) }
}

/// Gradients of [`importance`] on a device: `x` (rows×dim) and the
/// `prob_net` parameters (`dim` weights, then the bias, in `params`).
#[derive(Debug)]
pub struct DeviceImportanceGrads<T: Element> {
    pub x: Buffer<T>,
    pub params: Buffer<f32>,
}

/// The backward of [`importance`], as [`super::importance_backward`]: from
/// the forward's output `p` and its gradient `grad_p` (what the merge's
/// backward returns). The weight and bias gradients are each row's share
/// added by [`column_sums`] in a fixed order: the same bits on every run.
///
/// # Errors
/// Shape errors naming the buffer; device errors.
pub fn importance_backward<T: Element>(
    device: &Device,
    x: &Buffer<T>,
    weight: &Buffer<f32>,
    p: &Buffer<f32>,
    grad_p: &Buffer<f32>,
    (rows, d): (usize, usize),
) -> Result<DeviceImportanceGrads<T>> {
    const OP: &str = "importance_backward";
    let mut grads = DeviceImportanceGrads {
        x: device.alloc::<T>(rows * d)?,
        params: device.alloc::<f32>(d + 1)?,
    };
    let mut partials = device.alloc::<f32>(rows * (d + 1))?;
    let params = ImportanceBackwardParams {
        x: device.check(OP, "x", x, &[rows, d])?,
        weight: device.check(OP, "weight", weight, &[d])?,
        p: device.check(OP, "p", p, &[rows])?,
        grad_p: device.check(OP, "grad_p", grad_p, &[rows])?,
        grad_x: device.check_mut(OP, "grad_x", &mut grads.x, &[rows, d])?,
        row_partials: device.check_mut(OP, "row_partials", &mut partials, &[rows, d + 1])?,
        rows: dim(OP, "rows", rows)?,
        dim: dim(OP, "dim", d)?,
    };
    let elements = LaunchConfig::per_item(OP, rows * (d + 1), THREADS)?;
    if rows > 0 {
        // SAFETY: every buffer was checked against the shapes the kernel
        // indexes.
        unsafe { device.launch(&kernel_name::<T>(OP), elements, &params)? };
    }
    // The kernel wrote every share before column_sums (same stream) reads them.
    column_sums(device, &partials, &mut grads.params, (rows, d + 1))?;
    Ok(grads)
}

/// As [`super::select_tokens`], on a device. Reads back one count per image
/// (the reserve tokens), which sizes the result: a general op for any
/// positions. The model, whose reserve count the grid fixes, uses
/// [`select_tokens_on_grid`], which reads nothing back.
///
/// # Errors
/// Shape errors; [`Error::InvalidArgument`] when the images of the batch
/// hold different numbers of reserve tokens; device errors.
#[allow(clippy::too_many_arguments)]
pub fn select_tokens(
    device: &Device,
    pos: &Buffer<f32>,
    importance: &Buffer<f32>,
    batch: usize,
    n: usize,
    stride: usize,
    alpha: f32,
    ds_rate: f64,
) -> Result<DeviceSelection> {
    let (keys, reserve_count) = selection_keys(device, pos, importance, (batch, n), stride, alpha)?;
    let counts = device.download(&reserve_count)?;
    let reserve = counts.first().map_or(0, |&r| r as usize);
    if counts.iter().any(|&r| r as usize != reserve) {
        return Err(Error::InvalidArgument(
            "select_tokens: images of one batch must have the same reserve-grid tokens".into(),
        ));
    }
    selection_order(device, &keys, (batch, n), reserve, ds_rate)
}

/// As [`select_tokens`] for tokens that hold every point of the coarse
/// reserve grid, whose count is then known on the host
/// ([`super::grid_reserve_count`]): nothing is read back, so the selection
/// can sit in a captured graph. Where an image's count differs after all,
/// the kernels set `mismatch[0]` to 1 (`mismatch` is one value, zeroed by
/// the caller); the caller reads it once its results are read, and must
/// not trust them when it is set.
///
/// # Errors
/// Shape errors; device errors.
#[allow(clippy::too_many_arguments)]
pub fn select_tokens_on_grid(
    device: &Device,
    pos: &Buffer<f32>,
    importance: &Buffer<f32>,
    batch: usize,
    n: usize,
    stride: usize,
    reserve: usize,
    alpha: f32,
    ds_rate: f64,
    mismatch: &mut Buffer<i32>,
) -> Result<DeviceSelection> {
    const OP: &str = "select_tokens_on_grid";
    if reserve > n {
        return Err(Error::InvalidArgument(format!(
            "{OP}: {reserve} reserve tokens expected among {n}"
        )));
    }
    let (keys, reserve_count) = selection_keys(device, pos, importance, (batch, n), stride, alpha)?;
    let params = SelectionCheckParams {
        reserve_count: device.check(OP, "reserve_count", &reserve_count, &[batch])?,
        mismatch: device.check_mut(OP, "mismatch", mismatch, &[1])?,
        batch: dim(OP, "batch", batch)?,
        reserve: dim(OP, "reserve", reserve)?,
    };
    if batch > 0 {
        let config = LaunchConfig::per_item(OP, batch, THREADS)?;
        // SAFETY: both buffers were checked against the shapes the kernel indexes.
        unsafe { device.launch("selection_check", config, &params)? };
    }
    selection_order(device, &keys, (batch, n), reserve, ds_rate)
}

/// The sort keys of `batch` images of `n` tokens, and each image's count
/// of reserve tokens (on the device).
fn selection_keys(
    device: &Device,
    pos: &Buffer<f32>,
    importance: &Buffer<f32>,
    (batch, n): (usize, usize),
    stride: usize,
    alpha: f32,
) -> Result<(Buffer<f32>, Buffer<i32>)> {
    const OP: &str = "select_tokens";
    if stride == 0 {
        return Err(Error::InvalidArgument(format!(
            "{OP}: stride must be positive"
        )));
    }
    let mut keys = device.alloc::<f32>(batch * n)?;
    let mut reserve_count = device.zeros::<i32>(batch)?;
    let params = SelectionKeysParams {
        pos: device.check(OP, "pos", pos, &[batch, n, 2])?,
        importance: device.check(OP, "importance", importance, &[batch, n])?,
        keys: device.check_mut(OP, "keys", &mut keys, &[batch, n])?,
        reserve_count: device.check_mut(OP, "reserve_count", &mut reserve_count, &[batch])?,
        batch: dim(OP, "batch", batch)?,
        n: dim(OP, "n", n)?,
        stride: dim(OP, "stride", stride)?,
        alpha,
    };
    if batch * n > 0 {
        let config = LaunchConfig::per_item(OP, batch * n, THREADS)?;
        // SAFETY: every buffer was checked against the shapes the kernel indexes.
        unsafe { device.launch("selection_keys", config, &params)? };
    }
    Ok((keys, reserve_count))
}

/// The kept tokens: the stable sort of `keys`, its first `keep − reserve`
/// (the sampled centres), then its last `reserve` (the reserve tokens).
fn selection_order(
    device: &Device,
    keys: &Buffer<f32>,
    (batch, n): (usize, usize),
    reserve: usize,
    ds_rate: f64,
) -> Result<DeviceSelection> {
    const OP: &str = "select_tokens";
    let keep = (n as f64 * ds_rate) as usize;
    let sampled = keep.saturating_sub(reserve).min(n - reserve);
    let kept = sampled + reserve;
    let mut sorted = device.alloc::<i32>(batch * n)?;
    stable_sort(device, keys, &mut sorted, batch, n)?;
    let mut order = device.alloc::<i32>(batch * kept)?;
    let params = SelectionOrderParams {
        sorted: device.check(OP, "sorted", &sorted, &[batch, n])?,
        order: device.check_mut(OP, "order", &mut order, &[batch, kept])?,
        batch: dim(OP, "batch", batch)?,
        n: dim(OP, "n", n)?,
        sampled: dim(OP, "sampled", sampled)?,
        reserve: dim(OP, "reserve", reserve)?,
    };
    if batch * kept > 0 {
        let config = LaunchConfig::per_item(OP, batch * kept, THREADS)?;
        // SAFETY: every buffer was checked against the shapes the kernel indexes.
        unsafe { device.launch("selection_order", config, &params)? };
    }
    Ok(DeviceSelection {
        batch,
        kept,
        sampled,
        reserve,
        order,
    })
}
