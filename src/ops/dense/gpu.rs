//! Tokens onto the pixel grid on a [`Device`] (`kernels/dense.cu`).

use super::DenseOptions;
use crate::error::{Error, Result};
use crate::gpu::params::DenseParams;
use crate::gpu::{Buffer, Device, Element, LaunchConfig, dim, kernel_name};

/// Largest `k` the kernel supports (kept in registers).
pub const MAX_K: usize = 16;

const THREADS: u32 = 128;

/// As [`super::to_dense`]: positions b×n×2 and features b×n×c onto the
/// `h × w` grid, written to `out` (b×c×h×w).
///
/// Positions must lie on the grid, at most one token per cell (checked by
/// the CPU version; here a token off the grid only weighs by its distance).
///
/// # Errors
/// Shape errors naming the buffer; [`Error::InvalidArgument`] for `k`
/// outside `1..=16` or a non-positive power; device errors.
pub fn to_dense<T: Element>(
    device: &Device,
    pos: &Buffer<f32>,
    feat: &Buffer<T>,
    out: &mut Buffer<T>,
    (batch, n, c): (usize, usize, usize),
    (h, w): (usize, usize),
    options: DenseOptions,
) -> Result<()> {
    const OP: &str = "to_dense";
    if options.k == 0 || options.k > MAX_K || options.power.is_nan() || options.power <= 0.0 {
        return Err(Error::InvalidArgument(format!(
            "{OP}: needs 1 ≤ k ≤ {MAX_K} and power > 0 (k = {}, power = {})",
            options.k, options.power
        )));
    }
    let params = DenseParams {
        pos: device.check(OP, "pos", pos, &[batch, n, 2])?,
        feat: device.check(OP, "feat", feat, &[batch, n, c])?,
        out: device.check_mut(OP, "out", out, &[batch, c, h, w])?,
        batch: dim(OP, "batch", batch)?,
        n: dim(OP, "n", n)?,
        channels: dim(OP, "channels", c)?,
        h: dim(OP, "h", h)?,
        w: dim(OP, "w", w)?,
        k: dim(OP, "k", options.k)?,
        power: options.power,
    };
    if batch * c * h * w == 0 {
        return Ok(());
    }
    if n == 0 {
        return Err(Error::InvalidArgument(format!(
            "{OP}: no tokens to spread over the grid"
        )));
    }
    let config = LaunchConfig::per_item(OP, batch * h * w, THREADS)?;
    // SAFETY: every buffer was checked against the shapes the kernel indexes.
    unsafe { device.launch(&kernel_name::<T>(OP), config, &params) }
}
