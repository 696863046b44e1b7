//! Nearest clusters and neighbourhoods (spec §4).
//!
//! A token's neighbourhood is the members of its `nnc` nearest clusters (or,
//! for a global stage, every token). It is shared by the attention of every
//! block of the stage and by the merge that ends it.
//!
//! No gradient: nearest clusters and neighbourhoods are indices. Their
//! inverse ([`InverseNeighbourhood`]) is what the backward passes of the
//! attention and the merge gather over.

use rayon::prelude::*;

use crate::error::{Error, Result, check_len};

pub mod gpu;

/// True when every index is below `bound` (a vectorised maximum: these
/// checks run on every op call, over every neighbour slot).
pub fn all_below(indices: &[u32], bound: usize) -> bool {
    indices
        .iter()
        .copied()
        .max()
        .is_none_or(|m| (m as usize) < bound)
}

/// Who each token attends to: `m` neighbour indices per token, with a
/// validity mask when padded cluster slots are among them.
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbourhood {
    /// Images whose neighbourhoods are stored: `batch`, or 1 when every image
    /// shares the same ones (stage 0, whose layout depends only on the grid).
    pub images: usize,
    /// Tokens per image.
    pub tokens: usize,
    /// Neighbours per token.
    pub size: usize,
    /// images×n×m token indices (padded slots point at token 0).
    pub idx: Vec<u32>,
    /// images×n×m, false for padded slots; `None` when every slot is valid.
    pub mask: Option<Vec<bool>>,
}

impl Neighbourhood {
    /// Every token attends to all `n` tokens, in order (a global stage).
    pub fn global(n: usize) -> Self {
        Self {
            images: 1,
            tokens: n,
            size: n,
            idx: (0..n).flat_map(|_| 0..n as u32).collect(),
            mask: None,
        }
    }

    /// True when every list is whole clusters of `s` consecutive tokens, as
    /// [`Neighbourhood::from_clusters`] makes them: member `u` of cluster `k`
    /// is token `k·s + u`, valid, or when past the last token, token 0 and
    /// masked. The CUDA attention's tiled kernel needs this structure.
    pub fn is_whole_clusters(&self, s: usize) -> bool {
        let n = self.tokens;
        s > 0
            && self.size.is_multiple_of(s)
            && self.idx.chunks(s).enumerate().all(|(run, members)| {
                let k = members[0] as usize / s;
                members.iter().enumerate().all(|(u, &j)| {
                    let member = k * s + u;
                    let valid = self.mask.as_ref().is_none_or(|m| m[run * s + u]);
                    if member < n {
                        j as usize == member && valid
                    } else {
                        j == 0 && !valid
                    }
                })
            })
    }

    /// Neighbourhoods made of the members of each token's nearest clusters:
    /// `nearest` is images×n×nnc cluster indices, clusters hold the reordered
    /// tokens `c·s .. c·s+s`, and slots at or past `n` are padding.
    pub fn from_clusters(nearest: &[u32], images: usize, n: usize, nnc: usize, s: usize) -> Self {
        debug_assert_eq!(nearest.len(), images * n * nnc);
        let m = nnc * s;
        let padded = !n.is_multiple_of(s);
        let mut idx = Vec::with_capacity(images * n * m);
        let mut mask = Vec::with_capacity(if padded { images * n * m } else { 0 });
        for &c in nearest {
            for r in 0..s {
                let member = c as usize * s + r;
                let valid = member < n;
                idx.push(if valid { member as u32 } else { 0 });
                if padded {
                    mask.push(valid);
                }
            }
        }
        Self {
            images,
            tokens: n,
            size: m,
            idx,
            mask: padded.then_some(mask),
        }
    }

    /// Checks that these neighbourhoods fit `batch` images of `n` tokens
    /// and index only those tokens.
    ///
    /// # Errors
    /// [`Error::Shape`] or [`Error::InvalidArgument`] naming `op`.
    pub fn check(&self, op: &'static str, batch: usize, n: usize) -> Result<()> {
        if self.tokens != n || (self.images != 1 && self.images != batch) {
            return Err(Error::shape(
                op,
                "nbhd",
                [batch, n],
                [self.images, self.tokens],
            ));
        }
        check_len(op, "nbhd.idx", &[self.images, n, self.size], self.idx.len())?;
        if let Some(mask) = &self.mask {
            check_len(op, "nbhd.mask", &[self.images, n, self.size], mask.len())?;
        }
        if !all_below(&self.idx, n) {
            return Err(Error::InvalidArgument(format!(
                "{op}: neighbour indices must be below n = {n}"
            )));
        }
        Ok(())
    }

