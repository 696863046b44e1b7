//! The backward of [`super::pointconv_merge`] on the CPU.
//!
//! With `W` the weight net's output for the offset of (centre `i`, slot),
//! `g = mask · p_j` and `dU` the gradient of the merged features:
//! - `dx_j = Σ W[ic] · g · dU_i[ic]` and `dp_j = Σ mask · W[ic] · (dU_i[ic]·x_j)`
//!   over the centres whose neighbourhood holds `j`: a gather over the
//!   [`InverseNeighbourhood`] lists (only centres count), so no two threads
//!   write one row. `dp` is how `prob_net` learns: the selection itself used
//!   the detached score.
//! - The weight net `GELU(LN(Linear(5 → 4)(f)))` is differentiated per
//!   (centre, neighbour) from `dW[ic] = g · (dU_i[ic]·x_j)`, and its
//!   parameters' gradients summed in per-task partial sums over fixed
//!   chunks of centres, added in chunk order.
//!
//! Every sum runs in an order fixed by the inputs alone: the same bits for
//! any number of threads.

use rayon::prelude::*;

use super::{INNER_CHANNELS, MergeInputs};
use crate::error::{Error, Result, check_len};
use crate::ops::linear::Linear;
use crate::ops::neighbourhood::InverseNeighbourhood;
use crate::ops::norm::{EPS, LayerNorm};
use crate::ops::rel_pos::OffsetTable;
use crate::ops::vector_math::{axpy, dot, gelu_grad};

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

/// Centres per chunk of the parameter partial sums (fixed: thread-independent).
const CENTRES_PER_CHUNK: usize = 16;

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
    // Each token's output row, if it is a centre.
    let mut centre_row = vec![u32::MAX; b * n];
    for (e, &i) in inp.centres.iter().enumerate() {
        let (img, i) = (e / kept.max(1), i as usize);
        if i >= n || centre_row[img * n + i] != u32::MAX {
            return Err(Error::InvalidArgument(format!(
                "{OP}: centres must be distinct indices below n = {n}"
            )));
        }
        centre_row[img * n + i] = (e % kept.max(1)) as u32;
    }

    let mut grads = MergeGrads {
        feat: vec![0.0; b * n * c],
        importance: vec![0.0; b * n],
        net_weight: vec![0.0; INNER_CHANNELS * 5],
        net_bias: vec![0.0; INNER_CHANNELS],
        norm_weight: vec![0.0; INNER_CHANNELS],
        norm_bias: vec![0.0; INNER_CHANNELS],
    };
    if b * kept == 0 {
        return Ok(grads);
    }

    // Pass 1, by centre: the weight net's parameter gradients.
    let centres: Vec<usize> = (0..b * kept).collect();
    let partials: Vec<[f32; NET_PARAMS]> = centres
        .par_chunks(CENTRES_PER_CHUNK)
        .map(|chunk| {
            let mut part = [0.0f32; NET_PARAMS];
            for &e in chunk {
                weight_net_backward(g, e / kept, e, &mut part);
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

    // Pass 2, by token: its feature and importance gradients, gathered
    // from the centres that hold it.
    grads
        .feat
        .par_chunks_mut(c)
        .zip(grads.importance.par_iter_mut())
        .enumerate()
        .for_each(|(row, (dx, dp))| {
            *dp = token_backward(g, &centre_row, row / n, row % n, kept, dx);
        });
    Ok(grads)
}

/// Pass 1 for output row `e` (a centre of image `img`): adds its share of
/// the weight net's parameter gradients to `part` (`[W 4×5 | b 4 | γ 4 | β 4]`).
fn weight_net_backward(
    g: &MergeGradInputs<'_>,
    img: usize,
    e: usize,
    part: &mut [f32; NET_PARAMS],
) {
    let inp = g.forward;
    let (n, c) = (inp.tokens, inp.channels);
    let m = inp.nbhd.size;
    let i = inp.centres[e] as usize;
    let row = img * n + i;
    let nbrs = inp.nbhd.of(img, i);
    let mask = inp.nbhd.mask_of(img, i);
    let rows = &inp.weight_rows[row * m..(row + 1) * m];
    let du = &g.grad_out[e * INNER_CHANNELS * c..(e + 1) * INNER_CHANNELS * c];
    let (lin, norm) = (g.weight_net, g.weight_norm);
    for (slot, &j) in nbrs.iter().enumerate() {
        let j = j as usize;
        if mask.is_some_and(|mask| !mask[slot]) {
            continue; // weight 0 whatever the net says
        }
        let scale = inp.importance[img * n + j];
        let x = &inp.feat[(img * n + j) * c..(img * n + j + 1) * c];
        let r = rows[slot] as usize;
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
        // dW (the net's output) from the merge, then back through GELU and LN.
        let dy: [f32; 4] = std::array::from_fn(|o| {
            let y = zhat[o] * norm.weight[o] + norm.bias[o];
            scale * dot(&du[o * c..(o + 1) * c], x) * gelu_grad(y)
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
}

/// Pass 2 for token `j` of image `img`: `dx_j` into `dx`; returns `dp_j`.
fn token_backward(
    g: &MergeGradInputs<'_>,
    centre_row: &[u32],
    img: usize,
    j: usize,
    kept: usize,
    dx: &mut [f32],
) -> f32 {
    let inp = g.forward;
    let (n, c) = (inp.tokens, inp.channels);
    let m = inp.nbhd.size;
    let table_rows = inp.weight_table.len() / INNER_CHANNELS;
    let x = &inp.feat[(img * n + j) * c..(img * n + j + 1) * c];
    let p = inp.importance[img * n + j];
    let mut dp = 0.0f32;
    for &(i, slot) in g.inverse.of(img, j) {
        let (i, slot) = (i as usize, slot as usize);
        let out_row = centre_row[img * n + i];
        if out_row == u32::MAX || inp.nbhd.mask_of(img, i).is_some_and(|mask| !mask[slot]) {
            continue;
        }
        let e = img * kept + out_row as usize;
        let du = &g.grad_out[e * INNER_CHANNELS * c..(e + 1) * INNER_CHANNELS * c];
        let r = inp.weight_rows[(img * n + i) * m + slot] as usize;
        for (ic, du_ic) in du.chunks_exact(c).enumerate() {
            let w = inp.weight_table[ic * table_rows + r];
            axpy(w * p, du_ic, dx);
            dp += w * dot(du_ic, x);
        }
    }
    dp
}
