//! Stable ascending sort of per-image keys (`kernels/sort.cu`), shared by
//! the clustering (spec §3) and the token selection (spec §7).

use super::params::StableSortParams;
use super::{Buffer, Device, LaunchConfig, dim};
use crate::error::Result;

const THREADS: u32 = 256;

/// `order[img][r]` = index of image `img`'s `r`-th smallest key, equal keys
/// in index order. Keys must not be NaN.
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
    let params = StableSortParams {
        keys: device.check(OP, "keys", keys, &[batch, n])?,
        order: device.check_mut(OP, "order", order, &[batch, n])?,
        batch: dim(OP, "batch", batch)?,
        n: dim(OP, "n", n)?,
    };
    if batch * n == 0 {
        return Ok(());
    }
    let config = LaunchConfig::blocks(OP, n.div_ceil(THREADS as usize), batch, THREADS, 0)?;
    // SAFETY: both buffers were checked against the shapes the kernel indexes.
    unsafe { device.launch(OP, config, &params) }
}