    /// The neighbour indices of token `i` of image `img`.
    #[inline]
    pub fn of(&self, img: usize, i: usize) -> &[u32] {
        let row = (self.image_row(img) * self.tokens + i) * self.size;
        &self.idx[row..row + self.size]
    }

    /// The validity of token `i`'s neighbours (`None`: all valid).
    #[inline]
    pub fn mask_of(&self, img: usize, i: usize) -> Option<&[bool]> {
        let row = (self.image_row(img) * self.tokens + i) * self.size;
        self.mask.as_ref().map(|m| &m[row..row + self.size])
    }

    #[inline]
    fn image_row(&self, img: usize) -> usize {
        if self.images == 1 { 0 } else { img }
    }
}

/// Who attends to each token: for every token `j`, the `(query, slot)`
/// pairs whose neighbourhood holds `j` in that slot, in ascending order
/// (query, then slot). Backward passes gather over these lists to
/// accumulate key, value and feature gradients without atomics, in an order
/// that does not depend on threads. Masked (padding) slots are listed too:
/// they take part in the softmax. Built once per stage layout, shared by
/// every block and the merge (and, like the lists, by the whole batch when
/// the neighbourhoods are).
#[derive(Debug, Clone, PartialEq)]
pub struct InverseNeighbourhood {
    /// Images whose lists are stored (1 when shared by the batch).
    pub images: usize,
    /// Tokens per image.
    pub tokens: usize,
    /// images×(n+1): token `j`'s pairs are `pairs[start[j]..start[j+1]]`
    /// (offsets into that image's pairs).
    pub start: Vec<u32>,
    /// images×(n·m): `(query, slot)` pairs.
    pub pairs: Vec<(u32, u32)>,
}

impl InverseNeighbourhood {
    /// Inverts `nbhd` (a counting sort of every slot by the token it holds).
    ///
    /// # Errors
    /// As [`Neighbourhood::check`]: lists of the wrong length or indices
    /// outside the tokens.
    pub fn new(nbhd: &Neighbourhood) -> Result<Self> {
        nbhd.check("inverse_neighbourhood", nbhd.images, nbhd.tokens)?;
        let (images, n, m) = (nbhd.images, nbhd.tokens, nbhd.size);
        let mut start = vec![0u32; images * (n + 1)];
        let mut pairs = vec![(0u32, 0u32); images * n * m];
        let per_image = start
            .chunks_mut(n + 1)
            .zip(pairs.chunks_mut((n * m).max(1)));
        for (img, (start, pairs)) in per_image.enumerate() {
            let idx = &nbhd.idx[img * n * m..(img + 1) * n * m];
            for &j in idx {
                start[j as usize + 1] += 1;
            }
            for t in 0..n {
                start[t + 1] += start[t];
            }
            let mut next: Vec<u32> = start[..n].to_vec();
            // Slots in ascending (query, slot) order land in that order.
            for (at, &j) in idx.iter().enumerate() {
                let fill = &mut next[j as usize];
                pairs[*fill as usize] = ((at / m) as u32, (at % m) as u32);
                *fill += 1;
            }
        }
        Ok(Self {
            images,
            tokens: n,
            start,
            pairs,
        })
    }

    /// Checks that these are the lists of `nbhd` (same images, tokens and
    /// slots), as a backward pass over `nbhd` needs.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `op`.
    pub fn check_inverts(&self, op: &str, nbhd: &Neighbourhood) -> Result<()> {
        let (n, m) = (nbhd.tokens, nbhd.size);
        if self.tokens != n || self.images != nbhd.images || self.pairs.len() != self.images * n * m
        {
            return Err(Error::InvalidArgument(format!(
                "{op}: the inverse lists are not those of the forward's neighbourhoods"
            )));
        }
        Ok(())
    }

    /// The `(query, slot)` pairs that hold token `j` of image `img`.
    #[inline]
    pub fn of(&self, img: usize, j: usize) -> &[(u32, u32)] {
        let img = if self.images == 1 { 0 } else { img };
        let start = &self.start[img * (self.tokens + 1)..];
        let base = img * self.pairs.len() / self.images.max(1);
        &self.pairs[base + start[j] as usize..base + start[j + 1] as usize]
    }
}

/// The squared distance from token `t` to cluster mean `c` exactly as the
/// published model rounds it: `(t.x − c.x)² + (t.y − c.y)²` in f32, each
/// operation rounded separately (spec §4; `kernels/neighbourhood.cu` does the
/// same with `__fsub_rn`/`__fmul_rn`/`__fadd_rn`).
#[inline]
pub fn squared_distance(t: [f32; 2], c: [f32; 2]) -> f32 {
    let dx = t[0] - c[0];
    let dy = t[1] - c[1];
    dx * dx + dy * dy
}

