//! The backward of [`super::pointconv_merge`] on the CPU.
//!
//! With `W` the weight net's output for the offset of (centre `i`, slot),
//! `g = mask · p_j`, `dU` the gradient of the merged features and
//! `T[o] = dU_i[o]·x_j` per (centre, slot) and inner channel `o`:
//! 1. by centre: a record per slot, `T` and the slot's weights `W` (a
//!    b×n'×m×8 scratch, twice the forward's weight rows);
//! 2. the gradient of the weight-net table, `dW[o][row] = Σ g·T[o]` over
//!    the pairs with that offset, in partial tables over fixed chunks of
//!    centres added in chunk order; then the net `GELU(LN(Linear(5 → 4)(f)))`
//!    differentiated once per table row, its parameters' gradients summed
//!    over fixed chunks of rows;
//! 3. by token: `dx_j = Σ W[o]·g·dU_i[o]` and `dp_j = Σ mask · W[o]·T[o]`
//!    over the centres whose neighbourhood holds `j`: a gather over the
//!    [`InverseNeighbourhood`] lists (only centres count), so no two
//!    threads write one row. `dp` is how `prob_net` learns: the selection
//!    itself used the detached score.
//!
//! Every sum runs in an order fixed by the inputs alone: the same bits for
//! any number of threads.

use rayon::prelude::*;

use super::{INNER_CHANNELS, MergeInputs};
use crate::error::{Error, Result, check_len};
use crate::ops::gather::{ScorePlan, gather_weighted_sum, score, transpose_columns};
use crate::ops::linear::Linear;
use crate::ops::neighbourhood::InverseNeighbourhood;
use crate::ops::norm::{EPS, LayerNorm};
use crate::ops::rel_pos::OffsetTable;
use crate::ops::vector_math::{dot, gelu_grad};
use multiversion::multiversion;

/// What the backward needs beyond the forward's inputs.
#[derive(Debug, Clone, Copy)]
pub struct MergeGradInputs<'a> {
    /// The forward's inputs (`weight_table` as the forward used it).
    pub forward: &'a MergeInputs<'a>,
    /// b×n'×4c: the gradient of the loss with respect to the merged features.
    pub grad_out: &'a [f32],
    /// The inverse of `forward.nbhd`.
    pub inverse: &'a InverseNeighbourhood,
    /// The offsets whose features built `forward.weight_table`.
    pub offsets: &'a OffsetTable,
    /// The weight net's Linear(5 → 4) and LayerNorm(4).
    pub weight_net: &'a Linear,
    pub weight_norm: &'a LayerNorm,
}

/// Gradients of the merge's inputs and weight-net parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeGrads {
    /// b×n×c: the token features.
    pub feat: Vec<f32>,
    /// b×n: the importance `p` of every token.
    pub importance: Vec<f32>,
    /// 4×5 and 4: `weight_net.0`.
    pub net_weight: Vec<f32>,
    pub net_bias: Vec<f32>,
    /// 4 and 4: `weight_net.1` (the LayerNorm).
    pub norm_weight: Vec<f32>,
    pub norm_bias: Vec<f32>,
}

/// Centres per task of pass 1 (any size gives the same bits).
const CENTRES_PER_TASK: usize = 16;

/// Centres per partial weight-net table (fixed: thread-independent).
const CENTRES_PER_TABLE: usize = 1024;

/// Table rows per partial sum of the weight-net parameters (fixed).
const TABLE_ROWS_PER_CHUNK: usize = 256;

/// Floats per (centre, slot) in the scratch of passes 1–3: `T[0..4]`, then
/// the pair's weights `W[0..4]` (both 0 for masked slots), so that pass 3
/// reads one record per pair.
const PAIR: usize = 2 * INNER_CHANNELS;

/// Weight-net parameters: 20 + 4 + 4 + 4.
const NET_PARAMS: usize = 32;

