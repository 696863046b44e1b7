//! The backward of [`super::pointconv_merge`] on the CPU.
//!
//! With `W` the weight net's output for the offset of (centre `i`, slot),
//! `g = mask · p_j`, `dU` the gradient of the merged features and
//! `T[o] = dU_i[o]·x_j` per (centre, slot) and inner channel `o`:
//! 1. by centre, in fixed chunks of centres: `T` of every slot, folded at
//!    once into the chunk's partial gradient of the weight-net table,
//!    `dW[o][row] += g·T[o]` (no per-pair scratch is kept);
//! 2. the partial tables added in chunk order, row by row, and the net
//!    `GELU(LN(Linear(5 → 4)(f)))` differentiated once per table row, its
//!    parameters' gradients summed over fixed chunks of rows;
//! 3. by token: `G_j = Σ mask · W[o]·dU_i[o]` over the centres whose
//!    neighbourhood holds `j`, a gather over the [`InverseNeighbourhood`]
//!    lists (only centres count), so no two threads write one row; then
//!    `dx_j = p_j · G_j` and `dp_j = x_j · G_j` (`= Σ mask · W[o]·T[o]`).
//!    `dp` is how `prob_net` learns: the selection itself used the
//!    detached score.
//!
//! Every sum runs in an order fixed by the inputs alone: the same bits for
//! any number of threads.

use rayon::prelude::*;

use super::{INNER_CHANNELS, MergeInputs};
use crate::error::{Error, Result, check_len};
use crate::ops::gather::{
    SLOT_BLOCK, ScorePlan, Tiled, gather_weighted_sums, score4, transpose_rows,
};
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

/// Centres per partial weight-net table (fixed: thread-independent). Each
/// chunk is one task of pass 1 and costs a rows×4 table.
const CENTRES_PER_TABLE: usize = 256;

/// Table rows per partial sum of the weight-net parameters (fixed).
const TABLE_ROWS_PER_CHUNK: usize = 256;

