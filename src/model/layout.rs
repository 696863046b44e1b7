//! The token layout of a stage: clustering, reordering and neighbourhoods
//! (spec §3–4), with what depends on the grid size alone cached.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use super::tables::PositionTables;
use super::weights::ModelWeights;
use crate::config::AffConfig;
use crate::error::{Error, Result};
use crate::ops::clustering::{
    Clustering, KeyScope, grid_positions, round_half_even, space_filling_cluster,
};
use crate::ops::neighbourhood::{Neighbourhood, nearest_clusters};
use crate::ops::rel_pos::{OffsetTable, neighbour_rows};

/// Clusters and neighbourhoods of a clustered (non-global) stage.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterLayout {
    pub clustering: Clustering,
    /// images×n×nnc nearest clusters.
    pub nearest: Vec<u32>,
    pub nnc: usize,
    pub nbhd: Neighbourhood,
    /// images×n×m offset-table row of every neighbour slot.
    pub bias_rows: Vec<u32>,
}

impl ClusterLayout {
    /// Clusters `batch` token sets (sharing the key normaliser as `scope`
    /// says) and finds their neighbourhoods and their rows in `offsets`.
    ///
    /// # Errors
    /// Propagates the ops' argument errors.
    #[allow(clippy::too_many_arguments)] // each is a distinct input of spec §3–4
    pub fn build(
        pos: &[f32],
        batch: usize,
        n: usize,
        cluster_size: usize,
        nbhd_size: usize,
        offsets: &OffsetTable,
        grid: (usize, usize),
        scope: KeyScope,
    ) -> Result<Self> {
        let clustering = space_filling_cluster(pos, batch, n, cluster_size, grid, scope)?;
        let k = clustering.clusters;
        // nnc = min(round(nbhd / s), k), at least one cluster.
        let nnc = (round_half_even(nbhd_size as f64 / cluster_size as f64) as usize).clamp(1, k);
        let nearest = nearest_clusters(&clustering.pos, &clustering.means, batch, n, k, nnc)?;
        let nbhd = Neighbourhood::from_clusters(&nearest, batch, n, nnc, clustering.cluster_size);
        let bias_rows = neighbour_rows(offsets, &clustering.pos, &nbhd, batch)?;
        Ok(Self {
            clustering,
            nearest,
            nnc,
            nbhd,
            bias_rows,
        })
    }
}

/// How a stage's tokens attend.
#[derive(Debug, Clone)]
pub enum Attention {
    /// `nbhd ≥ n`: every token attends to all, in their incoming order.
    Global(Neighbourhood),
    /// Tokens reordered by clusters and attending to their nearest clusters.
    /// The layout holds one image when all images share it (stage 0).
    Clustered(Arc<ClusterLayout>),
}

/// The layout of one stage for a batch.
#[derive(Debug, Clone)]
pub struct StageLayout {
    pub batch: usize,
    pub tokens: usize,
    pub attention: Attention,
    /// b×n×2 positions in the stage's token order.
    pub pos: Vec<f32>,
    /// The stage-0 grid and its offset table.
    pub geometry: Arc<GridGeometry>,
    /// b×n×m offset-table row of every neighbour slot.
    pub bias_rows: Vec<u32>,
}

impl StageLayout {
    /// The neighbourhoods every block of the stage attends over.
    pub fn nbhd(&self) -> &Neighbourhood {
        match &self.attention {
            Attention::Global(nbhd) => nbhd,
            Attention::Clustered(layout) => &layout.nbhd,
        }
    }

    /// The clustering, for a clustered stage.
    pub fn cluster_layout(&self) -> Option<&ClusterLayout> {
        match &self.attention {
            Attention::Global(_) => None,
            Attention::Clustered(layout) => Some(layout),
        }
    }

    /// The old index of the token at rank `r` of image `img`.
    pub fn source(&self, img: usize, r: usize) -> usize {
        match &self.attention {
            Attention::Global(_) => r,
            Attention::Clustered(layout) => {
                let shared = layout.clustering.batch == 1;
                let row = if shared { 0 } else { img };
                layout.clustering.reorder[row * self.tokens + r] as usize
            }
        }
    }

    /// Reorders b×n×c features into the stage's token order.
    pub fn reorder_feat(&self, feat: &[f32], channels: usize) -> Vec<f32> {
        if let Attention::Global(_) = self.attention {
            return feat.to_vec();
        }
        let n = self.tokens;
        let mut out = Vec::with_capacity(feat.len());
        for img in 0..self.batch {
            for r in 0..n {
                let t = img * n + self.source(img, r);
                out.extend_from_slice(&feat[t * channels..(t + 1) * channels]);
            }
        }
        out
    }
}

