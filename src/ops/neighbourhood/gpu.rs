//! Nearest clusters and neighbour lists on a [`Device`] (`kernels/neighbourhood.cu`).

use crate::error::{Error, Result};
use crate::gpu::params::{ClusterXKeysParams, NeighbourhoodParams};
use crate::gpu::sort::stable_sort;
use crate::gpu::{Buffer, Device, LaunchConfig, dim};

/// [`super::Neighbourhood`] on a device: `images×n×m` indices (i32) and an
/// optional validity mask (u8), or none at all for a global stage.
#[derive(Debug)]
pub struct DeviceNeighbourhood {
    pub images: usize,
    pub tokens: usize,
    pub size: usize,
    /// `None`: global (every token attends to all `tokens`, in order).
    pub idx: Option<Buffer<i32>>,
    pub mask: Option<Buffer<u8>>,
    /// `Some(s)` when every list is whole clusters of `s` consecutive tokens
    /// (member `u` of cluster `k` is token `k·s + u`, padding token 0 and
    /// masked), which lets the attention use its tiled kernel.
    pub cluster_size: Option<usize>,
}

impl DeviceNeighbourhood {
    /// Every token attends to all `n` tokens.
    pub fn global(n: usize) -> Self {
        Self {
            images: 1,
            tokens: n,
            size: n,
            idx: None,
            mask: None,
            cluster_size: None,
        }
    }

    /// Uploads `nbhd`.
    ///
    /// # Errors
    /// Device errors.
    pub fn upload(device: &Device, nbhd: &super::Neighbourhood) -> Result<Self> {
        let idx: Vec<i32> = nbhd.idx.iter().map(|&i| i as i32).collect();
        let mask = nbhd
            .mask
            .as_ref()
            .map(|m| device.upload(&m.iter().map(|&v| u8::from(v)).collect::<Vec<u8>>()))
            .transpose()?;
        Ok(Self {
            images: nbhd.images,
            tokens: nbhd.tokens,
            size: nbhd.size,
            idx: Some(device.upload(&idx)?),
            mask,
            cluster_size: None,
        })
    }

    /// Uploads `nbhd`, whose lists are whole clusters of `s` tokens (as
    /// [`super::Neighbourhood::from_clusters`] makes them).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when a list is not made of whole clusters;
    /// device errors.
    pub fn upload_clustered(
        device: &Device,
        nbhd: &super::Neighbourhood,
        s: usize,
    ) -> Result<Self> {
        if !nbhd.is_whole_clusters(s) {
            return Err(Error::InvalidArgument(format!(
                "neighbourhood: the lists are not whole clusters of {s} tokens"
            )));
        }
        Ok(Self {
            cluster_size: Some(s),
            ..Self::upload(device, nbhd)?
        })
    }

    /// Checks the lists fit `batch` images of `n` tokens; returns the
    /// addresses of the indices and mask (0 when absent).
    ///
    /// # Errors
    /// Shape errors naming `op`.
    pub fn check(
        &self,
        device: &Device,
        op: &'static str,
        batch: usize,
        n: usize,
    ) -> Result<(u64, u64)> {
        if self.tokens != n || (self.images != 1 && self.images != batch) {
            return Err(Error::shape(
                op,
                "nbhd",
                [batch, n],
                [self.images, self.tokens],
            ));
        }
        let shape = [self.images, n, self.size];
        let idx = match &self.idx {
            Some(idx) => device.check(op, "nbhd.idx", idx, &shape)?,
            None if self.size == n => 0,
            None => return Err(Error::shape(op, "nbhd", [n], [self.size])),
        };
        let mask = match &self.mask {
            Some(mask) => device.check(op, "nbhd.mask", mask, &shape)?,
            None => 0,
        };
        Ok((idx, mask))
    }
}

/// [`super::InverseNeighbourhood`] on a device, for the backward kernels:
/// per image `tokens + 1` list starts and `tokens·m` (query, slot) pairs;
/// none at all for a global stage (every query holds every token).
#[derive(Debug)]
pub struct DeviceInverse {
    pub images: usize,
    pub tokens: usize,
    /// `None`: global.
    pub start: Option<Buffer<i32>>,
    pub pairs: Option<Buffer<i32>>,
}

impl DeviceInverse {
    /// No lists: the inverse of [`DeviceNeighbourhood::global`].
    pub fn global(n: usize) -> Self {
        Self {
            images: 1,
            tokens: n,
            start: None,
            pairs: None,
        }
    }

    /// Checks that these are the lists of `nbhd` over `n` tokens and
    /// returns the addresses of the starts and pairs (0, 0 for a global stage).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when they are not; shape errors naming `op`.
    pub fn check(
        &self,
        device: &Device,
        op: &'static str,
        nbhd: &DeviceNeighbourhood,
    ) -> Result<(u64, u64)> {
        let (n, m) = (nbhd.tokens, nbhd.size);
        let global = nbhd.idx.is_none();
        if self.tokens != n || self.images != nbhd.images || self.start.is_none() != global {
            return Err(Error::InvalidArgument(format!(
                "{op}: the inverse lists are not those of the neighbourhoods"
            )));
        }
        match (&self.start, &self.pairs) {
            (Some(start), Some(pairs)) => Ok((
                device.check(op, "inverse.start", start, &[self.images, n + 1])?,
                device.check(op, "inverse.pairs", pairs, &[self.images, n * m, 2])?,
            )),
            _ => Ok((0, 0)),
        }
    }

