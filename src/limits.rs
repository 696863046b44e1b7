//! Upper bounds on every size that comes from outside: a file, a
//! configuration or an option. Sizes are computed with checked arithmetic
//! and compared with these bounds (or with what the input really holds, or
//! with the memory a run would need) *before* anything is allocated, so a
//! small file that declares a huge size gets one clear [`Error::TooLarge`]
//! instead of an abort. No published or sensible model comes near them.

use crate::config::AffConfig;
use crate::error::{Error, Result};
use crate::model::{ModelKind, expected_tensors};

/// Stages of a model.
pub const MAX_STAGES: usize = 8;
/// Channels of a stage.
pub const MAX_EMBED_DIM: usize = 16_384;
/// Attention heads of a stage.
pub const MAX_HEADS: usize = 1024;
/// Blocks of a stage.
pub const MAX_BLOCKS_PER_STAGE: usize = 1024;
/// MLP hidden width as a multiple of the channels.
pub const MAX_MLP_RATIO: f64 = 64.0;
/// Classes of a classification head.
pub const MAX_CLASSES: usize = 1 << 20;
/// Tokens per cluster.
pub const MAX_CLUSTER_SIZE: usize = 4096;
/// Neighbourhood size.
pub const MAX_NBHD_SIZE: usize = 1 << 16;
/// Side of a model input, in pixels, and a config's `img_size`. At 8192
/// the stage-0 grid is at most 2048 tokens wide, so squared distances
/// between grid positions stay below 2^24, where f32 holds them exactly.
pub const MAX_IMAGE_SIDE: usize = 8192;
/// Width and height an image file may declare to its decoder.
pub const MAX_DECODED_SIDE: u32 = 1 << 15;
/// Bytes the image decoder may allocate for one image.
pub const MAX_DECODER_ALLOC: u64 = 1 << 30;
/// Pixels of an image after its resize (before the centre crop): bounds
/// what an extreme aspect ratio costs (a 1×60000 image resized to a shorter
/// side of 256 would be 15 million pixels wide).
pub const MAX_RESIZED_PIXELS: u64 = 1 << 24;
/// Worker threads.
pub const MAX_THREADS: usize = 1024;

/// Memory a run may plan to use: the `AUTOFOCUS_MEMORY_LIMIT_MIB` variable,
/// else the memory the system reports available (`MemAvailable`), else 8 GiB.
pub fn memory_budget() -> u64 {
    if let Some(mib) = std::env::var("AUTOFOCUS_MEMORY_LIMIT_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        return mib.saturating_mul(1 << 20);
    }
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib.saturating_mul(1024))
        })
        .unwrap_or(8 << 30)
}

