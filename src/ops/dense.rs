//! Tokens back onto the pixel grid: scatter each stage's tokens onto the
//! stage-0 `h × w` grid and fill the empty cells by inverse-distance
//! weighting of their `k` nearest tokens, `w_i ∝ 1/d_i^power` (the published
//! pixel decoder interpolates with k = 4 and power 6).

use rayon::prelude::*;

use super::grid_search::OccupancyGrid;
use crate::error::{Error, Result, check_len};

pub mod gpu;

/// How empty cells are filled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DenseOptions {
    /// Nearest tokens averaged per empty cell.
    pub k: usize,
    /// Weights are `1 / d^power`.
    pub power: f32,
}

impl Default for DenseOptions {
    /// k = 4, power 6, as the published pixel decoder.
    fn default() -> Self {
        Self { k: 4, power: 6.0 }
    }
}

/// Scatters `batch` token sets (positions b×n×2, features b×n×c) onto the
/// `h × w` grid: a cell holding a token takes its features, an empty cell
/// the inverse-distance-weighted mean of its `k` nearest tokens (ties to the
/// lower token index). Returns b×c×h×w (channel-major, like an image).
///
/// # Errors
/// [`Error::Shape`] on inconsistent sizes; [`Error::InvalidArgument`] for
/// positions off the grid, `k = 0`, or a non-positive power.
pub fn to_dense(
    pos: &[f32],
    feat: &[f32],
    (batch, n, c): (usize, usize, usize),
    (h, w): (usize, usize),
    options: DenseOptions,
) -> Result<Vec<f32>> {
    check_len("to_dense", "pos", &[batch, n, 2], pos.len())?;
    check_len("to_dense", "feat", &[batch, n, c], feat.len())?;
    if options.k == 0 || options.power.is_nan() || options.power <= 0.0 {
        return Err(Error::InvalidArgument(format!(
            "to_dense: needs k ≥ 1 and power > 0 (k = {}, power = {})",
            options.k, options.power
        )));
    }
    let plane = h * w;
    let mut out = vec![0.0f32; batch * c * plane];
    if n == 0 || c == 0 || plane == 0 {
        return Ok(out);
    }
    for (img, dense) in out.chunks_exact_mut(c * plane).enumerate() {
        let pos = &pos[img * n * 2..(img + 1) * n * 2];
        let feat = &feat[img * n * c..(img + 1) * n * c];
        let occupancy = OccupancyGrid::new(pos, (h, w))?;
        // Each cell's sources and weights, computed in parallel by rows...
        let weights: Vec<Vec<(u32, f32)>> = (0..plane)
            .into_par_iter()
            .map_init(Vec::new, |nearest, cell| {
                let (x, y) = (cell % w, cell / w);
                if let Some(t) = occupancy.at(x, y) {
                    return vec![(t, 1.0)];
                }
                occupancy.nearest((x, y), options.k, None, nearest);
                let raw: Vec<(u32, f64)> = nearest
                    .iter()
                    .map(|&(d2, t)| (t, (d2 as f64).powf(-0.5 * options.power as f64)))
                    .collect();
                let total: f64 = raw.iter().map(|r| r.1).sum();
                raw.into_iter()
                    .map(|(t, wt)| (t, (wt / total) as f32))
                    .collect()
            })
            .collect();
        // ...then every channel plane gathers from them.
        dense
            .par_chunks_mut(plane)
            .enumerate()
            .for_each(|(ch, out_plane)| {
                for (o, sources) in out_plane.iter_mut().zip(&weights) {
                    *o = sources
                        .iter()
                        .map(|&(t, wt)| wt * feat[t as usize * c + ch])
                        .sum();
                }
            });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_grid_is_scattered_unchanged() {
        // 2×3 grid, tokens in a shuffled order, 2 channels: out[ch][y][x] = feature.
        let pos = [2.0, 1.0, 0.0, 0.0, 1.0, 0.0, 2.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let feat: Vec<f32> = (0..6).flat_map(|t| [t as f32, 10.0 * t as f32]).collect();
        let out = to_dense(&pos, &feat, (1, 6, 2), (2, 3), DenseOptions::default()).unwrap();
        assert_eq!(
            out,
            [
                1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 0.0
            ]
        );
    }

    #[test]
    fn one_token_fills_the_whole_grid() {
        let out = to_dense(
            &[1.0, 1.0],
            &[7.0],
            (1, 1, 1),
            (3, 4),
            DenseOptions::default(),
        )
        .unwrap();
        assert_eq!(out, vec![7.0; 12]);
    }

    #[test]
    fn empty_cells_take_inverse_distance_weights() {
        // Tokens at x = 0 (value 0) and x = 3 (value 1) on a 1×4 row.
        let pos = [0.0, 0.0, 3.0, 0.0];
        let feat = [0.0, 1.0];
        let opts = DenseOptions { k: 2, power: 2.0 };
        let out = to_dense(&pos, &feat, (1, 2, 1), (1, 4), opts).unwrap();
        // Cell 1: distances 1 and 2 → weights 1 and 1/4 → value (1/4)/(5/4) = 0.2.
        assert!((out[1] - 0.2).abs() < 1e-6);
        assert!((out[2] - 0.8).abs() < 1e-6);
        assert_eq!((out[0], out[3]), (0.0, 1.0));
        // With k = 1 each empty cell copies its nearest token; ties to the lower index.
        let nearest = to_dense(
            &[0.0, 0.0, 2.0, 0.0],
            &[5.0, 9.0],
            (1, 2, 1),
            (1, 3),
            DenseOptions { k: 1, power: 6.0 },
        )
        .unwrap();
        assert_eq!(nearest, [5.0, 5.0, 9.0]);
    }

    #[test]
    fn power_six_is_the_default_and_batches_are_independent() {
        let pos = [0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 1.0, 0.0];
        let feat = [0.0, 1.0, 4.0, 8.0];
        let out = to_dense(&pos, &feat, (2, 2, 1), (1, 3), DenseOptions::default()).unwrap();
        // Image 0: cell 1 is equidistant from both: mean 0.5. Image 1: full row copy.
        assert_eq!(&out[..3], &[0.0, 0.5, 1.0]);
        assert_eq!(&out[3..5], &[4.0, 8.0]);
        let want = (8.0 + 4.0 / 64.0) / (1.0 + 1.0 / 64.0);
        assert!((out[5] - want).abs() < 1e-6, "{} vs {want}", out[5]);
    }

    #[test]
    fn zero_channels_or_tokens_give_zero_maps() {
        let none = to_dense(&[0.0, 0.0], &[], (1, 1, 0), (2, 2), DenseOptions::default()).unwrap();
        assert!(none.is_empty());
        let empty = to_dense(&[], &[], (1, 0, 3), (2, 2), DenseOptions::default()).unwrap();
        assert_eq!(empty, vec![0.0; 12]);
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(
            to_dense(
                &[5.0, 0.0],
                &[1.0],
                (1, 1, 1),
                (1, 3),
                DenseOptions::default()
            )
            .is_err()
        );
        assert!(
            to_dense(
                &[0.0, 0.0],
                &[1.0],
                (1, 1, 1),
                (1, 3),
                DenseOptions { k: 0, power: 6.0 }
            )
            .is_err()
        );
        assert!(
            to_dense(
                &[0.0, 0.0],
                &[1.0, 2.0],
                (1, 1, 1),
                (1, 3),
                DenseOptions::default()
            )
            .is_err()
        );
    }
}
