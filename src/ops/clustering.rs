//! Balanced clustering along a space-filling curve of anchors (spec §3).
//!
//! Tokens are ordered by the snake of anchor cells they fall in, and within a
//! cell by how far along the curve they sit (distance to the previous anchor
//! over distance to the next); consecutive runs of `s` tokens form clusters.
//! The keys are computed in f32 with every operation rounded as the published
//! model rounds it and sorted stably, so the clusters match it bit for bit.
//!
//! No gradient: clustering produces a permutation and cluster indices, which
//! a backward pass carries through unchanged (the positions it ranks are not
//! learned).

use crate::error::{Error, Result, check_len};

pub mod gpu;

/// The clustering of a batch of token sets.
#[derive(Debug, Clone, PartialEq)]
pub struct Clustering {
    pub batch: usize,
    /// Tokens per image.
    pub tokens: usize,
    /// Target cluster size `s`.
    pub cluster_size: usize,
    /// Number of clusters `k = ceil(n / s)`.
    pub clusters: usize,
    /// b×n: entry `r` is the old index of the token ranked `r`.
    pub reorder: Vec<u32>,
    /// b×n×2: the positions in the new order.
    pub pos: Vec<f32>,
    /// b×k×2: mean position of each cluster's valid members.
    pub means: Vec<f32>,
}

impl Clustering {
    /// True when the last cluster is padded (`k·s > n`).
    pub fn is_padded(&self) -> bool {
        self.clusters * self.cluster_size > self.tokens
    }

    /// The identity clustering used when every token is its own cluster (`k == n`).
    fn identity(pos: &[f32], batch: usize, n: usize) -> Self {
        Self {
            batch,
            tokens: n,
            cluster_size: 1,
            clusters: n,
            reorder: (0..batch).flat_map(|_| 0..n as u32).collect(),
            pos: pos.to_vec(),
            means: pos.to_vec(),
        }
    }
}

/// Python's `round`: half to even.
pub(crate) fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// The anchor grid: `ph × pw` cells of `lh × lw` tokens, visited as a snake.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AnchorGrid {
    pub ph: usize,
    pub pw: usize,
    /// Cell size `(lw, lh)` in f32, as the published model rounds it.
    pub cell: [f32; 2],
}

impl AnchorGrid {
    /// The grid for `k` clusters on an `h × w` token grid (spec §3 step 1).
    ///
    /// Beyond the published code: `ph` and `pw` are at least 1, so very
    /// elongated inputs still have an anchor row or column.
    pub fn new(h: usize, w: usize, k: usize) -> Self {
        let patch_len = ((h * w) as f64 / k as f64).sqrt();
        let ph = (round_half_even(h as f64 / patch_len) as usize).max(1);
        let pw = (round_half_even(w as f64 / patch_len) as usize).max(1);
        Self {
            ph,
            pw,
            cell: [(w as f64 / pw as f64) as f32, (h as f64 / ph as f64) as f32],
        }
    }

    /// Number of anchors.
    pub fn len(&self) -> usize {
        self.ph * self.pw
    }

    /// Never true: a grid has at least one anchor.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Position of cell `(ax, ay)` along the snake: even rows run left to
    /// right, odd rows right to left.
    pub fn rank(&self, ax: usize, ay: usize) -> usize {
        let along = if ay.is_multiple_of(2) {
            ax
        } else {
            self.pw - 1 - ax
        };
        ay * self.pw + along
    }

    /// Anchor centres in snake order: `cell_index · L + L/2 − 0.5`, each
    /// operation rounded to f32.
    pub fn centres(&self) -> Vec<[f32; 2]> {
        let mut centres = vec![[0.0; 2]; self.len()];
        for ay in 0..self.ph {
            for ax in 0..self.pw {
                let grid = [ax as f32, ay as f32];
                centres[self.rank(ax, ay)] =
                    std::array::from_fn(|d| grid[d] * self.cell[d] + self.cell[d] / 2.0 - 0.5);
            }
        }
        centres
    }

