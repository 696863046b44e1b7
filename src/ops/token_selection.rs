//! Choosing the tokens a merge keeps (spec §7): grid prior, reserve tokens,
//! stable top-k of `grid prior + alpha · importance`.
//!
//! The grid prior and the top-k produce indices and have no gradient: the
//! selection uses the detached score. The importance itself is learned
//! through the merge's weights ([`importance_backward`]).

use rayon::prelude::*;

use super::activation::sigmoid;
use super::grid_search::OccupancyGrid;
use crate::error::{Error, Result, check_len};

pub mod gpu;

/// The tokens a merge keeps, per image, in their new order.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub batch: usize,
    /// Tokens kept per image: `sampled + reserve`.
    pub kept: usize,
    /// Tokens kept for their score.
    pub sampled: usize,
    /// Tokens kept because they lie on the coarse reserve grid.
    pub reserve: usize,
    /// b×kept indices into the current tokens: sampled centres by descending
    /// score (ties to the lower index), then reserve tokens in index order.
    pub order: Vec<u32>,
}

impl Selection {
    /// The kept tokens' positions (b×kept×2), from the positions `pos`
    /// (b×n×2) of the `n` tokens the selection chose from.
    pub fn kept_positions(&self, pos: &[f32], n: usize) -> Vec<f32> {
        self.order
            .iter()
            .enumerate()
            .flat_map(|(row, &t)| {
                let i = (row / self.kept * n + t as usize) * 2;
                [pos[i], pos[i + 1]]
            })
            .collect()
    }
}

/// Lanes of the importance dot product: a GPU warp.
const IMPORTANCE_LANES: usize = 32;

/// The importance `p = sigmoid(x · weight + bias)` of every row of `x`
/// (rows×dim), the `prob_net` of spec §7, computed in the exact order of
/// the `importance` kernel so that a device selects the same tokens as the
/// CPU: lane `l` of 32 sums `x[e]·w[e]` for `e = l, l+32, …` (product and sum
/// each rounded), the lanes are added in a halving tree (16, 8, 4, 2, 1, as
/// the warp's butterfly), then the bias, then [`sigmoid`]. The scores are
/// the same bits wherever the rows are (no dependence on batch or threads).
///
/// # Errors
/// [`Error::Shape`] when `x` is not rows×dim or `weight` not dim long.
pub fn importance(
    x: &[f32],
    weight: &[f32],
    bias: f32,
    rows: usize,
    dim: usize,
) -> Result<Vec<f32>> {
    check_len("importance", "x", &[rows, dim], x.len())?;
    check_len("importance", "weight", &[dim], weight.len())?;
    if dim == 0 {
        return Ok(vec![sigmoid(0.0 + bias); rows]);
    }
    Ok(x.par_chunks(dim)
        .with_min_len(64)
        .map(|row| {
            let mut lanes = [0.0f32; IMPORTANCE_LANES];
            for (e, (&v, &w)) in row.iter().zip(weight).enumerate() {
                lanes[e % IMPORTANCE_LANES] += v * w;
            }
            let mut width = IMPORTANCE_LANES / 2;
            while width > 0 {
                for l in 0..width {
                    lanes[l] += lanes[l + width];
                }
                width /= 2;
            }
            sigmoid(lanes[0] + bias)
        })
        .collect())
}

/// Gradients of [`importance`] with respect to its input rows and the
/// `prob_net` parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportanceGrads {
    /// rows×dim.
    pub x: Vec<f32>,
    /// dim: `prob_net.weight`.
    pub weight: Vec<f32>,
    /// `prob_net.bias`.
    pub bias: f32,
}