/// Tokens per task of pass 3 (fixed): a cluster of the published size.
const TOKEN_BLOCK: usize = 8;

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
    // Each image's centres in token order (the output is in importance
    // order), in fixed chunks: one task of pass 1 each, whose neighbours
    // span a short range of tokens.
    let chunks: Vec<Vec<u32>> = out_row_of
        .chunks(n.max(1))
        .flat_map(|image| {
            let rows: Vec<u32> = image.iter().copied().filter(|&e| e != u32::MAX).collect();
            let chunks: Vec<Vec<u32>> = rows
                .chunks(CENTRES_PER_TABLE)
                .map(<[u32]>::to_vec)
                .collect();
            chunks
        })
        .collect();

    let mut grads = MergeGrads {
        feat: vec![0.0; b * n * c],
        importance: vec![0.0; b * n],
        net_weight: vec![0.0; INNER_CHANNELS * 5],
        net_bias: vec![0.0; INNER_CHANNELS],
        norm_weight: vec![0.0; INNER_CHANNELS],
        norm_bias: vec![0.0; INNER_CHANNELS],
    };
    if b * kept * m * c == 0 {
        return Ok(grads); // no pairs or no channels: every gradient is 0
    }

    // Pass 1, by centre: `T` of every pair, folded at once into one partial
    // table gradient per chunk of centres.
    let partial_tables: Vec<PartialTable> = chunks
        .par_iter()
        .map_init(DotScratch::default, |scratch, out_rows| {
            table_gradient(g, out_rows, kept, scratch)
        })
        .collect();

    // Pass 2: the partial tables added in chunk order, then the weight net
    // differentiated at each row.
    let mut table_grad = vec![0.0f32; rows * INNER_CHANNELS];
    for part in &partial_tables {
        let range = part.first_row * INNER_CHANNELS..;
        for (a, &v) in table_grad[range].iter_mut().zip(&part.values) {
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
                let dw = table_grad[r * INNER_CHANNELS..][..INNER_CHANNELS].try_into();
                weight_net_backward(g, r, dw.unwrap(), &mut part);
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

    // Pass 3, by token, in fixed blocks within each image: its feature and
    // importance gradients, gathered from the centres that hold it.
    grads
        .feat
        .par_chunks_mut(n * c)
        .zip(grads.importance.par_chunks_mut(n))
        .enumerate()
        .for_each(|(img, (dx, dp))| {
            dx.par_chunks_mut(TOKEN_BLOCK * c)
                .zip(dp.par_chunks_mut(TOKEN_BLOCK))
                .enumerate()
                .for_each_init(TokenScratch::default, |scratch, (block, (dx, dp))| {
                    let first = block * TOKEN_BLOCK;
                    token_block_gather(g, &out_row_of, (img, first), dx, dp, scratch);
                });
        });
    Ok(grads)
}

#[derive(Default)]
struct DotScratch {
    plan: ScorePlan,
    /// The chunk's range of token features, [`Tiled`].
    feat_t: Vec<f32>,
    /// One centre's neighbours, relative to that range.
    nbrs: Vec<u32>,
    /// `[o][slot]`: one centre's T.
    dots: Vec<f32>,
}

/// One chunk's share of the weight-net table's gradient: rows
/// `first_row..` (row-major, 4 per row), the span its pairs touch.
struct PartialTable {
    first_row: usize,
    values: Vec<f32>,
}

/// Pass 1 for the centres whose output rows are `out_rows` (one chunk of
/// one image, in token order): `T[o] = dU_e[o]·x_j` for every slot of each
/// centre, scored as the attention scores its keys, four inner channels in
/// one sweep, from the features of the tokens the chunk's neighbourhoods
/// span, copied [`Tiled`]; then `Σ mask · p_j · T[o]` per weight-net
/// table row, into the chunk's partial table.
#[multiversion(targets = "simd")]
fn table_gradient(
    g: &MergeGradInputs<'_>,
    out_rows: &[u32],
    kept: usize,
    scratch: &mut DotScratch,
) -> PartialTable {
    let inp = g.forward;
    let (n, c) = (inp.tokens, inp.channels);
    let m = inp.nbhd.size;
    let img = out_rows[0] as usize / kept;
    let centre = |e: u32| inp.centres[e as usize] as usize;
    let weight_rows = |i: usize| &inp.weight_rows[(img * n + i) * m..(img * n + i + 1) * m];
    // The tokens the neighbourhoods span, and the rows their (unmasked)
    // pairs touch: neighbours are near, so short ranges.
    let (mut first, mut end) = (usize::MAX, 0);
    let (mut lo, mut hi) = (usize::MAX, 0);
    for &e in out_rows {
        let i = centre(e);
        let mask = inp.nbhd.mask_of(img, i);
        for (slot, (&j, &r)) in inp.nbhd.of(img, i).iter().zip(weight_rows(i)).enumerate() {
            (first, end) = (first.min(j as usize), end.max(j as usize + 1));
            if mask.is_none_or(|mask| mask[slot]) {
                (lo, hi) = (lo.min(r as usize), hi.max(r as usize + 1));
            }
        }
    }
    let mut table = PartialTable {
        first_row: lo.min(hi),
        values: vec![0.0f32; hi.saturating_sub(lo) * INNER_CHANNELS],
    };
    // From a multiple of the tile, so that the clusters' members fill tiles.
    let first = first / SLOT_BLOCK * SLOT_BLOCK;
    let span = end - first;
    scratch.feat_t.resize(Tiled::len(span, c), 0.0);
    transpose_rows(
        &inp.feat[img * n * c..],
        c,
        first..end,
        c,
        &mut scratch.feat_t,
    );
    scratch.dots.resize(INNER_CHANNELS * m, 0.0);
    for &e in out_rows {
        let i = centre(e);
        scratch.nbrs.clear();
        let nbrs = inp.nbhd.of(img, i);
        scratch.nbrs.extend(nbrs.iter().map(|&j| j - first as u32));
        scratch.plan.build(&scratch.nbrs);
        let du = &g.grad_out[e as usize * INNER_CHANNELS * c..][..INNER_CHANNELS * c];
        let du: [&[f32]; INNER_CHANNELS] = std::array::from_fn(|o| &du[o * c..(o + 1) * c]);
        let (feat_t, dots) = (Tiled::new(&scratch.feat_t, c), &mut scratch.dots);
        score4(&scratch.plan, du, feat_t, &scratch.nbrs, dots);
        let mask = inp.nbhd.mask_of(img, i);
        for (slot, (&j, &r)) in nbrs.iter().zip(weight_rows(i)).enumerate() {
            if mask.is_some_and(|mask| !mask[slot]) {
                continue; // a masked pair weighs nothing
            }
            let p = inp.importance[img * n + j as usize];
            let at = (r as usize - table.first_row) * INNER_CHANNELS;
            let entry = &mut table.values[at..at + INNER_CHANNELS];
            for (o, a) in entry.iter_mut().enumerate() {
                *a += p * scratch.dots[o * m + slot];
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
    /// Rows of `grad_out` (c-wide), and their weights `W` for each token of
    /// a run (`[token][k]`).
    rows: Vec<u32>,
    weights: Vec<f32>,
}

/// Pass 3 for the tokens of image `img` from `first` (one block; `dx` and
/// `dp` are theirs). With `G = Σ mask · W[o] · dU_i[o]` over the centres
/// `i` holding token `j`: `dx_j = p_j · G` and `dp_j = x_j · G` (`=
/// Σ mask · W[o] · T[o]`: the pairs' `T` is not needed again). The tokens
/// of a cluster are held by the same centres, in other slots: such runs
/// share one gather of the `grad_out` rows, in pieces of 4, 2 and 1
/// tokens (4 × [`LANES`](crate::ops::vector_math::LANES) sums fill half of
/// AVX2's sixteen registers; pieces of 8 spill, and measured ~7% slower),
/// each token's sums in the same order whatever its piece.
#[multiversion(targets = "simd")]
fn token_block_gather(
    g: &MergeGradInputs<'_>,
    out_row_of: &[u32],
    (img, first): (usize, usize),
    dx: &mut [f32],
    dp: &mut [f32],
    scratch: &mut TokenScratch,
) {
    let c = g.forward.channels;
    let same_holders = |a: &[(u32, u32)], b: &[(u32, u32)]| {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.0 == y.0)
    };
    let mut t = 0;
    while t < dp.len() {
        let holders = g.inverse.of(img, first + t);
        let mut run = 1;
        while t + run < dp.len() && same_holders(holders, g.inverse.of(img, first + t + run)) {
            run += 1;
        }
        let run_end = t + run;
        while t < run_end {
            let piece = match run_end - t {
                4.. => 4,
                2.. => 2,
                _ => 1,
            };
            let (dx, dp) = (&mut dx[t * c..(t + piece) * c], &mut dp[t..t + piece]);
            let at = (img, first + t);
            match piece {
                4 => gather_piece::<4>(g, out_row_of, at, dx, dp, scratch),
                2 => gather_piece::<2>(g, out_row_of, at, dx, dp, scratch),
                _ => gather_piece::<1>(g, out_row_of, at, dx, dp, scratch),
            }
            t += piece;
        }
    }
}

/// [`token_block_gather`] for `R` tokens from `j` with the same holders.
#[inline(always)]
fn gather_piece<const R: usize>(
    g: &MergeGradInputs<'_>,
    out_row_of: &[u32],
    (img, j): (usize, usize),
    dx: &mut [f32],
    dp: &mut [f32],
    scratch: &mut TokenScratch,
) {
    let inp = g.forward;
    let (n, c) = (inp.tokens, inp.channels);
    let m = inp.nbhd.size;
    let table_rows = inp.weight_table.len() / INNER_CHANNELS;
    let lists: [&[(u32, u32)]; R] = std::array::from_fn(|t| g.inverse.of(img, j + t));
    // The rows of `grad_out` the run gathers, and for each token their
    // weights (`[token][k]`).
    scratch.rows.clear();
    for &(i, _) in lists[0] {
        let e = out_row_of[img * n + i as usize];
        if e != u32::MAX {
            scratch
                .rows
                .extend((0..INNER_CHANNELS as u32).map(|o| e * INNER_CHANNELS as u32 + o));
        }
    }
    scratch.weights.clear();
    for list in &lists {
        let centres = list
            .iter()
            .filter(|&&(i, _)| out_row_of[img * n + i as usize] != u32::MAX);
        for &(i, slot) in centres {
            let (i, slot) = (i as usize, slot as usize);
            // A masked pair weighs 0 (kept, so that a run shares its rows).
            let valid = inp.nbhd.mask_of(img, i).is_none_or(|mask| mask[slot]);
            let r = inp.weight_rows[(img * n + i) * m + slot] as usize;
            for o in 0..INNER_CHANNELS {
                let w = inp.weight_table[o * table_rows + r];
                scratch.weights.push(if valid { w } else { 0.0 });
            }
        }
    }
    let mut rows_of = dx.chunks_exact_mut(c);
    let mut outs: [&mut [f32]; R] = std::array::from_fn(|_| rows_of.next().unwrap());
    gather_weighted_sums::<R>(&scratch.weights, &scratch.rows, g.grad_out, c, &mut outs);
    for (t, (grad, dp)) in outs.iter_mut().zip(dp).enumerate() {
        let row = img * n + j + t;
        *dp = dot(&inp.feat[row * c..(row + 1) * c], grad);
        let p = inp.importance[row];
        for v in grad.iter_mut() {
            *v *= p;
        }
    }
}