/// The gradients of [`super::pointconv_merge`] (see the module).
///
/// # Errors
/// [`Error::Shape`] when the inputs disagree; [`Error::InvalidArgument`]
/// for repeated centres or inverse lists that are not the forward's.
pub fn pointconv_merge_backward(g: &MergeGradInputs<'_>) -> Result<MergeGrads> {
    const OP: &str = "pointconv_merge_backward";
    let inp = g.forward;
    let (b, n, c) = (inp.batch, inp.tokens, inp.channels);
    let m = inp.nbhd.size;
    check_len(OP, "feat", &[b, n, c], inp.feat.len())?;
    check_len(OP, "importance", &[b, n], inp.importance.len())?;
    check_len(OP, "weight_rows", &[b, n, m], inp.weight_rows.len())?;
    inp.nbhd.check(OP, b, n)?;
    let rows = g.offsets.len();
    check_len(
        OP,
        "weight_table",
        &[INNER_CHANNELS, rows],
        inp.weight_table.len(),
    )?;
    if inp.weight_rows.iter().any(|&r| r as usize >= rows) {
        return Err(Error::InvalidArgument(format!(
            "{OP}: weight rows must be below the table's {rows}"
        )));
    }
    let kept = inp.centres.len() / b.max(1);
    let width = INNER_CHANNELS * c;
    check_len(OP, "grad_out", &[b, kept, width], g.grad_out.len())?;
    if g.weight_net.in_dim != 5
        || g.weight_net.out_dim != INNER_CHANNELS
        || g.weight_norm.dim() != INNER_CHANNELS
    {
        return Err(Error::shape(
            OP,
            "weight_net",
            [INNER_CHANNELS, 5],
            [g.weight_net.out_dim, g.weight_net.in_dim],
        ));
    }
    g.inverse.check_inverts(OP, inp.nbhd)?;
    if b * kept * INNER_CHANNELS > u32::MAX as usize {
        // Pass 3 lists the rows of `grad_out` as u32.
        return Err(Error::InvalidArgument(format!(
            "{OP}: {b}×{kept}×{INNER_CHANNELS} gradient rows exceed u32 indices"
        )));
    }
    // Each token's output row, if it is a centre.
    let mut out_row_of = vec![u32::MAX; b * n];
    for (e, &i) in inp.centres.iter().enumerate() {
        let (img, i) = (e / kept.max(1), i as usize);
        if i >= n || out_row_of[img * n + i] != u32::MAX {
            return Err(Error::InvalidArgument(format!(
                "{OP}: centres must be distinct indices below n = {n}"
            )));
        }
        out_row_of[img * n + i] = e as u32;
    }
    // The centres in token order (the output is in importance order): the
    // per-pair scratch below is laid out in this order, so that pass 3,
    // which walks tokens, reads it nearly in sequence.
    let centres = Centres {
        out_row: out_row_of
            .iter()
            .copied()
            .filter(|&e| e != u32::MAX)
            .collect(),
        rank: {
            let mut rank = out_row_of;
            for (next, r) in rank.iter_mut().filter(|r| **r != u32::MAX).enumerate() {
                *r = next as u32;
            }
            rank
        },
    };

    let mut grads = MergeGrads {
        feat: vec![0.0; b * n * c],
        importance: vec![0.0; b * n],
        net_weight: vec![0.0; INNER_CHANNELS * 5],
        net_bias: vec![0.0; INNER_CHANNELS],
        norm_weight: vec![0.0; INNER_CHANNELS],
        norm_bias: vec![0.0; INNER_CHANNELS],
    };
    if b * kept * m == 0 {
        return Ok(grads); // no pairs: nothing was merged
    }

    // Pass 1, by centre (in token order): the records [T | W] of every slot.
    let feat_t = transpose_columns(inp.feat, b, n, c, &[0], c);
    let mut dots = vec![0.0f32; b * kept * m * PAIR];
    dots.par_chunks_mut(m * PAIR * CENTRES_PER_TASK)
        .enumerate()
        .for_each_init(DotScratch::default, |scratch, (task, dots)| {
            let first = task * CENTRES_PER_TASK;
            centre_dots(g, &feat_t, &centres.out_row[first..], kept, dots, scratch);
        });

    // Pass 2: the table's gradient, then the weight net's, row by row.
    let partial_tables: Vec<Vec<f32>> = (0..b * kept)
        .step_by(CENTRES_PER_TABLE)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|first| {
            let end = (first + CENTRES_PER_TABLE).min(b * kept);
            table_gradient(g, &dots, &centres.out_row[first..end], first, kept, rows)
        })
        .collect();
    let mut table_grad = vec![0.0f32; INNER_CHANNELS * rows];
    for part in &partial_tables {
        for (a, &v) in table_grad.iter_mut().zip(part) {
            *a += v;
        }
    }
    let partials: Vec<[f32; NET_PARAMS]> = (0..rows)
        .step_by(TABLE_ROWS_PER_CHUNK)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|first| {
            let mut part = [0.0f32; NET_PARAMS];
            for r in first..(first + TABLE_ROWS_PER_CHUNK).min(rows) {
                let dw = std::array::from_fn(|o| table_grad[o * rows + r]);
                weight_net_backward(g, r, dw, &mut part);
            }
            part
        })
        .collect();
    for part in &partials {
        let (w, rest) = part.split_at(20);
        let (nb, rest) = rest.split_at(4);
        let (lw, lb) = rest.split_at(4);
        for (dst, src) in [
            (&mut grads.net_weight, w),
            (&mut grads.net_bias, nb),
            (&mut grads.norm_weight, lw),
            (&mut grads.norm_bias, lb),
        ] {
            for (a, &v) in dst.iter_mut().zip(src) {
                *a += v;
            }
        }
    }

    // Pass 3, by token: its feature and importance gradients, gathered
    // from the centres that hold it.
    let dots = &dots;
    grads
        .feat
        .par_chunks_mut(c)
        .zip(grads.importance.par_iter_mut())
        .enumerate()
        .for_each_init(TokenScratch::default, |scratch, (row, (dx, dp))| {
            *dp = token_gather(g, &centres, dots, (row / n, row % n), dx, scratch);
        });
    Ok(grads)
}

