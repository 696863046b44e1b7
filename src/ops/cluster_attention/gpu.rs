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

/// Shared-memory floats one warp of the generic kernel needs: query (c),
/// features (5m), logits (m + 1).
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
        tile_row_stride: 0,
        features_stored: 0,
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
    let clusters = inp.nbhd.idx.as_ref().and(inp.nbhd.cluster_size);
    if let AttentionPlan::Tiled(tile) = attention_plan::<T>(m, clusters, d) {
        let s = tile.cluster_size;
        let config =
            LaunchConfig::blocks(OP, b * n.div_ceil(s), 1, 32 * s as u32, tile.shared_bytes)?;
        let params = AttentionParams {
            cluster_size: dim(OP, "cluster_size", s)?,
            tile_clusters: dim(OP, "tile_clusters", tile.tile_clusters)?,
            tile_row_stride: dim(OP, "tile_row_stride", tile.row_stride)?,
            features_stored: i32::from(tile.features_stored),
            ..params
        };
        // SAFETY: as below; the tile bookkeeping and scratch are sized from
        // the same cluster size, neighbourhood and plan the kernel reads.
        return unsafe { device.launch(&kernel_name::<T>(tiled_kernel(s)), config, &params) };
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

/// How [`cluster_attention`] runs a shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionPlan {
    /// A warp per query gathers its neighbours' keys and values (global
    /// stages, lists that are not whole clusters, or no room for a tile).
    Generic,
    /// A block per query cluster stages the union of its neighbour clusters.
    Tiled(TilePlan),
}

/// The tiled kernel's shared-memory plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TilePlan {
    pub cluster_size: usize,
    /// Distinct neighbour clusters the tile holds; a block's others are read
    /// from global memory.
    pub tile_clusters: usize,
    /// Elements of the storage type per tile row: an odd number of 4-byte
    /// words, at least a head's channels.
    pub row_stride: usize,
    /// Whether each warp keeps its query's neighbour features (5·m floats)
    /// for all heads, or recomputes them per head to leave room for the tile.
    pub features_stored: bool,
    /// Dynamic shared memory per block.
    pub shared_bytes: usize,
}

/// The plan of [`cluster_attention`] for neighbourhoods of `m` slots made of
/// whole clusters of `cluster_size` tokens (`None`: global attention or any
/// lists), heads of `head_dim` channels stored as `T`.
///
/// The tiled kernel runs when its tile holds at least one cluster within
/// [`MAX_SHARED_BYTES`]. It keeps the features unless that leaves the tile
/// fewer clusters than one query's own neighbourhood (`nnc = m /
/// cluster_size`, the least any block's union can be) where recomputing
/// would stage more. The tile holds at most `2·nnc` clusters: the largest
/// union the space-filling-curve layouts make (measured at aff_tiny 224²
/// and aff_base 384², docs/gpu.md); more room would only lower how many
/// blocks share a multiprocessor.
pub fn attention_plan<T: Element>(
    m: usize,
    cluster_size: Option<usize>,
    head_dim: usize,
) -> AttentionPlan {
    let Some(s) = cluster_size.filter(|&s| s > 0 && s <= 32 && m.is_multiple_of(s)) else {
        return AttentionPlan::Generic;
    };
    let (entries, nnc) = (m, m / s); // s queries × nnc clusters
    if entries > 1024 {
        return AttentionPlan::Generic;
    }
    let element = size_of::<T>();
    let row_stride = odd_word_row_stride::<T>(head_dim);
    let per_cluster = s * 2 * row_stride * element;
    let ints = (2 * entries + 1).div_ceil(4) * 4;
    // (fixed bytes, clusters the tile then holds) for a warp's scratch.
    let fit = |per_warp: usize| {
        let fixed = (ints + s * per_warp) * size_of::<f32>();
        let clusters = MAX_SHARED_BYTES.saturating_sub(fixed) / per_cluster;
        (fixed, clusters.min(entries).min(2 * nnc))
    };
    // Each warp's scratch is an even number of floats: its query is read
    // two channels per 64-bit load.
    let without_features = head_dim + m + 1;
    let stored = fit((without_features + 5 * m).next_multiple_of(2));
    let recomputed = fit(without_features.next_multiple_of(2));
    let features_stored = stored.1 > 0 && stored.1 >= nnc.min(recomputed.1);
    let (fixed, tile_clusters) = if features_stored { stored } else { recomputed };
    if tile_clusters == 0 {
        return AttentionPlan::Generic;
    }
    AttentionPlan::Tiled(TilePlan {
        cluster_size: s,
        tile_clusters,
        row_stride,
        features_stored,
        shared_bytes: fixed + tile_clusters * per_cluster,
    })
}

/// Elements of `T` per shared-memory row of `channels`: an odd number of
/// 4-byte words, so lanes reading the same element of consecutive rows hit
/// different banks.
fn odd_word_row_stride<T: Element>(channels: usize) -> usize {
    let element = size_of::<T>();
    let words = (channels * element).div_ceil(4) | 1;
    words * 4 / element
}