    /// Uploads `inverse`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for lists too long for 32-bit indices;
    /// device errors.
    pub fn upload(device: &Device, inverse: &super::InverseNeighbourhood) -> Result<Self> {
        let narrow = |v: u32| {
            i32::try_from(v).map_err(|_| {
                Error::InvalidArgument("inverse neighbourhood: index beyond i32".into())
            })
        };
        let start: Vec<i32> = inverse
            .start
            .iter()
            .map(|&v| narrow(v))
            .collect::<Result<_>>()?;
        let pairs: Vec<i32> = inverse
            .pairs
            .iter()
            .flat_map(|&(i, slot)| [narrow(i), narrow(slot)])
            .collect::<Result<_>>()?;
        Ok(Self {
            images: inverse.images,
            tokens: inverse.tokens,
            start: Some(device.upload(&start)?),
            pairs: Some(device.upload(&pairs)?),
        })
    }
}

/// Largest `nnc` the kernel supports (kept in registers).
pub const MAX_NEAREST_CLUSTERS: usize = 32;

const THREADS: u32 = 128;

/// For every token (positions b×n×2), its `nnc` nearest of the `k` cluster
/// means (b×k×2) in clusters of `s` consecutive tokens, as neighbour lists:
/// what [`super::nearest_clusters`] and [`super::Neighbourhood::from_clusters`]
/// compute on the CPU. Each image's means are sorted by x first (the key
/// kernel and [`stable_sort`]), so that each token scans only the means
/// whose x could place them among its nearest (see the kernel).
///
/// # Errors
/// Shape errors; [`Error::InvalidArgument`] for `nnc` outside
/// `1..=min(k, 32)` or clusters that do not cover the tokens; device errors.
pub fn nearest_neighbourhoods(
    device: &Device,
    pos: &Buffer<f32>,
    means: &Buffer<f32>,
    (batch, n, k): (usize, usize, usize),
    nnc: usize,
    s: usize,
) -> Result<DeviceNeighbourhood> {
    const OP: &str = "nearest_neighbourhoods";
    if nnc == 0 || nnc > k || nnc > MAX_NEAREST_CLUSTERS || k * s < n || (k > 0 && (k - 1) * s >= n)
    {
        return Err(Error::InvalidArgument(format!(
            "{OP}: needs 1 ≤ nnc ≤ min(k, {MAX_NEAREST_CLUSTERS}) and k = ceil(n/s) (nnc = {nnc}, k = {k}, n = {n}, s = {s})"
        )));
    }
    let m = nnc * s;
    let mut idx = device.alloc::<i32>(batch * n * m)?;
    let mut mask = (k * s > n)
        .then(|| device.alloc::<u8>(batch * n * m))
        .transpose()?;
    let means_addr = device.check(OP, "means", means, &[batch, k, 2])?;
    let mut keys = device.alloc::<f32>(batch * k)?;
    let mut by_x = device.alloc::<i32>(batch * k)?;
    if batch * k > 0 {
        let params = ClusterXKeysParams {
            means: means_addr,
            keys: device.check_mut(OP, "keys", &mut keys, &[batch, k])?,
            batch: dim(OP, "batch", batch)?,
            clusters: dim(OP, "clusters", k)?,
        };
        let config = LaunchConfig::per_item("cluster_x_keys", batch * k, THREADS)?;
        // SAFETY: `means` and `keys` were checked against batch × k (× 2).
        unsafe { device.launch("cluster_x_keys", config, &params)? };
        stable_sort(device, &keys, &mut by_x, batch, k)?;
    }
    let params = NeighbourhoodParams {
        pos: device.check(OP, "pos", pos, &[batch, n, 2])?,
        means: means_addr,
        by_x: device.check(OP, "by_x", &by_x, &[batch, k])?,
        nbhd: device.check_mut(OP, "nbhd", &mut idx, &[batch, n, m])?,
        mask: match mask.as_mut() {
            Some(mask) => device.check_mut(OP, "mask", mask, &[batch, n, m])?,
            None => 0,
        },
        batch: dim(OP, "batch", batch)?,
        n: dim(OP, "n", n)?,
        clusters: dim(OP, "clusters", k)?,
        nnc: dim(OP, "nnc", nnc)?,
        size: dim(OP, "s", s)?,
    };
    if batch * n > 0 {
        let config = LaunchConfig::per_item(OP, batch * n, THREADS)?;
        // SAFETY: every buffer was checked against the shapes the kernel indexes.
        unsafe { device.launch(OP, config, &params)? };
    }
    Ok(DeviceNeighbourhood {
        images: batch,
        tokens: n,
        size: m,
        idx: Some(idx),
        mask,
        cluster_size: Some(s),
    })
}