    /// The cell rank of a token at `p`: `floor(p / L)` in f32, clamped into the grid.
    pub fn rank_of(&self, p: [f32; 2]) -> usize {
        let ax = ((p[0] / self.cell[0]).floor().max(0.0) as usize).min(self.pw - 1);
        let ay = ((p[1] / self.cell[1]).floor().max(0.0) as usize).min(self.ph - 1);
        self.rank(ax, ay)
    }
}

/// Previous and next anchor centre of every anchor, extrapolated linearly at
/// both ends of the snake (spec §3 step 3).
///
/// Beyond the published code, which needs three anchors: with two, the
/// extrapolation uses the one step there is; with a single anchor, the step
/// is one cell along x (where the snake would go next).
pub(crate) fn prev_next(centres: &[[f32; 2]], cell: [f32; 2]) -> (Vec<[f32; 2]>, Vec<[f32; 2]>) {
    let len = centres.len();
    let sub = |a: [f32; 2], b: [f32; 2]| [a[0] - b[0], a[1] - b[1]];
    let add = |a: [f32; 2], b: [f32; 2]| [a[0] + b[0], a[1] + b[1]];
    let (first_step, last_step) = if len >= 2 {
        (
            sub(centres[1], centres[0]),
            sub(centres[len - 1], centres[len - 2]),
        )
    } else {
        ([cell[0], 0.0], [cell[0], 0.0])
    };
    let prev = (0..len)
        .map(|r| {
            if r == 0 {
                sub(centres[0], first_step)
            } else {
                centres[r - 1]
            }
        })
        .collect();
    let next = (0..len)
        .map(|r| {
            if r + 1 == len {
                add(centres[len - 1], last_step)
            } else {
                centres[r + 1]
            }
        })
        .collect();
    (prev, next)
}

/// Squared distance with each square and the sum rounded separately (no FMA).
#[inline]
fn dist2(a: [f32; 2], b: [f32; 2]) -> f32 {
    let dx = a[0] - b[0];
    let dy = a[1] - b[1];
    let (x2, y2) = (dx * dx, dy * dy);
    x2 + y2
}

/// Which images share the normaliser `M` of the clustering keys (spec §3,
/// step 5).
///
/// The published model takes the largest ratio over the **whole batch**, so
/// an image's clusters (and so its output) can change with the images that
/// share its batch. [`KeyScope::Image`] normalises each image by its own
/// largest ratio: every image is clustered exactly as it would be alone, at
/// batch 1, whatever its batch holds. The two agree at batch 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyScope {
    /// One `M` for the whole batch, as published (reproduces its numbers).
    #[default]
    Batch,
    /// One `M` per image: batch-invariant results.
    Image,
}

impl KeyScope {
    /// How many consecutive tokens share one `M`, for `batch` images of `n`.
    pub fn group_tokens(self, batch: usize, n: usize) -> usize {
        match self {
            Self::Batch => batch * n,
            Self::Image => n,
        }
    }
}

