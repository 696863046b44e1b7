//! Stable ascending sort of per-image keys (`kernels/sort.cu`), shared by
//! the clustering (spec §3) and the token selection (spec §7): a bottom-up
//! merge sort, one launch per doubling of the sorted runs.

use super::params::StableSortParams;
use super::{Buffer, Device, LaunchConfig, dim};
use crate::error::Result;

const THREADS: u32 = 256;

/// `order[img][r]` = index of image `img`'s `r`-th smallest key, equal keys
/// in index order. Keys must not be NaN. `ceil(log2 n)` launches (one for
/// `n = 1`), each `O(n log n)`.
///
/// # Errors
/// Shape errors naming the buffer; device errors.
pub fn stable_sort(
    device: &Device,
    keys: &Buffer<f32>,
    order: &mut Buffer<i32>,
    batch: usize,
    n: usize,
) -> Result<()> {
    const OP: &str = "stable_sort";
    let keys_addr = device.check(OP, "keys", keys, &[batch, n])?;
    device.check_mut(OP, "order", order, &[batch, n])?;
    let (batch_i, n_i) = (dim(OP, "batch", batch)?, dim(OP, "n", n)?);
    if batch * n == 0 {
        return Ok(());
    }
    // Run widths 1, 2, 4, …: as many passes as doublings to cover n.
    let passes = (usize::BITS - (n - 1).leading_zeros()).max(1);
    // Ping-pong so that the last pass writes `order`.
    let mut scratch = if passes > 1 {
        Some(device.alloc::<i32>(batch * n)?)
    } else {
        None
    };
    let config = LaunchConfig::blocks(OP, n.div_ceil(THREADS as usize), batch, THREADS, 0)?;
    for pass in 0..passes {
        // Pass k writes `order` when an even number of passes follow it.
        let into_order = (passes - 1 - pass).is_multiple_of(2);
        let shape = [batch, n];
        let src = match (pass, scratch.as_ref()) {
            (0, _) | (_, None) => 0, // runs of one: the identity
            (_, Some(s)) if into_order => device.check(OP, "scratch", s, &shape)?,
            _ => device.check(OP, "order", order, &shape)?,
        };
        let dst = match scratch.as_mut() {
            Some(s) if !into_order => device.check_mut(OP, "scratch", s, &shape)?,
            _ => device.check_mut(OP, "order", order, &shape)?,
        };
        let params = StableSortParams {
            keys: keys_addr,
            src,
            dst,
            batch: batch_i,
            n: n_i,
            width: dim(OP, "width", 1 << pass)?,
        };
        // SAFETY: every buffer was checked against the shape the kernel
        // indexes (batch × n); `src` and `dst` are distinct buffers.
        unsafe { device.launch(OP, config, &params)? };
    }
    Ok(())
}