/// The backward of [`importance`]: from its output `p` and the gradient
/// `grad_p` (what the merge's backward returns for the importance; the
/// selection itself used the detached score), `dlogit = dp·p·(1 − p)`, then
/// `dx = dlogit·w`, and `dw = Σ dlogit·x`, `db = Σ dlogit` summed in fixed
/// chunks of rows added in order (the same bits for any thread count).
///
/// # Errors
/// [`Error::Shape`] when the lengths disagree.
pub fn importance_backward(
    x: &[f32],
    weight: &[f32],
    p: &[f32],
    grad_p: &[f32],
    rows: usize,
    dim: usize,
) -> Result<ImportanceGrads> {
    const OP: &str = "importance_backward";
    check_len(OP, "x", &[rows, dim], x.len())?;
    check_len(OP, "weight", &[dim], weight.len())?;
    check_len(OP, "p", &[rows], p.len())?;
    check_len(OP, "grad_p", &[rows], grad_p.len())?;
    const ROWS_PER_CHUNK: usize = 64;
    let dlogit: Vec<f32> = p
        .iter()
        .zip(grad_p)
        .map(|(&p, &g)| g * p * (1.0 - p))
        .collect();
    let mut dx = vec![0.0f32; rows * dim];
    if dim > 0 {
        dx.par_chunks_mut(dim)
            .zip(dlogit.par_iter())
            .for_each(|(row, &dl)| {
                for (o, &w) in row.iter_mut().zip(weight) {
                    *o = dl * w;
                }
            });
    }
    let partials: Vec<(Vec<f32>, f32)> = dlogit
        .par_chunks(ROWS_PER_CHUNK)
        .enumerate()
        .map(|(chunk, dls)| {
            let mut dw = vec![0.0f32; dim];
            let mut db = 0.0f32;
            for (r, &dl) in dls.iter().enumerate() {
                let row = chunk * ROWS_PER_CHUNK + r;
                super::vector_math::axpy(dl, &x[row * dim..(row + 1) * dim], &mut dw);
                db += dl;
            }
            (dw, db)
        })
        .collect();
    let mut grads = ImportanceGrads {
        x: dx,
        weight: vec![0.0; dim],
        bias: 0.0,
    };
    for (dw, db) in partials {
        for (a, v) in grads.weight.iter_mut().zip(dw) {
            *a += v;
        }
        grads.bias += db;
    }
    Ok(grads)
}

/// The grid prior of spec §7 for one image: at stride 2, 1 where both
/// coordinates are even; later, 1 where both are divisible by
/// `ada = 2^(e+1)`, `e` the smallest integer with `4^e ≥ δ²`, `δ` the
/// distance to the nearest other token (0 for a lone token).
///
/// # Errors
/// [`Error::InvalidArgument`] for a position outside the grid.
pub fn grid_prior(pos: &[f32], stride: usize, grid: (usize, usize)) -> Result<Vec<f32>> {
    let n = pos.len() / 2;
    let divisible = |t: usize, by: u64| {
        (pos[2 * t] as u64).is_multiple_of(by) && (pos[2 * t + 1] as u64).is_multiple_of(by)
    };
    if stride == 2 {
        return Ok((0..n).map(|t| divisible(t, 2) as u32 as f32).collect());
    }
    let occupancy = OccupancyGrid::new(pos, grid)?;
    let mut nearest = Vec::with_capacity(1);
    Ok((0..n)
        .map(|t| {
            let cell = (pos[2 * t] as usize, pos[2 * t + 1] as usize);
            occupancy.nearest(cell, 1, Some(t as u32), &mut nearest);
            match nearest.first() {
                None => 0.0,
                Some(&(d2, _)) => {
                    let mut e = 0u32;
                    while 4u64.pow(e) < d2 {
                        e += 1;
                    }
                    divisible(t, 2u64 << e) as u32 as f32
                }
            }
        })
        .collect())
}

/// The reserve tokens of a stage whose tokens hold every point of the coarse
/// reserve grid of `stride` (both coordinates divisible by `2·stride`) on
/// the stage-0 `grid` (rows, columns): the model's stages do, because stage
/// 0 is the whole grid and each merge keeps its reserve tokens, whose grid
/// holds the next one's. The count the device selection expects without
/// reading one back.
pub fn grid_reserve_count((rows, cols): (usize, usize), stride: usize) -> usize {
    let coarse = 2 * stride.max(1);
    rows.div_ceil(coarse) * cols.div_ceil(coarse)
}