/// For every token of every image, the `nnc` nearest cluster means: b×n×nnc
/// cluster indices, nearest first, ties to the lower index.
///
/// Distances are compared as the published model computes them (spec §4):
/// `d² = dx·dx + dy·dy` in f32, every subtraction, square and the sum rounded
/// on its own (Rust never fuses them into a multiply-add). Not f64: cluster
/// means on thirds and sixths of the grid come within an f32 rounding of
/// each other, and there only the f32 sum ranks them as the published model
/// does. Equal f32 distances go to the lower cluster index.
///
/// Each image's means are sorted by `x` once; every token then sweeps
/// outwards from its own `x` in both directions, and stops a side where the
/// rounded `dx·dx` alone exceeds its current `nnc`-th distance: every mean
/// further along that side is at least as far in `x`, so (rounding being
/// monotone, and the rounded sum never below its `dx·dx` term) at least
/// that far in `d²`. About √k means per token instead of all k (the ranking
/// is the brute force's exactly, ties included:
/// [`nearest_clusters_brute_force`] is the reference it is tested against).
/// Positions are expected finite.
///
/// # Errors
/// [`Error::Shape`] on inconsistent sizes, [`Error::InvalidArgument`] when
/// `nnc` is 0 or exceeds the clusters.
pub fn nearest_clusters(
    pos: &[f32],
    means: &[f32],
    batch: usize,
    n: usize,
    k: usize,
    nnc: usize,
) -> Result<Vec<u32>> {
    check_nearest_args(pos, means, batch, n, k, nnc)?;
    let by_x: Vec<Vec<u32>> = means
        .par_chunks_exact(2 * k)
        .map(|img_means| {
            let mut order: Vec<u32> = (0..k as u32).collect();
            // Stable, so equal x keep index order (not needed for the
            // result, which does not depend on the visiting order).
            order.sort_by(|&a, &b| img_means[2 * a as usize].total_cmp(&img_means[2 * b as usize]));
            order
        })
        .collect();
    Ok(nearest_per_token(
        pos,
        means,
        (batch, n, k),
        nnc,
        |img, p, img_means, best| {
            let order = &by_x[img];
            let mean = |c: u32| [img_means[2 * c as usize], img_means[2 * c as usize + 1]];
            // The rounded dx² of the mean at `order[at]`: a lower bound of the
            // d² of it and of every mean beyond it on its side.
            let bound = |at: usize| {
                let dx = p[0] - mean(order[at])[0];
                dx * dx
            };
            // `order[..left]` lie left of the token (x below its x), `order[right..]` right.
            let first_right = order.partition_point(|&c| mean(c)[0] < p[0]);
            let (mut left, mut right) = (first_right, first_right);
            loop {
                // A side stays open while its next mean could still make the list.
                let open = |lb: f32| best.worst().is_none_or(|worst| lb <= worst);
                let left_lb = (left > 0).then(|| bound(left - 1)).filter(|&lb| open(lb));
                let right_lb = (right < k).then(|| bound(right)).filter(|&lb| open(lb));
                let take_left = match (left_lb, right_lb) {
                    (None, None) => break,
                    (Some(l), Some(r)) => l <= r,
                    (l, _) => l.is_some(),
                };
                let c = if take_left {
                    left -= 1;
                    order[left]
                } else {
                    right += 1;
                    order[right - 1]
                };
                best.insert(squared_distance(p, mean(c)), c);
            }
        },
    ))
}

/// [`nearest_clusters`] by scanning every mean for every token (O(n·k)):
/// the definition the fast path must match exactly, for tests and
/// benchmarks.
///
/// # Errors
/// As [`nearest_clusters`].
#[doc(hidden)]
pub fn nearest_clusters_brute_force(
    pos: &[f32],
    means: &[f32],
    batch: usize,
    n: usize,
    k: usize,
    nnc: usize,
) -> Result<Vec<u32>> {
    check_nearest_args(pos, means, batch, n, k, nnc)?;
    Ok(nearest_per_token(
        pos,
        means,
        (batch, n, k),
        nnc,
        |_, p, img_means, best| {
            for (c, m) in img_means.chunks_exact(2).enumerate() {
                best.insert(squared_distance(p, [m[0], m[1]]), c as u32);
            }
        },
    ))
}

