//! Choosing the tokens a merge keeps (spec §7): grid prior, reserve tokens,
//! stable top-k of `grid prior + alpha · importance`.

use rayon::prelude::*;

use crate::error::{Error, Result, check_len};

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

/// Nearest-other-token squared distance of every token of one image, found by
/// scanning square rings around it on the `h × w` occupancy grid.
fn nearest_other_dist2(pos: &[f32], grid: (usize, usize)) -> Vec<Option<u64>> {
    let (h, w) = grid;
    let n = pos.len() / 2;
    let mut occupied = vec![false; h * w];
    let cell = |t: usize| (pos[2 * t] as i64, pos[2 * t + 1] as i64);
    for t in 0..n {
        let (x, y) = cell(t);
        occupied[y as usize * w + x as usize] = true;
    }
    let max_ring = h.max(w) as i64;
    (0..n)
        .map(|t| {
            let (x, y) = cell(t);
            let mut best: Option<u64> = None;
            for r in 1..=max_ring {
                // Every cell of ring r is at least r away: stop once r² ≥ best.
                if best.is_some_and(|b| (r * r) as u64 >= b) {
                    break;
                }
                for (cx, cy) in ring(x, y, r) {
                    if cx < 0 || cy < 0 || cx >= w as i64 || cy >= h as i64 {
                        continue;
                    }
                    if occupied[cy as usize * w + cx as usize] {
                        let d = ((cx - x) * (cx - x) + (cy - y) * (cy - y)) as u64;
                        best = Some(best.map_or(d, |b| b.min(d)));
                    }
                }
            }
            best
        })
        .collect()
}

/// The cells at Chebyshev distance exactly `r` from `(x, y)`.
fn ring(x: i64, y: i64, r: i64) -> impl Iterator<Item = (i64, i64)> {
    let top_bottom = (-r..=r).flat_map(move |dx| [(x + dx, y - r), (x + dx, y + r)]);
    let sides = (-r + 1..r).flat_map(move |dy| [(x - r, y + dy), (x + r, y + dy)]);
    top_bottom.chain(sides)
}

/// The grid prior of spec §7 for one image: at stride 2, 1 where both
/// coordinates are even; later, 1 where both are divisible by
/// `ada = 2^(e+1)`, `e` the smallest integer with `4^e ≥ δ²`, `δ` the
/// distance to the nearest other token (0 for a lone token).
pub fn grid_prior(pos: &[f32], stride: usize, grid: (usize, usize)) -> Vec<f32> {
    let n = pos.len() / 2;
    let divisible = |t: usize, by: u64| {
        (pos[2 * t] as u64).is_multiple_of(by) && (pos[2 * t + 1] as u64).is_multiple_of(by)
    };
    if stride == 2 {
        return (0..n).map(|t| divisible(t, 2) as u32 as f32).collect();
    }
    nearest_other_dist2(pos, grid)
        .into_iter()
        .enumerate()
        .map(|(t, d2)| match d2 {
            None => 0.0,
            Some(d2) => {
                let mut e = 0u32;
                while 4u64.pow(e) < d2 {
                    e += 1;
                }
                divisible(t, 2u64 << e) as u32 as f32
            }
        })
        .collect()
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
        .map(|img| {
            let pos = &pos[img * n * 2..(img + 1) * n * 2];
            let p = &importance[img * n..(img + 1) * n];
            let prior = grid_prior(pos, stride, grid);
            let (reserve, mut candidates): (Vec<u32>, Vec<u32>) =
                (0..n as u32).partition(|&t| is_reserve(&pos[2 * t as usize..]));
            let score: Vec<f32> = (0..n).map(|t| prior[t] + alpha * p[t]).collect();
            // Stable descending sort: equal scores keep the lower index first.
            candidates.sort_by(|&a, &b| score[b as usize].total_cmp(&score[a as usize]));
            let sample = keep.saturating_sub(reserve.len()).min(candidates.len());
            candidates.truncate(sample);
            (candidates, reserve)
        })
        .collect();

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

    fn brute_force_dist2(pos: &[f32]) -> Vec<Option<u64>> {
        let n = pos.len() / 2;
        (0..n)
            .map(|i| {
                (0..n)
                    .filter(|&j| j != i)
                    .map(|j| {
                        let dx = (pos[2 * i] - pos[2 * j]) as i64;
                        let dy = (pos[2 * i + 1] - pos[2 * j + 1]) as i64;
                        (dx * dx + dy * dy) as u64
                    })
                    .min()
            })
            .collect()
    }

    #[test]
    fn ring_search_matches_brute_force() {
        let pos: Vec<f32> = [(0, 0), (4, 0), (9, 9), (3, 7), (12, 2), (6, 6), (0, 13)]
            .iter()
            .flat_map(|&(x, y)| [x as f32, y as f32])
            .collect();
        assert_eq!(nearest_other_dist2(&pos, (14, 13)), brute_force_dist2(&pos));
        assert_eq!(nearest_other_dist2(&[2.0, 3.0], (5, 5)), vec![None]);
    }

    #[test]
    fn grid_prior_uses_the_adaptive_stride() {
        // δ² = 1 → ada 2; δ² = 4 → ada 4; δ² = 5 → e = 2, ada 8.
        let pos = [0.0, 0.0, 1.0, 0.0, 8.0, 8.0, 10.0, 9.0, 4.0, 4.0, 6.0, 4.0];
        let g = grid_prior(&pos, 4, (16, 16));
        assert_eq!(g, [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]);
        let g2 = grid_prior(&pos, 2, (16, 16));
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
