//! Fused cluster attention on a [`Device`] (`kernels/cluster_attention.cu`).
//! Unlike the CPU path, the position bias is computed from the two
//! positions per neighbour, so no per-offset table or row index is needed.

use crate::error::{Error, Result};
use crate::gpu::params::{AttentionBackwardParams, AttentionParams};
use crate::gpu::tensor_ops::column_sums;
use crate::gpu::{Buffer, Device, Element, LaunchConfig, MAX_SHARED_BYTES, dim, kernel_name};
use crate::ops::neighbourhood::gpu::{DeviceInverse, DeviceNeighbourhood};

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

/// The parameters' checked launch fields, shared by the forward and the backward.
fn forward_params<T: Element>(
    device: &Device,
    op: &'static str,
    inp: &DeviceAttentionInputs<'_, T>,
) -> Result<AttentionParams> {
    let (b, n, h, d) = (inp.batch, inp.tokens, inp.heads, inp.head_dim);
    let c = h * d;
    let m = inp.nbhd.size;
    let (nbhd, mask) = inp.nbhd.check(device, op, b, n)?;
    Ok(AttentionParams {
        q: device.check(op, "q", inp.q, &[b, n, c])?,
        kv: device.check(op, "kv", inp.kv, &[b, n, 2 * c])?,
        nbhd,
        mask,
        pos: device.check(op, "pos", inp.pos, &[b, n, 2])?,
        pos_weight: device.check(op, "pos_weight", inp.pos_weight, &[h, 5])?,
        pos_bias: device.check(op, "pos_bias", inp.pos_bias, &[h])?,
        blank_k: device.check(op, "blank_k", inp.blank_k, &[c])?,
        blank_v: device.check(op, "blank_v", inp.blank_v, &[c])?,
        out: 0,
        batch: dim(op, "batch", b)?,
        tokens: dim(op, "tokens", n)?,
        m: dim(op, "m", m)?,
        heads: dim(op, "heads", h)?,
        head_dim: dim(op, "head_dim", d)?,
        nbhd_images: dim(op, "nbhd.images", inp.nbhd.images)?,
        q_scale: inp.q_scale,
        offset_clamp: inp.offset_clamp.unwrap_or(f32::INFINITY),
        cluster_size: 0,
        tile_clusters: 0,
    })
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
    let params = AttentionParams {
        out: device.check_mut(OP, "out", out, &[b, n, c])?,
        ..forward_params(device, OP, inp)?
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
            device.launch(&kernel_name::<T>(tiled_kernel(config.0)), config.2, &params)
        };
    }
    let per_warp = shared_floats_per_warp(c, m) * size_of::<f32>();
    let what = format!("a neighbourhood of {m} tokens with {c} channels");
    let config = LaunchConfig::warp_per_row(OP, b * n, per_warp, what)?;
    // SAFETY: every buffer was checked against the shapes the kernel indexes;
    // neighbour indices are clamped into range by the kernel.
    unsafe { device.launch(&kernel_name::<T>(OP), config, &params) }
}

/// The tiled kernel's instance for cluster size `s`: one compiled for it
/// (the presets' sizes), or the one that reads it at run time.
fn tiled_kernel(s: usize) -> &'static str {
    match s {
        6 => "cluster_attention_tiled_s6",
        8 => "cluster_attention_tiled_s8",
        24 => "cluster_attention_tiled_s24",
        _ => "cluster_attention_tiled_any",
    }
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

/// Gradients of the attention on a device.
#[derive(Debug)]
pub struct DeviceAttentionGrads<T: Element> {
    /// b×n×c, with respect to the unscaled `q`.
    pub q: Buffer<T>,
    /// b×n×2c, keys and values in the forward's layout.
    pub kv: Buffer<T>,
    /// `6·heads + 2·c` values: `pos_embed.weight` (heads×5), `pos_embed.bias`
    /// (heads), `blank_k` (c), `blank_v` (c); see [`split_param_grads`].
    pub params: Buffer<f32>,
}

/// Splits downloaded [`DeviceAttentionGrads::params`] into `(pos_weight,
/// pos_bias, blank_k, blank_v)`.
pub fn split_param_grads(params: &[f32], heads: usize) -> (&[f32], &[f32], &[f32], &[f32]) {
    let c = (params.len() - 6 * heads) / 2;
    let (pos_weight, rest) = params.split_at(5 * heads);
    let (pos_bias, rest) = rest.split_at(heads);
    let (blank_k, blank_v) = rest.split_at(c);
    (pos_weight, pos_bias, blank_k, blank_v)
}

