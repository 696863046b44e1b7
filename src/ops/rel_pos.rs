//! Relative-position features (spec §5) and the per-offset tables built from them.
//!
//! Positions are integers on the stage-0 grid, so every query–neighbour pair
//! has an integer offset `(dx, dy)` with `|dx| < w`, `|dy| < h`. The position
//! bias `P(f(dx, dy))` and the PointConv weight net depend on the offset only,
//! so each block evaluates them once per possible offset into a table, and the
//! attention and merge look values up by offset. This computes exactly what
//! the published lookup table computes, without its `img_size` limit.

use multiversion::multiversion;
use rayon::prelude::*;

use super::linear::Linear;
use super::neighbourhood::Neighbourhood;
use super::vector_math;
use crate::error::{Error, Result, check_len};

/// The five features of offset `(dx, dy)` (neighbour minus query):
/// `(dx, dy, d, dy/d, dx/d)` with `d = sqrt(dx² + dy²)`, the last two 0 when `d = 0`.
pub fn rel_pos_features(dx: f32, dy: f32) -> [f32; 5] {
    let d = (dy * dy + dx * dx).sqrt();
    if d == 0.0 {
        [dx, dy, 0.0, 0.0, 0.0]
    } else {
        [dx, dy, d, dy / d, dx / d]
    }
}

/// Enumerates the offsets a stage can meet, maps each to a table row, and
/// holds the features of every row (feature-major: 5 × rows).
///
/// Offsets range over `[-half_w, half_w] × [-half_h, half_h]` with
/// `half = extent − 1`, optionally capped: segmentation checkpoints clamp
/// offsets into `±511` (spec §5), which the cap reproduces.
#[derive(Debug, Clone, PartialEq)]
pub struct OffsetTable {
    half_w: i32,
    half_h: i32,
    clamp: Option<usize>,
    features: Vec<f32>,
}

/// Offset cap of the published segmentation backbones.
pub const SEGMENTATION_OFFSET_CLAMP: usize = 511;

impl OffsetTable {
    /// The table for a stage-0 grid of `h × w` tokens, offsets clamped to
    /// `±clamp` when given.
    pub fn new(h: usize, w: usize, clamp: Option<usize>) -> Self {
        let cap = clamp.unwrap_or(usize::MAX);
        let half = |extent: usize| extent.saturating_sub(1).min(cap).min(i32::MAX as usize) as i32;
        let mut table = Self {
            half_w: half(w),
            half_h: half(h),
            clamp,
            features: Vec::new(),
        };
        let rows = table.len();
        let mut features = vec![0.0f32; 5 * rows];
        for (r, (dx, dy)) in table.offsets().enumerate() {
            for (k, f) in rel_pos_features(dx as f32, dy as f32)
                .into_iter()
                .enumerate()
            {
                features[k * rows + r] = f;
            }
        }
        table.features = features;
        table
    }

    /// The cap on offsets per axis, if any (the device kernels, which
    /// compute features from positions, clamp to it).
    pub fn clamp(&self) -> Option<usize> {
        self.clamp
    }

    /// Feature `k` (0..5: `dx, dy, d, dy/d, dx/d`) of every row.
    pub fn feature(&self, k: usize) -> &[f32] {
        &self.features[k * self.len()..(k + 1) * self.len()]
    }

    /// A linear layer over the 5 features, applied to every row; the table is
    /// output-major: `out × rows`, entry `[o][row]`.
    ///
    /// # Errors
    /// [`Error::Shape`] when `layer` does not map 5 inputs.
    pub fn apply(&self, layer: &Linear) -> Result<Vec<f32>> {
        if layer.in_dim != 5 || layer.weight.len() != 5 * layer.out_dim {
            return Err(Error::shape(
                "rel_pos_table",
                "weight",
                [layer.out_dim, 5],
                layer.weight.len(),
            ));
        }
        let rows = self.len();
        let mut out = vec![0.0f32; layer.out_dim * rows];
        out.par_chunks_mut(rows)
            .enumerate()
            .for_each(|(o, column)| {
                let w = &layer.weight[o * 5..(o + 1) * 5];
                let b = layer.bias.as_ref().map_or(0.0, |b| b[o]);
                linear_column(&self.features, w, b, column);
            });
        Ok(out)
    }

    /// Number of distinct offsets (table rows).
    pub fn len(&self) -> usize {
        (2 * self.half_w as usize + 1) * (2 * self.half_h as usize + 1)
    }

    /// Never true: the zero offset is always present.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Row of offset `(dx, dy)`, clamped into the table's range.
    #[inline]
    pub fn row(&self, dx: i32, dy: i32) -> usize {
        let x = dx.clamp(-self.half_w, self.half_w) + self.half_w;
        let y = dy.clamp(-self.half_h, self.half_h) + self.half_h;
        y as usize * (2 * self.half_w as usize + 1) + x as usize
    }

