//! PointConv merge of the selected centres' neighbourhoods (spec §7).
//!
//! For centre `i` and neighbour `j`: `w_ij = weight_net(f_ij) · p_j · mask_ij`
//! (4 inner channels, `weight_net` tabulated per offset), and
//! `u_i[ic·C + c] = Σ_j w_ij[ic] · x_j[c]`. The LayerNorm(4C) and
//! Linear(4C → C') that follow are ordinary ops.

use multiversion::multiversion;
use rayon::prelude::*;

use super::linear::Linear;
use super::neighbourhood::{Neighbourhood, all_below};
use super::norm::{EPS, LayerNorm};
use super::rel_pos::OffsetTable;
use super::vector_math;
use crate::error::{Error, Result, check_len};

pub mod backward;
pub mod gpu;

/// Inner channels of the PointConv weight net.
pub const INNER_CHANNELS: usize = 4;

/// Inputs of [`pointconv_merge`]; sizes are per image unless noted.
#[derive(Debug, Clone, Copy)]
pub struct MergeInputs<'a> {
    /// b×n×c token features.
    pub feat: &'a [f32],
    /// b×n importance `p` (sigmoid of `prob_net`).
    pub importance: &'a [f32],
    /// The stage's neighbourhoods over the n tokens.
    pub nbhd: &'a Neighbourhood,
    /// b×n' indices of the centres into the n tokens.
    pub centres: &'a [u32],
    /// b×n×m: the `weight_table` row (relative offset) of every neighbour
    /// slot, from [`super::rel_pos::neighbour_rows`].
    pub weight_rows: &'a [u32],
    /// 4×rows weight-net outputs (see [`weight_net_table`]).
    pub weight_table: &'a [f32],
    pub batch: usize,
    pub tokens: usize,
    pub channels: usize,
}

/// Computes the merged features `u` (b×n'×4c, inner-channel major).
///
/// # Errors
/// [`Error::Shape`] when the inputs disagree.
pub fn pointconv_merge(inp: &MergeInputs<'_>) -> Result<Vec<f32>> {
    let (b, n, c) = (inp.batch, inp.tokens, inp.channels);
    const OP: &str = "pointconv_merge";
    check_len(OP, "feat", &[b, n, c], inp.feat.len())?;
    check_len(OP, "importance", &[b, n], inp.importance.len())?;
    check_len(
        OP,
        "weight_rows",
        &[b, n, inp.nbhd.size],
        inp.weight_rows.len(),
    )?;
    inp.nbhd.check(OP, b, n)?;
    let table_rows = inp.weight_table.len() / INNER_CHANNELS;
    check_len(
        OP,
        "weight_table",
        &[INNER_CHANNELS, table_rows],
        inp.weight_table.len(),
    )?;
    if !all_below(inp.weight_rows, table_rows) {
        return Err(Error::InvalidArgument(format!(
            "{OP}: weight rows must be below the table's {table_rows}"
        )));
    }
    if !inp.centres.len().is_multiple_of(b.max(1)) || !all_below(inp.centres, n) {
        return Err(Error::InvalidArgument(format!(
            "{OP}: centres must be b×n' indices below n = {n}"
        )));
    }
    let kept = inp.centres.len() / b.max(1);
    let width = INNER_CHANNELS * c;
    let mut out = vec![0.0f32; b * kept * width];
    if out.is_empty() {
        return Ok(out);
    }
    const ROWS_PER_TASK: usize = 8;
    out.par_chunks_mut(width * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(task, u)| merge_rows(inp, task * ROWS_PER_TASK, kept, u));
    Ok(out)
}

/// The PointConv weight net `GELU(LN(Linear(5 → 4)(f)))` of every offset:
/// a 4×offsets table.
///
/// # Errors
/// [`Error::Shape`] when the layers are not 5 → 4 and LayerNorm(4).
pub fn weight_net_table(
    offsets: &OffsetTable,
    linear: &Linear,
    norm: &LayerNorm,
) -> Result<Vec<f32>> {
    if linear.out_dim != INNER_CHANNELS || norm.dim() != INNER_CHANNELS {
        return Err(Error::shape(
            "weight_net",
            "linear",
            [INNER_CHANNELS, 5],
            [linear.out_dim, linear.in_dim],
        ));
    }
    let mut table = offsets.apply(linear)?;
    let rows = offsets.len();
    let (w, b) = (&norm.weight[..], &norm.bias[..]);
    let (c0, rest) = table.split_at_mut(rows);
    let (c1, rest) = rest.split_at_mut(rows);
    let (c2, c3) = rest.split_at_mut(rows);
    normalise_gelu_columns([c0, c1, c2, c3], w, b);
    Ok(table)
}