/// The layout of stage `s` of a model of `config` for `batch` images of `n`
/// tokens at `pos` (b×n×2, finite) on the stage-0 grid of `geometry`: global
/// when the stage's neighbourhood holds every token, else clustered (from
/// the geometry's cache when the tokens are the full grid), with every
/// image's normaliser as `scope` says.
///
/// # Errors
/// [`Error::InvalidArgument`] for a stage index out of range; the layout
/// ops' argument errors.
pub fn plan_stage_layout(
    config: &AffConfig,
    s: usize,
    pos: &[f32],
    batch: usize,
    n: usize,
    geometry: Arc<GridGeometry>,
    scope: KeyScope,
) -> Result<StageLayout> {
    if s >= config.num_stages() {
        return Err(Error::InvalidArgument(format!(
            "stage {s} out of range (the model has {})",
            config.num_stages()
        )));
    }
    let nbhd_size = config.nbhd_size[s];
    let grid = geometry.grid;
    if nbhd_size >= n {
        let nbhd = Neighbourhood::global(n);
        let bias_rows = neighbour_rows(&geometry.offsets, pos, &nbhd, batch)?;
        return Ok(StageLayout {
            batch,
            tokens: n,
            attention: Attention::Global(nbhd),
            pos: pos.to_vec(),
            geometry,
            bias_rows,
        });
    }
    let s_c = config.cluster_size;
    let on_grid = n == grid.0 * grid.1 && {
        let full = grid_positions(grid.0, grid.1);
        pos.chunks_exact(2 * n).all(|img| img == full.as_slice())
    };
    let layout = if on_grid {
        geometry.grid_layout(s_c, nbhd_size)?
    } else {
        let built = ClusterLayout::build(
            pos,
            batch,
            n,
            s_c,
            nbhd_size,
            &geometry.offsets,
            grid,
            scope,
        )?;
        Arc::new(built)
    };
    // A cached grid layout holds one image, which every image shares.
    let copies = if layout.clustering.batch == 1 {
        batch
    } else {
        1
    };
    let pos = layout.clustering.pos.repeat(copies);
    let bias_rows = layout.bias_rows.repeat(copies);
    Ok(StageLayout {
        batch,
        tokens: n,
        attention: Attention::Clustered(layout),
        pos,
        geometry,
        bias_rows,
    })
}

/// What depends only on the stage-0 grid `(h, w)`: the relative-offset
/// table, stage 0's layout (stage 0 sees the full grid for every image, so
/// its clustering and neighbourhoods depend on `(h, w)` alone), and the
/// per-offset tables of the owning model's weights.
#[derive(Debug)]
pub struct GridGeometry {
    pub grid: (usize, usize),
    pub offsets: OffsetTable,
    stage0: OnceLock<Arc<ClusterLayout>>,
    tables: OnceLock<Option<PositionTables>>,
}

impl GridGeometry {
    /// The geometry of an `h × w` grid, offsets clamped to `±clamp` when given.
    pub fn new(grid: (usize, usize), clamp: Option<usize>) -> Self {
        Self {
            grid,
            offsets: OffsetTable::new(grid.0, grid.1, clamp),
            stage0: OnceLock::new(),
            tables: OnceLock::new(),
        }
    }

    /// The model's per-offset tables for this grid, built on first use;
    /// `None` when too large to keep (see [`PositionTables::build`]).
    pub fn tables(&self, weights: &ModelWeights) -> Option<&PositionTables> {
        self.tables
            .get_or_init(|| PositionTables::build(weights, &self.offsets))
            .as_ref()
    }

    /// The layout of the full grid, built on first use.
    ///
    /// # Errors
    /// Propagates [`ClusterLayout::build`] errors.
    pub fn grid_layout(&self, cluster_size: usize, nbhd_size: usize) -> Result<Arc<ClusterLayout>> {
        if let Some(layout) = self.stage0.get() {
            return Ok(Arc::clone(layout));
        }
        // Concurrent first uses may both build it: harmless (identical), and
        // nobody waits on a build.
        let (h, w) = self.grid;
        let layout = Arc::new(ClusterLayout::build(
            &grid_positions(h, w),
            1,
            h * w,
            cluster_size,
            nbhd_size,
            &self.offsets,
            self.grid,
            KeyScope::Batch, // one image: both scopes agree
        )?);
        Ok(Arc::clone(self.stage0.get_or_init(|| layout)))
    }
}

/// [`GridGeometry`] by grid size, shared across threads; bounded, oldest
/// entries evicted first.
#[derive(Debug, Default)]
pub struct GridCache {
    inner: Mutex<CacheInner>,
}

#[derive(Debug, Default)]
struct CacheInner {
    map: HashMap<(usize, usize), Arc<GridGeometry>>,
    order: VecDeque<(usize, usize)>,
}

/// Grid sizes kept at once.
const CACHE_CAPACITY: usize = 16;

impl GridCache {
    /// The geometry of `grid`, created on first use.
    pub fn get(&self, grid: (usize, usize), clamp: Option<usize>) -> Arc<GridGeometry> {
        let mut inner = self.lock();
        if let Some(hit) = inner.map.get(&grid) {
            return Arc::clone(hit);
        }
        let geometry = Arc::new(GridGeometry::new(grid, clamp));
        if inner.order.len() == CACHE_CAPACITY {
            if let Some(old) = inner.order.pop_front() {
                inner.map.remove(&old);
            }
        }
        inner.order.push_back(grid);
        inner.map.insert(grid, Arc::clone(&geometry));
        geometry
    }

    /// Number of grid sizes cached.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        // A panic elsewhere cannot leave the map inconsistent: recover it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}