/// b×n×nnc cluster indices: for every token, `search(image, its position,
/// the image's means, an empty list)` offers candidates to the list, whose
/// indices are the token's row.
fn nearest_per_token(
    pos: &[f32],
    means: &[f32],
    (batch, n, k): (usize, usize, usize),
    nnc: usize,
    search: impl Fn(usize, [f32; 2], &[f32], &mut NearestList) + Sync,
) -> Vec<u32> {
    let mut out = vec![0u32; batch * n * nnc];
    out.par_chunks_mut(nnc).enumerate().for_each_init(
        || NearestList::new(nnc),
        |best, (row, dst)| {
            let img = row / n;
            best.clear();
            search(
                img,
                [pos[2 * row], pos[2 * row + 1]],
                &means[img * k * 2..(img + 1) * k * 2],
                best,
            );
            for (o, (_, c)) in dst.iter_mut().zip(&best.entries) {
                *o = *c;
            }
        },
    );
    out
}

fn check_nearest_args(
    pos: &[f32],
    means: &[f32],
    batch: usize,
    n: usize,
    k: usize,
    nnc: usize,
) -> Result<()> {
    check_len("nearest_clusters", "pos", &[batch, n, 2], pos.len())?;
    check_len("nearest_clusters", "means", &[batch, k, 2], means.len())?;
    if nnc == 0 || nnc > k {
        return Err(Error::InvalidArgument(format!(
            "nearest_clusters: nnc = {nnc} must be in 1..={k}"
        )));
    }
    Ok(())
}

/// The `capacity` nearest means seen so far, ascending by (d², index):
/// candidates may come in any order.
struct NearestList {
    capacity: usize,
    entries: Vec<(f32, u32)>,
}