#[multiversion(targets = "simd")]
fn merge_rows(inp: &MergeInputs<'_>, first_row: usize, kept: usize, out: &mut [f32]) {
    let width = INNER_CHANNELS * inp.channels;
    for (r, u) in out.chunks_exact_mut(width).enumerate() {
        let row = first_row + r;
        merge_one(inp, row / kept, inp.centres[row] as usize, u);
    }
}

/// Accumulates centre `i`'s merged features into `u` (zeroed by the caller).
#[inline(always)]
fn merge_one(inp: &MergeInputs<'_>, img: usize, i: usize, u: &mut [f32]) {
    let (n, c) = (inp.tokens, inp.channels);
    let table_rows = inp.weight_table.len() / INNER_CHANNELS;
    let feat = &inp.feat[img * n * c..(img + 1) * n * c];
    let p = &inp.importance[img * n..(img + 1) * n];
    let nbrs = inp.nbhd.of(img, i);
    let m = nbrs.len();
    let rows = &inp.weight_rows[(img * n + i) * m..(img * n + i + 1) * m];
    let mask = inp.nbhd.mask_of(img, i);
    for (slot, &j) in nbrs.iter().enumerate() {
        let j = j as usize;
        let valid = mask.is_none_or(|m| m[slot]);
        // As published: the mask multiplies the importance, which scales the weights.
        let scale = p[j] * if valid { 1.0 } else { 0.0 };
        let row = rows[slot] as usize;
        let x = &feat[j * c..(j + 1) * c];
        for (ic, u_ic) in u.chunks_exact_mut(c).enumerate() {
            let wij = inp.weight_table[ic * table_rows + row] * scale;
            vector_math::axpy(wij, x, u_ic);
        }
    }
}

/// LayerNorm across four columns, row by row, then GELU. Each pass is a
/// simple loop over rows, which the compiler vectorises.
#[multiversion(targets = "simd")]
fn normalise_gelu_columns(columns: [&mut [f32]; INNER_CHANNELS], w: &[f32], b: &[f32]) {
    let [c0, c1, c2, c3] = columns;
    let mean: Vec<f32> = (0..c0.len())
        .map(|r| (((c0[r] + c1[r]) + c2[r]) + c3[r]) / 4.0)
        .collect();
    let inv_std: Vec<f32> = (0..c0.len())
        .map(|r| {
            let m = mean[r];
            let (d0, d1, d2, d3) = (c0[r] - m, c1[r] - m, c2[r] - m, c3[r] - m);
            let var = (((d0 * d0 + d1 * d1) + d2 * d2) + d3 * d3) / 4.0;
            1.0 / (var + EPS).sqrt()
        })
        .collect();
    for (i, col) in [c0, c1, c2, c3].into_iter().enumerate() {
        for ((v, &m), &inv) in col.iter_mut().zip(&mean).zip(&inv_std) {
            *v = vector_math::gelu((*v - m) * inv * w[i] + b[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_scale_by_importance_and_mask() {
        // 3 tokens in a row, neighbourhood of token 0 = [0, 1, pad→0].
        let nbhd = Neighbourhood {
            images: 1,
            tokens: 3,
            size: 3,
            idx: vec![0, 1, 0, 0, 1, 0, 0, 1, 0],
            mask: Some(vec![
                true, true, false, true, true, false, true, true, false,
            ]),
        };
        let offsets = OffsetTable::new(1, 3, None);
        // weight net: inner channel 0 = dx, others 1 (4×offsets).
        let mut table = offsets.feature(0).to_vec();
        table.extend(std::iter::repeat_n(1.0, 3 * offsets.len()));
        let feat = [1.0, 10.0, 2.0, 20.0, 3.0, 30.0];
        let pos = [0.0, 0.0, 1.0, 0.0, 2.0, 0.0];
        let rows = crate::ops::rel_pos::neighbour_rows(&offsets, &pos, &nbhd, 1).unwrap();
        let inp = MergeInputs {
            feat: &feat,
            importance: &[0.5, 0.25, 1.0],
            nbhd: &nbhd,
            centres: &[0],
            weight_rows: &rows,
            weight_table: &table,
            batch: 1,
            tokens: 3,
            channels: 2,
        };
        let u = pointconv_merge(&inp).unwrap();
        // ic 0: 0·0.5·x0 + 1·0.25·x1 = (0.5, 5); ic 1..3: 0.5·x0 + 0.25·x1 = (1, 10).
        assert_eq!(u, [0.5, 5.0, 1.0, 10.0, 1.0, 10.0, 1.0, 10.0]);
        // No centres: nothing to merge.
        let none = MergeInputs {
            centres: &[],
            ..inp
        };
        assert!(pointconv_merge(&none).unwrap().is_empty());
        // A centre index out of range is an error, not a panic.
        let bad = MergeInputs {
            centres: &[3],
            ..inp
        };
        assert!(pointconv_merge(&bad).is_err());
    }
}