/// The centres of every image, in token order.
struct Centres {
    /// By rank: the centre's output row (into the b×n' outputs).
    out_row: Vec<u32>,
    /// b×n: every token's rank among the centres, `u32::MAX` if it is none.
    rank: Vec<u32>,
}

#[derive(Default)]
struct DotScratch {
    plan: ScorePlan,
    /// `[o][slot]`: one centre's T.
    dots: Vec<f32>,
}

/// Pass 1 for the centres whose output rows start `out_rows` (one task,
/// in token order): `T[o] = dU_e[o]·x_j` and `W[o]` for every slot of each
/// centre (both 0 for masked slots, which weigh nothing), `T` scored as the
/// attention scores its keys, from features stored dimension-major
/// (`feat_t`, c×n per image).
#[multiversion(targets = "simd")]
fn centre_dots(
    g: &MergeGradInputs<'_>,
    feat_t: &[f32],
    out_rows: &[u32],
    kept: usize,
    dots: &mut [f32],
    scratch: &mut DotScratch,
) {
    let inp = g.forward;
    let (n, c) = (inp.tokens, inp.channels);
    let m = inp.nbhd.size;
    scratch.dots.resize(INNER_CHANNELS * m, 0.0);
    for (&e, dots) in out_rows.iter().zip(dots.chunks_exact_mut(m * PAIR)) {
        let e = e as usize;
        let img = e / kept;
        let i = inp.centres[e] as usize;
        let nbrs = inp.nbhd.of(img, i);
        let du = &g.grad_out[e * INNER_CHANNELS * c..(e + 1) * INNER_CHANNELS * c];
        let feat_t = &feat_t[img * c * n..(img + 1) * c * n];
        scratch.plan.build(nbrs);
        for (du, t) in du.chunks_exact(c).zip(scratch.dots.chunks_exact_mut(m)) {
            score(&scratch.plan, du, feat_t, n, nbrs, t);
        }
        let mask = inp.nbhd.mask_of(img, i);
        let weight_rows = &inp.weight_rows[(img * n + i) * m..(img * n + i + 1) * m];
        let table_rows = inp.weight_table.len() / INNER_CHANNELS;
        for (slot, record) in dots.chunks_exact_mut(PAIR).enumerate() {
            let valid = mask.is_none_or(|mask| mask[slot]);
            let (t, w) = record.split_at_mut(INNER_CHANNELS);
            let r = weight_rows[slot] as usize;
            for o in 0..INNER_CHANNELS {
                (t[o], w[o]) = if valid {
                    (
                        scratch.dots[o * m + slot],
                        inp.weight_table[o * table_rows + r],
                    )
                } else {
                    (0.0, 0.0)
                };
            }
        }
    }
}

/// The weight-net table's gradient from the centres of ranks `first..`
/// (output rows `out_rows`; one partial table, 4×rows): `Σ mask · p_j ·
/// T[o]` per table row.
fn table_gradient(
    g: &MergeGradInputs<'_>,
    dots: &[f32],
    out_rows: &[u32],
    first: usize,
    kept: usize,
    rows: usize,
) -> Vec<f32> {
    let inp = g.forward;
    let n = inp.tokens;
    let m = inp.nbhd.size;
    let mut table = vec![0.0f32; INNER_CHANNELS * rows];
    for (rank, &e) in (first..).zip(out_rows) {
        let e = e as usize;
        let img = e / kept;
        let i = inp.centres[e] as usize;
        let weight_rows = &inp.weight_rows[(img * n + i) * m..(img * n + i + 1) * m];
        let dots = &dots[rank * m * PAIR..(rank + 1) * m * PAIR];
        // Masked slots have T = 0: nothing to skip.
        for ((&j, &r), t) in inp
            .nbhd
            .of(img, i)
            .iter()
            .zip(weight_rows)
            .zip(dots.chunks_exact(PAIR))
        {
            let p = inp.importance[img * n + j as usize];
            for (o, &t) in t[..INNER_CHANNELS].iter().enumerate() {
                table[o * rows + r as usize] += p * t;
            }
        }
    }
    table
}