/// The product of `sizes`, or `None` when it overflows.
pub fn checked_product(sizes: &[usize]) -> Option<usize> {
    sizes.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// `Err(TooLarge)` unless `value ≤ limit`.
///
/// # Errors
/// [`Error::TooLarge`] naming `what`.
pub fn at_most(what: impl Into<String>, value: u64, limit: u64) -> Result<()> {
    if value <= limit {
        Ok(())
    } else {
        Err(Error::TooLarge {
            what: what.into(),
            asked: value.to_string(),
            limit: limit.to_string(),
        })
    }
}

/// Parameters of a `kind` model of `config` (a valid configuration).
pub fn parameter_count(config: &AffConfig, kind: ModelKind) -> u64 {
    expected_tensors(config, kind)
        .values()
        .map(|shape| checked_product(shape).map_or(u64::MAX, |n| n as u64))
        .fold(0u64, u64::saturating_add)
}

/// A generous estimate of the bytes a CPU forward pass of `batch` images of
/// `height × width` pixels takes with a `kind` model of `config`: weights,
/// input, patch embedding, every stage's activations and neighbour lists
/// (as if all lived at once), and the per-offset position tables.
pub fn forward_bytes(
    config: &AffConfig,
    kind: ModelKind,
    batch: usize,
    (height, width): (usize, usize),
) -> u64 {
    // Saturating throughout: an absurd request must come out huge, not wrap.
    let mul = |factors: &[u64]| factors.iter().fold(1u64, |acc, &f| acc.saturating_mul(f));
    let f = 4u64; // bytes per f32
    let (h, w) = (height as u64, width as u64);
    let (gh, gw) = (h.div_ceil(4), w.div_ceil(4));
    let d0 = config.embed_dim[0] as u64;
    // One image: the input, the patch embedding's im2col and outputs, and
    // every stage's activations and neighbour lists.
    let half = mul(&[h.div_ceil(2), w.div_ceil(2)]);
    let mut image = mul(&[3, h, w, f])
        .saturating_add(mul(&[half, 27 + d0 / 2, f]))
        .saturating_add(mul(&[gh, gw, d0 / 2 * 9 + 2 * d0, f]));
    let mut n = mul(&[gh, gw]);
    let mut heads_max = 0u64;
    for s in 0..config.num_stages() {
        let c = config.embed_dim[s] as u64;
        let hidden = config.mlp_hidden(s) as u64;
        let m = (config.nbhd_size[s] as u64 + config.cluster_size as u64).min(n);
        // x, its norm, q, kv (2c), attention out, the MLP's hidden layer;
        // u32 neighbour indices and a bool mask.
        image = image
            .saturating_add(mul(&[n, 6 * c + hidden, f]))
            .saturating_add(mul(&[n, m, 5]));
        heads_max = heads_max.max(config.num_heads[s] as u64);
        n = ((n as f64 * config.ds_rate) as u64).max(1);
    }
    // Offsets of the grid, with their features, one block's bias and the weight net.
    let offsets = mul(&[(2 * gh).saturating_sub(1), (2 * gw).saturating_sub(1)]);
    mul(&[parameter_count(config, kind), f])
        .saturating_add(mul(&[batch as u64, image]))
        .saturating_add(mul(&[offsets, 5 + heads_max + 4, f]))
}

/// Refuses a forward pass whose [`forward_bytes`] exceed the
/// [`memory_budget`], naming `what` asks for it.
///
/// # Errors
/// [`Error::TooLarge`] with the estimate and the budget in MiB.
pub fn check_forward_memory(
    what: &str,
    config: &AffConfig,
    kind: ModelKind,
    batch: usize,
    size: (usize, usize),
) -> Result<()> {
    let need = forward_bytes(config, kind, batch, size);
    let budget = memory_budget();
    if need <= budget {
        return Ok(());
    }
    Err(Error::TooLarge {
        what: format!(
            "{what}: a forward pass of {batch} image(s) of {}×{} pixels",
            size.0, size.1
        ),
        asked: format!("about {} MiB", need >> 20),
        limit: format!("{} MiB available", budget >> 20),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_that_overflow_are_none() {
        assert_eq!(checked_product(&[3, 4, 5]), Some(60));
        assert_eq!(checked_product(&[]), Some(1));
        assert_eq!(checked_product(&[1 << 40, 1 << 40]), None);
        assert_eq!(checked_product(&[1 << 40, 1 << 40, 0]), None);
    }

    #[test]
    fn the_estimate_grows_with_the_input_and_fits_a_normal_run() {
        let mini = AffConfig::preset("aff_mini").unwrap();
        let one = forward_bytes(&mini, ModelKind::Classifier, 1, (224, 224));
        let eight = forward_bytes(&mini, ModelKind::Classifier, 8, (224, 224));
        // aff_mini: 6.8M parameters (27 MB); measured peak ~150 MiB at batch 8.
        assert!(one > 27 << 20 && one < 200 << 20, "{one}");
        assert!(eight > one && eight < 1 << 30, "{eight}");
        let huge = forward_bytes(&mini, ModelKind::Classifier, 100_000, (128, 128));
        assert!(huge > 20 << 30, "{huge}");
        let absurd = forward_bytes(&mini, ModelKind::Classifier, usize::MAX, (usize::MAX, 7));
        assert_eq!(absurd, u64::MAX);
    }
}