/// Channels per head the backward kernels keep in registers (32 lanes × 8).
pub const MAX_BACKWARD_HEAD_DIM: usize = 256;

/// The backward of [`cluster_attention`] (`kernels/cluster_attention_backward.cu`),
/// as [`super::backward::cluster_attention_backward`] on the CPU: from the
/// forward's inputs, its output `out` and the output gradient `grad_out`.
/// The log-sum-exp is recomputed per row by the first kernel (the device
/// forward does not keep it); dk and dv are gathered over `inverse`; the
/// parameter gradients are each row's share, added by
/// [`crate::gpu::tensor_ops::column_sums`] in a fixed order. No atomics: the
/// same bits on every run.
///
/// # Errors
/// Shape errors naming the buffer; [`Error::Unsupported`] for head dims over
/// [`MAX_BACKWARD_HEAD_DIM`]; [`Error::InvalidArgument`] for inverse lists
/// that do not match the neighbourhoods; device errors.
pub fn cluster_attention_backward<T: Element>(
    device: &Device,
    inp: &DeviceAttentionInputs<'_, T>,
    out: &Buffer<T>,
    grad_out: &Buffer<T>,
    inverse: &DeviceInverse,
) -> Result<DeviceAttentionGrads<T>> {
    const OP: &str = "cluster_attention_backward";
    let (b, n, h, d) = (inp.batch, inp.tokens, inp.heads, inp.head_dim);
    let c = h * d;
    let m = inp.nbhd.size;
    if d > MAX_BACKWARD_HEAD_DIM {
        return Err(Error::Unsupported(format!(
            "{OP}: head dim {d} is beyond {MAX_BACKWARD_HEAD_DIM}"
        )));
    }
    let (inv_start, inv_pairs) = inverse.check(device, OP, inp.nbhd)?;
    let params_len = 6 * h + 2 * c;
    let mut grads = DeviceAttentionGrads {
        q: device.alloc::<T>(b * n * c)?,
        kv: device.alloc::<T>(b * n * 2 * c)?,
        params: device.alloc::<f32>(params_len)?,
    };
    let rows = b * n;
    let mut lse = device.alloc::<f32>(rows * h)?;
    let mut delta = device.alloc::<f32>(rows * h)?;
    let mut partials = device.alloc::<f32>(rows * params_len)?;
    let params = AttentionBackwardParams {
        forward: forward_params(device, OP, inp)?,
        out: device.check(OP, "out", out, &[b, n, c])?,
        grad_out: device.check(OP, "grad_out", grad_out, &[b, n, c])?,
        inv_start,
        inv_pairs,
        lse: device.check_mut(OP, "lse", &mut lse, &[rows, h])?,
        delta: device.check_mut(OP, "delta", &mut delta, &[rows, h])?,
        grad_q: device.check_mut(OP, "grad_q", &mut grads.q, &[b, n, c])?,
        grad_kv: device.check_mut(OP, "grad_kv", &mut grads.kv, &[b, n, 2 * c])?,
        row_partials: device.check_mut(OP, "row_partials", &mut partials, &[rows, params_len])?,
    };
    if rows * c == 0 {
        grads.params = device.zeros(params_len)?;
        return Ok(grads);
    }
    // Shared memory per warp: da of every slot (query kernel); 32 staged
    // (da, p, query) triples (key kernel).
    let what = format!("a neighbourhood of {m} tokens");
    let per_query = LaunchConfig::warp_per_row(OP, rows * h, m * size_of::<f32>(), what)?;
    let per_key = LaunchConfig::warp_per_row(OP, rows * h, 3 * 32 * size_of::<f32>(), "")?;
    // SAFETY: every buffer was checked against the shapes the kernels index;
    // neighbour and inverse indices are clamped into range by the kernels;
    // the query kernel writes lse and delta before the key kernel reads them
    // (same stream), and every row of the partials before column_sums.
    unsafe {
        device.launch(
            &kernel_name::<T>("cluster_attention_backward_query"),
            per_query,
            &params,
        )?;
        device.launch(
            &kernel_name::<T>("cluster_attention_backward_key"),
            per_key,
            &params,
        )?;
    }
    column_sums(device, &partials, &mut grads.params, (rows, params_len))?;
    Ok(grads)
}
