//! Fused cluster attention on a [`Device`] (`kernels/cluster_attention.cu`).
//! Unlike the CPU path, the position bias is computed from the two
//! positions per neighbour, so no per-offset table or row index is needed.

use crate::error::{Error, Result};
use crate::gpu::params::AttentionParams;
use crate::gpu::{Buffer, Device, Element, LaunchConfig, MAX_SHARED_BYTES, dim, kernel_name};
use crate::ops::neighbourhood::gpu::DeviceNeighbourhood;

/// Inputs of [`cluster_attention`]: as [`super::AttentionInputs`], with
/// positions and the `pos_embed` layer in place of the bias table.
#[derive(Debug, Clone, Copy)]
pub struct DeviceAttentionInputs<'a, T: Element> {
    /// b×n×c unscaled queries.
    pub q: &'a Buffer<T>,
    pub q_scale: f32,
    /// b×n×2c keys and values, heads outermost, then k/v.
    pub kv: &'a Buffer<T>,
    pub nbhd: &'a DeviceNeighbourhood,
    /// b×n×2 token positions.
    pub pos: &'a Buffer<f32>,
    /// heads×5 `pos_embed` weight and its heads bias.
    pub pos_weight: &'a Buffer<f32>,
    pub pos_bias: &'a Buffer<f32>,
    /// c: blank-token key and value, heads outermost.
    pub blank_k: &'a Buffer<f32>,
    pub blank_v: &'a Buffer<f32>,
    /// Offsets clamped to ±this per axis (segmentation: 511), or none.
    pub offset_clamp: Option<f32>,
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// Shared-memory floats one warp needs: query (c), features (5m), logits (m + 1).
fn shared_floats_per_warp(c: usize, m: usize) -> usize {
    c + 6 * m + 1
}

/// Computes the attention output (b×n×c, heads concatenated, before `proj`) into `out`.
///
/// # Errors
/// Shape errors naming the buffer; [`Error::Unsupported`] when one query's
/// neighbourhood does not fit in shared memory; device errors.
pub fn cluster_attention<T: Element>(
    device: &Device,
    inp: &DeviceAttentionInputs<'_, T>,
    out: &mut Buffer<T>,
) -> Result<()> {
    const OP: &str = "cluster_attention";
    let (b, n, h, d) = (inp.batch, inp.tokens, inp.heads, inp.head_dim);
    let c = h * d;
    let m = inp.nbhd.size;
    let (nbhd, mask) = inp.nbhd.check(device, OP, b, n)?;
    let params = AttentionParams {
        q: device.check(OP, "q", inp.q, &[b, n, c])?,
        kv: device.check(OP, "kv", inp.kv, &[b, n, 2 * c])?,
        nbhd,
        mask,
        pos: device.check(OP, "pos", inp.pos, &[b, n, 2])?,
        pos_weight: device.check(OP, "pos_weight", inp.pos_weight, &[h, 5])?,
        pos_bias: device.check(OP, "pos_bias", inp.pos_bias, &[h])?,
        blank_k: device.check(OP, "blank_k", inp.blank_k, &[c])?,
        blank_v: device.check(OP, "blank_v", inp.blank_v, &[c])?,
        out: device.check_mut(OP, "out", out, &[b, n, c])?,
        batch: dim(OP, "batch", b)?,
        tokens: dim(OP, "tokens", n)?,
        m: dim(OP, "m", m)?,
        heads: dim(OP, "heads", h)?,
        head_dim: dim(OP, "head_dim", d)?,
        nbhd_images: dim(OP, "nbhd.images", inp.nbhd.images)?,
        q_scale: inp.q_scale,
        offset_clamp: inp.offset_clamp.unwrap_or(f32::INFINITY),
        cluster_size: 0,
        tile_clusters: 0,
    };
    if b * n * c == 0 {
        return Ok(());
    }
    if m == 0 {
        return Err(Error::InvalidArgument(format!(
            "{OP}: empty neighbourhoods"
        )));
    }
    if let Some(config) = tiled_launch(inp.nbhd, (b, n, c, d))? {
        let params = AttentionParams {
            cluster_size: config.0 as i32,
            tile_clusters: config.1 as i32,
            ..params
        };
        // SAFETY: as below; the tile bookkeeping is sized from the same
        // cluster size and neighbourhood the kernel reads.
        return unsafe {
            device.launch(
                &kernel_name::<T>("cluster_attention_tiled"),
                config.2,
                &params,
            )
        };
    }
    let per_warp = shared_floats_per_warp(c, m) * size_of::<f32>();
    let what = format!("a neighbourhood of {m} tokens with {c} channels");
    let config = LaunchConfig::warp_per_row(OP, b * n, per_warp, what)?;
    // SAFETY: every buffer was checked against the shapes the kernel indexes;
    // neighbour indices are clamped into range by the kernel.
    unsafe { device.launch(&kernel_name::<T>(OP), config, &params) }
}

/// The tiled kernel's launch when the neighbourhoods are whole clusters and
/// its shared memory fits: (cluster size, clusters the tile holds, config).
fn tiled_launch(
    nbhd: &DeviceNeighbourhood,
    (b, n, c, d): (usize, usize, usize, usize),
) -> Result<Option<(usize, usize, LaunchConfig)>> {
    let m = nbhd.size;
    let Some(s) = nbhd
        .cluster_size
        .filter(|&s| s > 0 && s <= 32 && m.is_multiple_of(s))
    else {
        return Ok(None);
    };
    if nbhd.idx.is_none() {
        return Ok(None);
    }
    let entries = m; // s queries × nnc clusters
    let ints = (5 * entries + 1).div_ceil(4) * 4;
    let fixed = (ints + s * shared_floats_per_warp(c, m)) * size_of::<f32>();
    let per_cluster = s * 2 * (d + 1) * size_of::<f32>();
    if fixed >= MAX_SHARED_BYTES || entries > 1024 {
        return Ok(None);
    }
    let tile_clusters = ((MAX_SHARED_BYTES - fixed) / per_cluster).min(entries);
    if tile_clusters == 0 {
        return Ok(None);
    }
    let blocks = b * n.div_ceil(s);
    let shared = fixed + tile_clusters * per_cluster;
    let config = LaunchConfig::blocks("cluster_attention", blocks, 1, 32 * s as u32, shared)?;
    Ok(Some((s, tile_clusters, config)))
}