impl NearestList {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Vec::with_capacity(capacity),
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
    }

    /// The `capacity`-th distance once the list is full.
    fn worst(&self) -> Option<f32> {
        (self.entries.len() == self.capacity).then(|| self.entries[self.capacity - 1].0)
    }

    fn insert(&mut self, d: f32, c: u32) {
        let before = |e: &(f32, u32)| e.0 < d || (e.0 == d && e.1 < c);
        let at = self.entries.partition_point(before);
        if at == self.capacity {
            return;
        }
        if self.entries.len() == self.capacity {
            self.entries.pop();
        }
        self.entries.insert(at, (d, c));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute force: sort every cluster by (f32 distance, index).
    fn reference(p: [f32; 2], means: &[f32], nnc: usize) -> Vec<u32> {
        let mut all: Vec<(f32, u32)> = means
            .chunks_exact(2)
            .enumerate()
            .map(|(c, m)| {
                let (dx, dy) = (p[0] - m[0], p[1] - m[1]);
                (dx * dx + dy * dy, c as u32)
            })
            .collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        all[..nnc].iter().map(|x| x.1).collect()
    }

    #[test]
    fn ties_go_to_the_lower_index_nearest_first() {
        // Four means at distance 1 from the origin, one at 0.5.
        let means = [1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.5, 0.0, -1.0];
        let got = nearest_clusters(&[0.0, 0.0], &means, 1, 1, 5, 3).unwrap();
        assert_eq!(got, [3, 0, 1]);
    }

    /// The near-tie of the issue that found f64 wrong: from (6, 6), cluster
    /// 2's mean (9, 1.8333334) and cluster 12's (4.8333335, 11) are
    /// 26.3611098 and 26.3611107 away in f64, but both 26.36111 in f32, where
    /// the lower index wins (as in the published model).
    #[test]
    fn an_f32_tie_goes_to_the_lower_index_where_f64_would_not() {
        let near = [9.0f32, 1.833_333_4];
        let far = [4.833_333_5f32, 11.0];
        let t = [6.0f32, 6.0];
        assert_eq!(squared_distance(t, near), squared_distance(t, far));
        let f64_d = |c: [f32; 2]| {
            let (dx, dy) = (6.0 - c[0] as f64, 6.0 - c[1] as f64);
            dx * dx + dy * dy
        };
        assert!(f64_d(far) < f64_d(near), "f64 ranks 12 first");
        // Fill clusters 0..13 with far-away means, 2 and 12 the near pair.
        let mut means = vec![100.0f32; 2 * 13];
        means[4..6].copy_from_slice(&near);
        means[24..26].copy_from_slice(&far);
        let got = nearest_clusters(&t, &means, 1, 1, 13, 2).unwrap();
        assert_eq!(got, [2, 12]);
    }

    #[test]
    fn matches_brute_force_on_a_grid_with_many_ties() {
        let pos: Vec<f32> = (0..60)
            .flat_map(|t| [(t % 10) as f32, (t / 10) as f32])
            .collect();
        let means: Vec<f32> = (0..12)
            .flat_map(|c| [(c % 4) as f32 * 2.5, (c / 4) as f32 * 2.0])
            .collect();
        for nnc in [1, 3, 12] {
            let got = nearest_clusters(&pos, &means, 1, 60, 12, nnc).unwrap();
            for t in 0..60 {
                let want = reference([pos[2 * t], pos[2 * t + 1]], &means, nnc);
                assert_eq!(
                    &got[t * nnc..(t + 1) * nnc],
                    &want[..],
                    "token {t}, nnc {nnc}"
                );
            }
        }
    }

    /// The sweep against the brute force on many small random problems:
    /// means on a coarse lattice (exact ties in x, in d², and duplicated
    /// means), tokens inside and outside the means' bounding box, several
    /// images, every nnc up to k.
    #[test]
    fn the_sweep_matches_the_brute_force_ties_included() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % bound
        };
        for case in 0..300 {
            let (batch, n, k) = (1 + case % 3, 1 + next(40) as usize, 1 + next(24) as usize);
            // Half the cases on a lattice of halves (many exact ties), half spread wide.
            let coarse = case % 2 == 0;
            let mut coord = |spread: u64| {
                if coarse {
                    next(spread) as f32 * 0.5
                } else {
                    next(1 << 20) as f32 / 7.0 - 5000.0
                }
            };
            let pos: Vec<f32> = (0..batch * n * 2).map(|_| coord(24) - 2.0).collect();
            let means: Vec<f32> = (0..batch * k * 2).map(|_| coord(16)).collect();
            for nnc in [1, k.min(3), k.min(6), k] {
                let got = nearest_clusters(&pos, &means, batch, n, k, nnc).unwrap();
                let want = nearest_clusters_brute_force(&pos, &means, batch, n, k, nnc).unwrap();
                assert_eq!(
                    got, want,
                    "case {case}: batch {batch}, n {n}, k {k}, nnc {nnc}"
                );
                for row in 0..batch * n {
                    let img = row / n;
                    let p = [pos[2 * row], pos[2 * row + 1]];
                    let sorted = reference(p, &means[img * 2 * k..(img + 1) * 2 * k], nnc);
                    assert_eq!(
                        &want[row * nnc..(row + 1) * nnc],
                        &sorted[..],
                        "case {case}, row {row}"
                    );
                }
            }
        }
    }

    #[test]
    fn inverse_lists_hold_every_slot_once_in_order() {
        // Two images of 5 tokens in clusters of 2 (padded), 2 clusters each.
        let nearest = [2, 0, 1, 2, 0, 1, 1, 2, 2, 0, 0, 1, 1, 0, 2, 1, 0, 2, 2, 0];
        let nb = Neighbourhood::from_clusters(&nearest, 2, 5, 2, 2);
        let inv = InverseNeighbourhood::new(&nb).unwrap();
        for img in 0..2 {
            let mut seen = 0;
            for j in 0..5 {
                let pairs = inv.of(img, j);
                assert!(pairs.windows(2).all(|w| w[0] < w[1]), "sorted");
                for &(i, slot) in pairs {
                    assert_eq!(nb.of(img, i as usize)[slot as usize], j as u32);
                }
                seen += pairs.len();
            }
            assert_eq!(seen, 5 * 4, "every slot once");
        }
        // Token 4 is a member of cluster 2 only; padding slots point at 0.
        assert!(inv.of(0, 0).len() > inv.of(0, 1).len());
        // Indices outside the tokens are an error, not a panic.
        let bad = Neighbourhood {
            idx: vec![7; 20],
            ..nb.clone()
        };
        assert!(InverseNeighbourhood::new(&bad).is_err());
    }

    #[test]
    fn cluster_neighbourhoods_mask_padding() {
        // 5 tokens in clusters of 2: cluster 2 holds token 4 and a pad slot.
        let nb = Neighbourhood::from_clusters(&[2, 0, 1, 2, 0, 1, 1, 2, 2, 0], 1, 5, 2, 2);
        assert_eq!(nb.size, 4);
        assert_eq!(nb.of(0, 0), [4, 0, 0, 1]);
        assert_eq!(nb.mask_of(0, 0).unwrap(), [true, false, true, true]);
        let full = Neighbourhood::from_clusters(&[1, 0, 0, 1, 0, 1, 1, 0], 1, 4, 2, 2);
        assert!(full.mask.is_none());
        assert_eq!(full.of(0, 3), [2, 3, 0, 1]);
    }
}
