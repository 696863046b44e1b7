//! Nearest tokens on the stage-0 grid, found by scanning square rings
//! around a point on an occupancy map. Shared by the grid prior (distance to
//! the nearest other token, spec §7) and by dense maps (k nearest tokens of
//! every empty cell).

use crate::error::{Error, Result, check_len};

/// Which token (if any) sits on each cell of an `h × w` grid.
#[derive(Debug, Clone)]
pub struct OccupancyGrid {
    h: usize,
    w: usize,
    /// `h·w` cells: the lowest token index on the cell, or `u32::MAX`.
    cells: Vec<u32>,
}

const EMPTY: u32 = u32::MAX;

impl OccupancyGrid {
    /// Places the tokens at `pos` (n×2 integer positions) on an `h × w` grid.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a position outside the grid.
    pub fn new(pos: &[f32], (h, w): (usize, usize)) -> Result<Self> {
        check_len("occupancy_grid", "pos", &[pos.len() / 2, 2], pos.len())?;
        let mut cells = vec![EMPTY; h * w];
        for (t, p) in pos.chunks_exact(2).enumerate() {
            let (x, y) = (p[0], p[1]);
            if !(x >= 0.0 && y >= 0.0 && (x as usize) < w && (y as usize) < h) {
                return Err(Error::InvalidArgument(format!(
                    "token {t} at ({x}, {y}) lies outside the {h}×{w} grid"
                )));
            }
            let cell = &mut cells[y as usize * w + x as usize];
            *cell = (*cell).min(t as u32);
        }
        Ok(Self { h, w, cells })
    }

    /// The token on cell `(x, y)`, if any.
    pub fn at(&self, x: usize, y: usize) -> Option<u32> {
        let t = self.cells[y * self.w + x];
        (t != EMPTY).then_some(t)
    }

    /// The `k` tokens nearest to cell `(x, y)` (fewer if the grid holds
    /// fewer), as `(squared distance, token)` sorted by distance, ties to the
    /// lower token index; `exclude` is never returned.
    pub fn nearest(
        &self,
        (x, y): (usize, usize),
        k: usize,
        exclude: Option<u32>,
        out: &mut Vec<(u64, u32)>,
    ) {
        out.clear();
        if k == 0 {
            return;
        }
        let (x, y) = (x as i64, y as i64);
        let max_ring = self.h.max(self.w) as i64;
        for r in 0..=max_ring {
            // Cells of ring r are at least r away: once the k-th best is
            // closer than r, nothing further can enter (equal distances can,
            // with a lower index, so only strictly closer stops the scan).
            if out.len() == k && out[k - 1].0 < (r * r) as u64 {
                break;
            }
            for_each_ring_cell(x, y, r, |cx, cy| {
                if cx < 0 || cy < 0 || cx >= self.w as i64 || cy >= self.h as i64 {
                    return;
                }
                let t = self.cells[cy as usize * self.w + cx as usize];
                if t == EMPTY || Some(t) == exclude {
                    return;
                }
                let d2 = ((cx - x) * (cx - x) + (cy - y) * (cy - y)) as u64;
                let entry = (d2, t);
                if out.len() == k && entry >= out[k - 1] {
                    return;
                }
                let at = out.partition_point(|e| *e < entry);
                out.insert(at, entry);
                out.truncate(k);
            });
        }
    }
}

/// Calls `f` on every cell at Chebyshev distance exactly `r` from `(x, y)`.
fn for_each_ring_cell(x: i64, y: i64, r: i64, mut f: impl FnMut(i64, i64)) {
    if r == 0 {
        return f(x, y);
    }
    for dx in -r..=r {
        f(x + dx, y - r);
        f(x + dx, y + r);
    }
    for dy in -r + 1..r {
        f(x - r, y + dy);
        f(x + r, y + dy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(
        pos: &[f32],
        (x, y): (usize, usize),
        k: usize,
        exclude: Option<u32>,
    ) -> Vec<(u64, u32)> {
        let mut all: Vec<(u64, u32)> = pos
            .chunks_exact(2)
            .enumerate()
            .filter(|(t, _)| Some(*t as u32) != exclude)
            .map(|(t, p)| {
                let dx = p[0] as i64 - x as i64;
                let dy = p[1] as i64 - y as i64;
                ((dx * dx + dy * dy) as u64, t as u32)
            })
            .collect();
        all.sort();
        all.truncate(k);
        all
    }

    #[test]
    fn ring_search_matches_brute_force_with_ties() {
        // A symmetric pattern: many equal distances.
        let pos: Vec<f32> = [
            (5, 5),
            (3, 5),
            (7, 5),
            (5, 3),
            (5, 7),
            (0, 0),
            (10, 10),
            (9, 1),
            (2, 8),
        ]
        .iter()
        .flat_map(|&(x, y)| [x as f32, y as f32])
        .collect();
        let grid = OccupancyGrid::new(&pos, (11, 11)).unwrap();
        let mut out = Vec::new();
        for y in 0..11 {
            for x in 0..11 {
                for k in [1, 3, 9, 12] {
                    grid.nearest((x, y), k, None, &mut out);
                    assert_eq!(out, brute(&pos, (x, y), k, None), "({x}, {y}) k {k}");
                    grid.nearest((x, y), k, Some(0), &mut out);
                    assert_eq!(
                        out,
                        brute(&pos, (x, y), k, Some(0)),
                        "({x}, {y}) k {k} excluding 0"
                    );
                }
            }
        }
    }

    #[test]
    fn positions_outside_the_grid_are_errors() {
        assert!(OccupancyGrid::new(&[3.0, 0.0], (2, 2)).is_err());
        assert!(OccupancyGrid::new(&[-1.0, 0.0], (2, 2)).is_err());
        assert!(OccupancyGrid::new(&[f32::NAN, 0.0], (2, 2)).is_err());
    }
}
