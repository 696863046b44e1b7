//! Balanced clustering on a [`Device`] (`kernels/clustering.cu` and the
//! stable sort of `kernels/sort.cu`): the same keys, bit for bit, as
//! [`super::space_filling_cluster`].

use super::{AnchorGrid, KeyScope, prev_next};
use crate::error::{Error, Result};
use crate::gpu::params::{ClusterKeysParams, ClusterMeansParams, ClusterRatioParams};
use crate::gpu::sort::stable_sort;
use crate::gpu::tensor_ops::gather_rows;
use crate::gpu::{Buffer, Device, LaunchConfig, dim};

/// [`super::Clustering`] on a device.
#[derive(Debug)]
pub struct DeviceClustering {
    pub batch: usize,
    pub tokens: usize,
    pub cluster_size: usize,
    pub clusters: usize,
    /// b×n: entry `r` is the old index of the token ranked `r`.
    pub reorder: Buffer<i32>,
    /// b×n×2 positions in the new order.
    pub pos: Buffer<f32>,
    /// b×k×2 cluster means.
    pub means: Buffer<f32>,
}

const THREADS: u32 = 256;

/// Clusters `batch` sets of `n` tokens at `pos` (b×n×2, on an `h × w`
/// grid) into `ceil(n/s)` clusters of `s` consecutive tokens.
///
/// # Errors
/// As [`super::space_filling_cluster`]; device errors.
pub fn space_filling_cluster(
    device: &Device,
    pos: &Buffer<f32>,
    batch: usize,
    n: usize,
    cluster_size: usize,
    (h, w): (usize, usize),
    scope: KeyScope,
) -> Result<DeviceClustering> {
    const OP: &str = "space_filling_cluster";
    let pos_addr = device.check(OP, "pos", pos, &[batch, n, 2])?;
    if cluster_size == 0 || h == 0 || w == 0 || n == 0 {
        return Err(Error::InvalidArgument(format!(
            "{OP}: needs s > 0, a non-empty grid and tokens (s = {cluster_size}, grid {h}×{w}, n = {n})"
        )));
    }
    let s = cluster_size;
    let k = n.div_ceil(s);
    let count = batch * n;
    let mut reorder = device.alloc::<i32>(count)?;
    if k == n {
        // Every token its own cluster: no reordering (spec §3.6).
        let identity: Vec<i32> = (0..batch).flat_map(|_| 0..n as i32).collect();
        let reorder = device.upload(&identity)?;
        let mut new_pos = device.alloc::<f32>(count * 2)?;
        gather_rows(device, pos, &reorder, &mut new_pos, (batch, n, n, 2))?;
        let mut means = device.alloc::<f32>(count * 2)?;
        gather_rows(device, pos, &reorder, &mut means, (batch, n, n, 2))?;
        return Ok(DeviceClustering {
            batch,
            tokens: n,
            cluster_size: 1,
            clusters: n,
            reorder,
            pos: new_pos,
            means,
        });
    }

    let anchors = AnchorGrid::new(h, w, k);
    // Each anchor's neighbours along the curve depend on the grid alone:
    // uploaded once per (grid, k), not per call.
    let tables = || prev_next(&anchors.centres(), anchors.cell);
    let prev = device.constant(&format!("cluster anchors prev {h}x{w} k{k}"), || {
        tables().0.as_flattened().to_vec()
    })?;
    let next = device.constant(&format!("cluster anchors next {h}x{w} k{k}"), || {
        tables().1.as_flattened().to_vec()
    })?;
    let mut rank = device.alloc::<i32>(count)?;
    let mut ratio = device.alloc::<f32>(count)?;
    let group = scope.group_tokens(batch, n);
    let groups = count / group;
    let mut max_ratio = device.zeros::<u32>(groups)?;
    let anchor_shape = [anchors.len(), 2];
    let ratio_params = ClusterRatioParams {
        pos: pos_addr,
        prev: device.check(OP, "prev", &*prev, &anchor_shape)?,
        next: device.check(OP, "next", &*next, &anchor_shape)?,
        rank: device.check_mut(OP, "rank", &mut rank, &[count])?,
        ratio: device.check_mut(OP, "ratio", &mut ratio, &[count])?,
        max_ratio: device.check_mut(OP, "max_ratio", &mut max_ratio, &[groups])?,
        count: dim(OP, "b·n", count)?,
        group: dim(OP, "group", group)?,
        pw: dim(OP, "pw", anchors.pw)?,
        ph: dim(OP, "ph", anchors.ph)?,
        cell_w: anchors.cell[0],
        cell_h: anchors.cell[1],
    };
    let per_token = LaunchConfig::per_item(OP, count, THREADS)?;
    // SAFETY: every buffer was checked against the shapes the kernel indexes.
    unsafe { device.launch("cluster_ratio", per_token, &ratio_params)? };

    let mut keys = device.alloc::<f32>(count)?;
    let key_params = ClusterKeysParams {
        rank: device.check(OP, "rank", &rank, &[count])?,
        ratio: device.check(OP, "ratio", &ratio, &[count])?,
        max_ratio: device.check(OP, "max_ratio", &max_ratio, &[groups])?,
        keys: device.check_mut(OP, "keys", &mut keys, &[count])?,
        count: dim(OP, "b·n", count)?,
        group: dim(OP, "group", group)?,
    };
    // SAFETY: as above.
    unsafe { device.launch("cluster_keys", per_token, &key_params)? };
    stable_sort(device, &keys, &mut reorder, batch, n)?;

    let mut new_pos = device.alloc::<f32>(count * 2)?;
    gather_rows(device, pos, &reorder, &mut new_pos, (batch, n, n, 2))?;
    let mut means = device.alloc::<f32>(batch * k * 2)?;
    let mean_params = ClusterMeansParams {
        pos: device.check(OP, "pos", &new_pos, &[batch, n, 2])?,
        means: device.check_mut(OP, "means", &mut means, &[batch, k, 2])?,
        batch: dim(OP, "batch", batch)?,
        n: dim(OP, "n", n)?,
        size: dim(OP, "s", s)?,
        clusters: dim(OP, "k", k)?,
    };
    let per_cluster = LaunchConfig::per_item(OP, batch * k, THREADS)?;
    // SAFETY: as above.
    unsafe { device.launch("cluster_means", per_cluster, &mean_params)? };
    Ok(DeviceClustering {
        batch,
        tokens: n,
        cluster_size: s,
        clusters: k,
        reorder,
        pos: new_pos,
        means,
    })
}