/// How [`cluster_attention_backward`] gathers the key and value gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyGradientPlan {
    /// A warp per (key, head) reads each holding query's rows from global
    /// memory (global stages, lists that are not whole clusters).
    Generic,
    /// A block per key cluster stages the rows of the queries its members share.
    Tiled(HolderTilePlan),
}

/// The tiled key kernel's shared-memory plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HolderTilePlan {
    pub cluster_size: usize,
    /// Holder queries a block stages; a cluster's others are read from
    /// global memory.
    pub staged_queries: usize,
    /// Elements of the storage type per staged row: an odd number of 4-byte
    /// words, at least a head's channels.
    pub row_stride: usize,
    /// Dynamic shared memory per block.
    pub shared_bytes: usize,
}

/// The plan of the key gradients in [`cluster_attention_backward`] for
/// neighbourhoods of `m` slots made of whole clusters of `cluster_size`
/// tokens (`None`: global attention or any lists), heads of `head_dim`
/// channels stored as `T`.
///
/// Each query whose neighbourhood holds a cluster holds all its members, so
/// a cluster's members share their holders: `m` queries on average (every
/// query holds `m / cluster_size` clusters), and at most 1.3·m on the
/// model's layouts (aff_tiny's stage 0 at 224², aff_base_384's at 384²;
/// measured with the crate's layout ops). The block stages up to 1.5·m of
/// them, fewer where [`MAX_SHARED_BYTES`] allows less.
pub fn key_gradient_plan<T: Element>(
    m: usize,
    cluster_size: Option<usize>,
    head_dim: usize,
) -> KeyGradientPlan {
    let Some(s) = cluster_size.filter(|&s| s > 0 && s <= 32 && m.is_multiple_of(s)) else {
        return KeyGradientPlan::Generic;
    };
    if head_dim > MAX_BACKWARD_HEAD_DIM {
        return KeyGradientPlan::Generic;
    }
    let row_stride = odd_word_row_stride::<T>(head_dim);
    // Per warp: key and value (2·d floats), 32 staged pairs (4 words each).
    let fixed = s * (2 * head_dim + 4 * 32) * size_of::<f32>();
    // Per staged query: its id, lse and D, its q and dO rows.
    let per_query = 3 * size_of::<f32>() + 2 * row_stride * size_of::<T>();
    let fits = MAX_SHARED_BYTES.saturating_sub(fixed) / per_query;
    let staged_queries = (3 * m).div_ceil(2).min(fits);
    if staged_queries == 0 {
        return KeyGradientPlan::Generic;
    }
    KeyGradientPlan::Tiled(HolderTilePlan {
        cluster_size: s,
        staged_queries,
        row_stride,
        shared_bytes: fixed + staged_queries * per_query,
    })
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
/// forward does not keep it); dk and dv are gathered over `inverse` (by
/// the plan of [`key_gradient_plan`]); the parameter gradients are each
/// row's share, added by [`crate::gpu::tensor_ops::column_sums`] in a fixed
/// order. No atomics: the
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
        staged_queries: 0,
        staged_row_stride: 0,
    };
    if rows * c == 0 {
        grads.params = device.zeros(params_len)?;
        return Ok(grads);
    }
    // Shared memory per warp: da of every slot (query kernel); 32 staged
    // (da, p, query) triples (key kernel).
    let what = format!("a neighbourhood of {m} tokens");
    let per_query = LaunchConfig::warp_per_row(OP, rows * h, m * size_of::<f32>(), what)?;
    let clusters = inp.nbhd.idx.as_ref().and(inp.nbhd.cluster_size);
    let lists = inverse.start.is_some();
    let (key_kernel, per_key, key_params) = match key_gradient_plan::<T>(m, clusters, d) {
        KeyGradientPlan::Tiled(plan) if lists => {
            let s = plan.cluster_size;
            let config =
                LaunchConfig::blocks(OP, b * n.div_ceil(s), 1, 32 * s as u32, plan.shared_bytes)?;
            let tiled = AttentionBackwardParams {
                forward: AttentionParams {
                    cluster_size: dim(OP, "cluster_size", s)?,
                    ..params.forward
                },
                staged_queries: dim(OP, "staged_queries", plan.staged_queries)?,
                staged_row_stride: dim(OP, "staged_row_stride", plan.row_stride)?,
                ..params
            };
            ("cluster_attention_backward_key_tiled", config, tiled)
        }
        _ => {
            let config = LaunchConfig::warp_per_row(OP, rows * h, 3 * 32 * size_of::<f32>(), "")?;
            ("cluster_attention_backward_key", config, params)
        }
    };
    // SAFETY: every buffer was checked against the shapes the kernels index;
    // neighbour and inverse indices are clamped into range by the kernels;
    // the query kernel writes lse and delta before the key kernel reads them
    // (same stream), and every row of the partials before column_sums; the
    // tiled key kernel's staging is sized from the plan it reads.
    unsafe {
        device.launch(
            &kernel_name::<T>("cluster_attention_backward_query"),
            per_query,
            &params,
        )?;
        device.launch(&kernel_name::<T>(key_kernel), per_key, &key_params)?;
    }
    column_sums(device, &partials, &mut grads.params, (rows, params_len))?;
    Ok(grads)
}