/// Clusters `batch` sets of `n` tokens at positions `pos` (b×n×2, integer
/// valued, on an `h × w` grid) into `ceil(n / s)` clusters of `s` consecutive
/// tokens along the curve.
///
/// `scope` says which images share the key normaliser: [`KeyScope::Batch`]
/// clusters a batch exactly as the published model does.
///
/// # Errors
/// [`Error::Shape`] when `pos` is not b×n×2; [`Error::InvalidArgument`] for
/// `s = 0`, an empty grid, or `n = 0`.
pub fn space_filling_cluster(
    pos: &[f32],
    batch: usize,
    n: usize,
    cluster_size: usize,
    grid: (usize, usize),
    scope: KeyScope,
) -> Result<Clustering> {
    let (h, w) = grid;
    check_len("space_filling_cluster", "pos", &[batch, n, 2], pos.len())?;
    if cluster_size == 0 || h == 0 || w == 0 || n == 0 {
        return Err(Error::InvalidArgument(format!(
            "space_filling_cluster: needs s > 0, a non-empty grid and tokens (s = {cluster_size}, grid {h}×{w}, n = {n})"
        )));
    }
    let s = cluster_size;
    let k = n.div_ceil(s);
    if k == n {
        return Ok(Clustering::identity(pos, batch, n));
    }

    let anchors = AnchorGrid::new(h, w, k);
    let (prev, next) = prev_next(&anchors.centres(), anchors.cell);
    let point = |i: usize| [pos[2 * i], pos[2 * i + 1]];

    // Per token: its anchor rank and its progress ratio within that anchor cell.
    let mut ranks = Vec::with_capacity(batch * n);
    let mut ratios = Vec::with_capacity(batch * n);
    for i in 0..batch * n {
        let p = point(i);
        let r = anchors.rank_of(p);
        let dp = dist2(p, prev[r]);
        let dn = dist2(p, next[r]);
        ranks.push(r);
        ratios.push(dp / (dn + 1e-5f32));
    }
    // One scale per group of images sharing the normaliser.
    let group = scope.group_tokens(batch, n);
    let scales: Vec<f32> = ratios
        .chunks(group)
        .map(|g| g.iter().copied().fold(f32::NEG_INFINITY, f32::max) + 1.0)
        .collect();

    let mut reorder = Vec::with_capacity(batch * n);
    let mut new_pos = Vec::with_capacity(batch * n * 2);
    let mut means = Vec::with_capacity(batch * k * 2);
    for img in 0..batch {
        let base = img * n;
        let scale = scales[base / group];
        let keys: Vec<f32> = (0..n)
            .map(|t| {
                let scaled = ranks[base + t] as f32 * scale;
                scaled + ratios[base + t]
            })
            .collect();
        let mut order: Vec<u32> = (0..n as u32).collect();
        // `sort_by` is stable: equal keys keep their token order.
        order.sort_by(|&a, &b| keys[a as usize].total_cmp(&keys[b as usize]));
        for &t in &order {
            let p = point(base + t as usize);
            new_pos.extend_from_slice(&p);
        }
        reorder.extend_from_slice(&order);
        let img_pos = &new_pos[base * 2..];
        for c in 0..k {
            let members = c * s..((c + 1) * s).min(n);
            let count = members.len() as f32;
            let mut sum = [0.0f32; 2];
            for t in members {
                sum[0] += img_pos[2 * t];
                sum[1] += img_pos[2 * t + 1];
            }
            means.extend_from_slice(&[sum[0] / count, sum[1] / count]);
        }
    }
    Ok(Clustering {
        batch,
        tokens: n,
        cluster_size: s,
        clusters: k,
        reorder,
        pos: new_pos,
        means,
    })
}

/// Positions of a full `h × w` token grid, row-major (`t = y·w + x`).
pub fn grid_positions(h: usize, w: usize) -> Vec<f32> {
    (0..h * w)
        .flat_map(|t| [(t % w) as f32, (t / w) as f32])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_to_even_rounding() {
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
        assert_eq!(round_half_even(3.4999), 3.0);
    }

    #[test]
    fn snake_ranks() {
        let g = AnchorGrid {
            ph: 3,
            pw: 3,
            cell: [1.0, 1.0],
        };
        let ranks: Vec<usize> = (0..3)
            .flat_map(|y| (0..3).map(move |x| (x, y)))
            .map(|(x, y)| g.rank(x, y))
            .collect();
        assert_eq!(ranks, [0, 1, 2, 5, 4, 3, 6, 7, 8]);
    }

    #[test]
    fn single_anchor_still_clusters() {
        // 2×40 grid, 80 tokens in 3 clusters of 32: patch_len 7.3 → ph = 0 → 1.
        let pos = grid_positions(2, 40);
        let c = space_filling_cluster(&pos, 1, 80, 32, (2, 40), KeyScope::Batch).unwrap();
        assert_eq!(AnchorGrid::new(2, 40, 3).ph, 1);
        let mut seen = c.reorder.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..80).collect::<Vec<u32>>());
        assert_eq!(c.clusters, 3);
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(space_filling_cluster(&[0.0; 6], 1, 2, 2, (2, 2), KeyScope::Batch).is_err());
        assert!(space_filling_cluster(&[0.0; 4], 1, 2, 0, (2, 2), KeyScope::Batch).is_err());
    }
}