/// Selects the tokens a merge keeps, for `batch` images of `n` tokens.
///
/// `keep = floor(n · ds_rate)`; reserve tokens (both coordinates divisible by
/// `2·stride`) are always kept, and `keep − reserve` more are the
/// highest-scoring other tokens, score `= grid prior + alpha · importance`.
///
/// Beyond the published code: when `keep` is below the reserve count (tiny
/// inputs) only the reserve tokens are kept, and the sample never exceeds the
/// non-reserve tokens there are.
///
/// # Errors
/// [`Error::Shape`] on inconsistent sizes.
#[allow(clippy::too_many_arguments)]
pub fn select_tokens(
    pos: &[f32],
    importance: &[f32],
    batch: usize,
    n: usize,
    stride: usize,
    grid: (usize, usize),
    alpha: f32,
    ds_rate: f64,
) -> Result<Selection> {
    check_len("select_tokens", "pos", &[batch, n, 2], pos.len())?;
    check_len("select_tokens", "importance", &[batch, n], importance.len())?;
    let keep = (n as f64 * ds_rate) as usize;
    let coarse = (2 * stride) as u64;
    let is_reserve =
        |p: &[f32]| (p[0] as u64).is_multiple_of(coarse) && (p[1] as u64).is_multiple_of(coarse);

    let per_image: Vec<(Vec<u32>, Vec<u32>)> = (0..batch)
        .into_par_iter()
        .map(|img| -> Result<(Vec<u32>, Vec<u32>)> {
            let pos = &pos[img * n * 2..(img + 1) * n * 2];
            let p = &importance[img * n..(img + 1) * n];
            let prior = grid_prior(pos, stride, grid)?;
            let (reserve, mut candidates): (Vec<u32>, Vec<u32>) =
                (0..n as u32).partition(|&t| is_reserve(&pos[2 * t as usize..]));
            let score: Vec<f32> = (0..n).map(|t| prior[t] + alpha * p[t]).collect();
            // Stable descending sort: equal scores keep the lower index first.
            candidates.sort_by(|&a, &b| score[b as usize].total_cmp(&score[a as usize]));
            let sample = keep.saturating_sub(reserve.len()).min(candidates.len());
            candidates.truncate(sample);
            Ok((candidates, reserve))
        })
        .collect::<Result<_>>()?;

    let reserve = per_image.first().map_or(0, |(_, r)| r.len());
    let sampled = per_image.first().map_or(0, |(s, _)| s.len());
    if per_image
        .iter()
        .any(|(s, r)| r.len() != reserve || s.len() != sampled)
    {
        return Err(Error::InvalidArgument(
            "select_tokens: images of one batch must have the same reserve-grid tokens".into(),
        ));
    }
    let order = per_image
        .into_iter()
        .flat_map(|(s, r)| s.into_iter().chain(r))
        .collect();
    Ok(Selection {
        batch,
        kept: sampled + reserve,
        sampled,
        reserve,
        order,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::clustering::grid_positions;

    #[test]
    fn grid_prior_uses_the_adaptive_stride() {
        // δ² = 1 → ada 2; δ² = 4 → ada 4; δ² = 5 → e = 2, ada 8.
        let pos = [0.0, 0.0, 1.0, 0.0, 8.0, 8.0, 10.0, 9.0, 4.0, 4.0, 6.0, 4.0];
        let g = grid_prior(&pos, 4, (16, 16)).unwrap();
        assert_eq!(g, [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]);
        assert_eq!(grid_prior(&[2.0, 3.0], 4, (5, 5)).unwrap(), [0.0]);
        let g2 = grid_prior(&pos, 2, (16, 16)).unwrap();
        assert_eq!(g2, [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn keeps_reserve_and_exactly_keep_tokens_with_stable_ties() {
        // 4×4 grid at stride 2: reserve = tokens with both coordinates divisible by 4.
        let pos: Vec<f32> = (0..16)
            .flat_map(|t| [(t % 4) as f32, (t / 4) as f32])
            .collect();
        let importance = vec![0.5; 16];
        let sel = select_tokens(&pos, &importance, 1, 16, 2, (4, 4), 4.0, 0.25).unwrap();
        assert_eq!((sel.kept, sel.reserve, sel.sampled), (4, 1, 3));
        // Prior 1 for even-even tokens 2, 8, 10 (0 is reserve): they win, in index order.
        assert_eq!(sel.order, [2, 8, 10, 0]);
    }

    #[test]
    fn the_grid_reserve_count_is_what_selection_finds_merge_after_merge() {
        // Stage 0 is the whole grid; each stage keeps only its reserve
        // tokens (the fewest any merge keeps): the count still holds.
        for grid in [(1, 1), (7, 9), (16, 16), (33, 17), (56, 56)] {
            let mut pos = grid_positions(grid.0, grid.1);
            for s in 0..3 {
                let n = pos.len() / 2;
                let stride = 2 << s;
                let sel = select_tokens(&pos, &vec![0.5; n], 1, n, stride, grid, 4.0, 0.0).unwrap();
                assert_eq!(
                    sel.reserve,
                    grid_reserve_count(grid, stride),
                    "{grid:?}, stage {s}"
                );
                pos = sel
                    .order
                    .iter()
                    .flat_map(|&t| [pos[2 * t as usize], pos[2 * t as usize + 1]])
                    .collect();
            }
        }
    }

    #[test]
    fn tiny_inputs_keep_only_reserve_tokens() {
        let sel = select_tokens(
            &[0.0, 0.0, 1.0, 0.0],
            &[0.9, 0.1],
            1,
            2,
            2,
            (1, 2),
            4.0,
            0.25,
        )
        .unwrap();
        assert_eq!(sel.order, [0]);
        assert_eq!((sel.kept, sel.sampled), (1, 0));
    }
}
