//! Tokens onto the pixel grid on a [`Device`] (`kernels/dense.cu`).

use super::DenseOptions;
use crate::error::{Error, Result};
use crate::gpu::params::DenseParams;
use crate::gpu::{Buffer, Device, Element, LaunchConfig, dim, kernel_name};

/// Largest `k` the kernel supports (kept in registers).
pub const MAX_K: usize = 16;

const THREADS: u32 = 128;

/// How [`to_dense`] finds each cell's nearest tokens; both give the same
/// result on valid input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseSearch {
    /// Every token, per cell: `cells × n` distances.
    AllTokens,
    /// Square rings of cells around the cell on an occupancy map, until the
    /// k-th nearest is closer than the next ring: about `k × cells / n`
    /// cells read per cell, plus one pass to build the map.
    Rings,
}

impl DenseSearch {
    /// The cheaper search for `n` tokens on `cells` cells: rings once a
    /// cell's rings (~k·cells/n cells, each a scattered read) cost well
    /// under the tokens (each a read all threads share), `n² ≥ 8·k·cells`.
    /// At the model's stages (ds_rate 0.25, k = 4): stages 0–1 at 224²,
    /// 0–2 at 512², all four at Cityscapes' 1024×2048.
    pub fn for_sizes(n: usize, cells: usize, k: usize) -> Self {
        if (n as u128).pow(2) >= 8 * k as u128 * cells as u128 {
            Self::Rings
        } else {
            Self::AllTokens
        }
    }
}

/// As [`super::to_dense`]: positions b×n×2 and features b×n×c onto the
/// `h × w` grid, written to `out` (b×c×h×w), through the search
/// [`DenseSearch::for_sizes`] picks.
///
/// Positions must lie on the grid, at most one token per cell (checked by
/// the CPU version; here, as there, a cell keeps its lowest token when the
/// rings search, and a token off the grid is left out; searching all
/// tokens weighs it by its distance).
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
    let search = DenseSearch::for_sizes(n, h * w, options.k);
    to_dense_searching(
        device,
        pos,
        feat,
        out,
        (batch, n, c),
        (h, w),
        options,
        search,
    )
}

/// [`to_dense`] through a given search (to compare them).
///
/// # Errors
/// As [`to_dense`].
#[allow(clippy::too_many_arguments)] // to_dense's, and the search
pub fn to_dense_searching<T: Element>(
    device: &Device,
    pos: &Buffer<f32>,
    feat: &Buffer<T>,
    out: &mut Buffer<T>,
    (batch, n, c): (usize, usize, usize),
    (h, w): (usize, usize),
    options: DenseOptions,
    search: DenseSearch,
) -> Result<()> {
    const OP: &str = "to_dense";
    if options.k == 0 || options.k > MAX_K || options.power.is_nan() || options.power <= 0.0 {
        return Err(Error::InvalidArgument(format!(
            "{OP}: needs 1 ≤ k ≤ {MAX_K} and power > 0 (k = {}, power = {})",
            options.k, options.power
        )));
    }
    let mut params = DenseParams {
        pos: device.check(OP, "pos", pos, &[batch, n, 2])?,
        feat: device.check(OP, "feat", feat, &[batch, n, c])?,
        out: device.check_mut(OP, "out", out, &[batch, c, h, w])?,
        occupancy: 0,
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
    // Kept alive past the search's launch below (freed in stream order).
    let mut occupancy = None;
    if search == DenseSearch::Rings {
        let map = occupancy.insert(device.zeros::<i32>(batch * h * w)?);
        params.occupancy = device.check_mut(OP, "occupancy", map, &[batch, h, w])?;
        let config = LaunchConfig::per_item(OP, batch * n, THREADS)?;
        // SAFETY: as below; a token off the grid writes nothing.
        unsafe { device.launch("dense_occupancy", config, &params)? };
    }
    let config = LaunchConfig::per_item(OP, batch * h * w, THREADS)?;
    // SAFETY: every buffer was checked against the shapes the kernels index;
    // the occupancy map's marks are token indices in 0..n by construction.
    unsafe { device.launch(&kernel_name::<T>(OP), config, &params) }
}