    /// Row of the offset from query position `from` to neighbour position `to`.
    #[inline]
    pub fn row_between(&self, from: [f32; 2], to: [f32; 2]) -> usize {
        self.row((to[0] - from[0]) as i32, (to[1] - from[1]) as i32)
    }

    /// The offset of each row, in row order.
    pub fn offsets(&self) -> impl Iterator<Item = (i32, i32)> + '_ {
        (-self.half_h..=self.half_h)
            .flat_map(move |dy| (-self.half_w..=self.half_w).map(move |dx| (dx, dy)))
    }
}

/// The table row of every neighbour slot: b×n×m, entry `[img][i][slot]` the
/// row of the offset from token `i` to its neighbour in that slot.
///
/// Rows depend only on the stage's positions and neighbourhoods, so a stage
/// computes them once for all its blocks and its merge.
///
/// # Errors
/// [`Error::Shape`] when `pos` is not b×n×2 or `nbhd` is not over n tokens.
pub fn neighbour_rows(
    offsets: &OffsetTable,
    pos: &[f32],
    nbhd: &Neighbourhood,
    batch: usize,
) -> Result<Vec<u32>> {
    let (n, m) = (nbhd.tokens, nbhd.size);
    check_len("neighbour_rows", "pos", &[batch, n, 2], pos.len())?;
    nbhd.check("neighbour_rows", batch, n)?;
    let mut rows = vec![0u32; batch * n * m];
    rows.par_chunks_mut(m.max(1))
        .enumerate()
        .for_each(|(row, out)| {
            let (img, i) = (row / n, row % n);
            let pos = &pos[img * n * 2..(img + 1) * n * 2];
            let here = [pos[2 * i], pos[2 * i + 1]];
            for (o, &j) in out.iter_mut().zip(nbhd.of(img, i)) {
                let j = j as usize;
                *o = offsets.row_between(here, [pos[2 * j], pos[2 * j + 1]]) as u32;
            }
        });
    Ok(rows)
}

/// `column[r] = b + Σ_k w[k] · features[k][r]` over every row.
#[multiversion(targets = "simd")]
fn linear_column(features: &[f32], w: &[f32], b: f32, column: &mut [f32]) {
    let rows = column.len();
    column.fill(b);
    for (k, &wk) in w.iter().enumerate() {
        vector_math::axpy(wk, &features[k * rows..(k + 1) * rows], column);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_match_the_published_table_definition() {
        assert_eq!(rel_pos_features(0.0, 0.0), [0.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(rel_pos_features(3.0, -4.0), [3.0, -4.0, 5.0, -0.8, 0.6]);
        let f = rel_pos_features(-1.0, 1.0);
        assert_eq!(f[2], 2f32.sqrt());
        assert_eq!(f[3], 1.0 / 2f32.sqrt());
    }

    #[test]
    fn rows_enumerate_offsets_in_table_order() {
        let t = OffsetTable::new(3, 4, None);
        assert_eq!(t.len(), 7 * 5);
        for (i, (dx, dy)) in t.offsets().enumerate() {
            assert_eq!(t.row(dx, dy), i);
        }
        assert_eq!(t.row(-3, -2), 0);
        assert_eq!(t.row_between([1.0, 2.0], [1.0, 2.0]), t.row(0, 0));
    }

    #[test]
    fn apply_evaluates_the_layer_on_every_offset() {
        let t = OffsetTable::new(3, 2, None);
        let layer = Linear {
            weight: crate::io::F32Buffer::owned(vec![
                1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0,
            ]),
            bias: Some(crate::io::F32Buffer::owned(vec![0.5, -1.0])),
            in_dim: 5,
            out_dim: 2,
        };
        let table = t.apply(&layer).unwrap();
        let rows = t.len();
        for (r, (dx, dy)) in t.offsets().enumerate() {
            let d = ((dx * dx + dy * dy) as f32).sqrt();
            assert_eq!(table[r], dx as f32 + 0.5);
            assert_eq!(table[rows + r], 2.0 * d - 1.0);
        }
    }

    #[test]
    fn clamping_caps_offsets() {
        let t = OffsetTable::new(2000, 3, Some(511));
        assert_eq!(t.row(0, 900), t.row(0, 511));
        assert_eq!(t.row(0, -900), t.row(0, -511));
        assert_ne!(t.row(0, 510), t.row(0, 511));
        assert_eq!(t.len(), 5 * 1023);
        assert_eq!(t.feature(1)[t.row(1, 900)], 511.0);
    }
}