/// The weight net's backward for table row `r`, whose outputs' gradient is
/// `dw`: adds to `part` (`[W 4×5 | b 4 | γ 4 | β 4]`).
fn weight_net_backward(
    g: &MergeGradInputs<'_>,
    r: usize,
    dw: [f32; 4],
    part: &mut [f32; NET_PARAMS],
) {
    if dw == [0.0; 4] {
        return; // no pair uses this offset (or none with any gradient)
    }
    let (lin, norm) = (g.weight_net, g.weight_norm);
    let f: [f32; 5] = std::array::from_fn(|k| g.offsets.feature(k)[r]);
    // Forward of the weight net for this offset.
    let z: [f32; 4] = std::array::from_fn(|o| {
        let w = &lin.weight[o * 5..(o + 1) * 5];
        lin.bias.as_ref().map_or(0.0, |b| b[o]) + dot(w, &f)
    });
    let mean = z.iter().sum::<f32>() / 4.0;
    let var = z.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 4.0;
    let inv_std = 1.0 / (var + EPS).sqrt();
    let zhat: [f32; 4] = std::array::from_fn(|o| (z[o] - mean) * inv_std);
    // Back through GELU and LN.
    let dy: [f32; 4] = std::array::from_fn(|o| {
        let y = zhat[o] * norm.weight[o] + norm.bias[o];
        dw[o] * gelu_grad(y)
    });
    let dzhat: [f32; 4] = std::array::from_fn(|o| dy[o] * norm.weight[o]);
    let mean_dzhat = dzhat.iter().sum::<f32>() / 4.0;
    let mean_dzhat_zhat = dzhat.iter().zip(&zhat).map(|(a, b)| a * b).sum::<f32>() / 4.0;
    for o in 0..4 {
        let dz = inv_std * (dzhat[o] - mean_dzhat - zhat[o] * mean_dzhat_zhat);
        for k in 0..5 {
            part[o * 5 + k] += dz * f[k];
        }
        part[20 + o] += dz;
        part[24 + o] += dy[o] * zhat[o];
        part[28 + o] += dy[o];
    }
}

#[derive(Default)]
struct TokenScratch {
    /// Rows of `grad_out` (c-wide), their weights `W` (then `W·p`, those
    /// of `dx`) and `T`.
    rows: Vec<u32>,
    weights: Vec<f32>,
    dots: Vec<f32>,
}

/// Pass 3 for token `j` of image `img`: `dx_j` into `dx`; returns `dp_j`.
#[multiversion(targets = "simd")]
fn token_gather(
    g: &MergeGradInputs<'_>,
    centres: &Centres,
    dots: &[f32],
    (img, j): (usize, usize),
    dx: &mut [f32],
    scratch: &mut TokenScratch,
) -> f32 {
    let inp = g.forward;
    let (n, c) = (inp.tokens, inp.channels);
    let m = inp.nbhd.size;
    let p = inp.importance[img * n + j];
    scratch.rows.clear();
    scratch.weights.clear();
    scratch.dots.clear();
    for &(i, slot) in g.inverse.of(img, j) {
        let (i, slot) = (i as usize, slot as usize);
        let rank = centres.rank[img * n + i] as usize;
        if rank == u32::MAX as usize {
            continue; // not a centre
        }
        // Masked slots have W = T = 0: they add nothing.
        let e = centres.out_row[rank] as usize;
        let (t, w) = dots[(rank * m + slot) * PAIR..][..PAIR].split_at(INNER_CHANNELS);
        for o in 0..INNER_CHANNELS {
            scratch.rows.push((e * INNER_CHANNELS + o) as u32);
            scratch.weights.push(w[o]);
            scratch.dots.push(t[o]);
        }
    }
    // dp = Σ W·T (one vectorised dot, not a chain of dependent adds), then
    // the weights of dx are W·p.
    let dp = dot(&scratch.weights, &scratch.dots);
    for w in &mut scratch.weights {
        *w *= p;
    }
    gather_weighted_sum(&scratch.weights, &scratch.rows, g.grad_out, c, dx);
    dp
}
