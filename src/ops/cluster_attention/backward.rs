//! The backward of [`super::cluster_attention`] on the CPU.
//!
//! The softmax is recomputed from the log-sum-exp the forward saves
//! ([`super::cluster_attention_with_lse`]), never stored: with `p = e^(a −
//! lse)`, `D = dO·O` (the blank token's share included, since `O` holds it),
//! `da = p·(dO·v − D)`:
//! - `dq = scale · (Σ_j da_j k_j + da_blank · blank_k)`, per query;
//! - `dk_j = Σ da · scale·q`, `dv_j = Σ p · dO` over the queries whose
//!   neighbourhood holds `j`: a gather over [`InverseNeighbourhood`] lists,
//!   so no two threads write one row;
//! - the position-bias weights and bias, `blank_k` and `blank_v` (a few
//!   values shared by every query) in per-task partial sums over fixed
//!   chunks of queries, added in chunk order.
//!
//! Every sum runs in an order fixed by the inputs alone, so gradients are
//! the same bits for any number of threads.

use rayon::prelude::*;

use super::{AttentionInputs, MASKED_LOGIT, check_inputs};
use crate::error::{Error, Result, check_len};
use crate::ops::neighbourhood::InverseNeighbourhood;
use crate::ops::rel_pos::OffsetTable;
use crate::ops::vector_math::{axpy, dot, exp};

/// What the backward needs beyond the forward's inputs.
#[derive(Debug, Clone, Copy)]
pub struct AttentionGradInputs<'a> {
    /// The forward's inputs (`bias_table` as the forward used it).
    pub forward: &'a AttentionInputs<'a>,
    /// b×n×c: the forward's output.
    pub out: &'a [f32],
    /// b×n×h: the log-sum-exp the forward returned.
    pub lse: &'a [f32],
    /// b×n×c: the gradient of the loss with respect to the output.
    pub grad_out: &'a [f32],
    /// The inverse of `forward.nbhd`.
    pub inverse: &'a InverseNeighbourhood,
    /// The offsets whose features built `forward.bias_table` (for the
    /// gradient of the position-bias layer, `pos_embed`).
    pub offsets: &'a OffsetTable,
}

/// Gradients of the attention's inputs and parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionGrads {
    /// b×n×c, with respect to the unscaled `q`.
    pub q: Vec<f32>,
    /// b×n×2c, keys and values in the forward's layout.
    pub kv: Vec<f32>,
    /// heads×5: `pos_embed.weight`.
    pub pos_weight: Vec<f32>,
    /// heads: `pos_embed.bias`.
    pub pos_bias: Vec<f32>,
    /// c: `blank_k`.
    pub blank_k: Vec<f32>,
    /// c: `blank_v`.
    pub blank_v: Vec<f32>,
}

/// Queries per chunk of the parameter partial sums: fixed, so the sums do
/// not depend on the thread count.
const ROWS_PER_CHUNK: usize = 32;

/// One query's logits for head `t`, recomputed as the forward computes
/// them (without the max shift): neighbours into `logits`; returns the blank's.
#[inline]
fn logits_of(
    inp: &AttentionInputs<'_>,
    img: usize,
    i: usize,
    t: usize,
    qs: &[f32],
    logits: &mut [f32],
) -> f32 {
    let (n, h, d) = (inp.tokens, inp.heads, inp.head_dim);
    let c = h * d;
    let kv = &inp.kv[img * n * 2 * c..(img + 1) * n * 2 * c];
    let m = inp.nbhd.size;
    let nbrs = inp.nbhd.of(img, i);
    let mask = inp.nbhd.mask_of(img, i);
    let rows = &inp.bias_rows[(img * n + i) * m..(img * n + i + 1) * m];
    let table_rows = inp.bias_table.len() / h;
    let bias = &inp.bias_table[t * table_rows..(t + 1) * table_rows];
    for (s, l) in logits.iter_mut().enumerate() {
        let j = nbrs[s] as usize;
        let k = &kv[j * 2 * c + t * 2 * d..][..d];
        *l = dot(qs, k) + bias[rows[s] as usize];
        if mask.is_some_and(|mask| !mask[s]) {
            *l += MASKED_LOGIT;
        }
    }
    dot(qs, &inp.blank_k[t * d..(t + 1) * d])
}

/// The gradients of [`super::cluster_attention`] (see the module).
///
/// # Errors
/// [`Error::Shape`] when the inputs disagree with the forward's or with
/// each other; [`Error::InvalidArgument`] for an inverse that is not over
/// the forward's tokens.
pub fn cluster_attention_backward(g: &AttentionGradInputs<'_>) -> Result<AttentionGrads> {
    const OP: &str = "cluster_attention_backward";
    let inp = g.forward;
    check_inputs(inp)?;
    let (b, n, h, d) = (inp.batch, inp.tokens, inp.heads, inp.head_dim);
    let c = h * d;
    let m = inp.nbhd.size;
    check_len(OP, "out", &[b, n, c], g.out.len())?;
    check_len(OP, "lse", &[b, n, h], g.lse.len())?;
    check_len(OP, "grad_out", &[b, n, c], g.grad_out.len())?;
    let table_rows = inp.bias_table.len() / h;
    if g.offsets.len() != table_rows {
        return Err(Error::shape(OP, "offsets", table_rows, g.offsets.len()));
    }
    g.inverse.check_inverts(OP, inp.nbhd)?;
    let mut grads = AttentionGrads {
        q: vec![0.0; b * n * c],
        kv: vec![0.0; b * n * 2 * c],
        pos_weight: vec![0.0; h * 5],
        pos_bias: vec![0.0; h],
        blank_k: vec![0.0; c],
        blank_v: vec![0.0; c],
    };
    if b * n * c == 0 {
        return Ok(grads);
    }
    let features: [&[f32]; 5] = std::array::from_fn(|k| g.offsets.feature(k));

    // D = dO·O per query and head.
    let delta: Vec<f32> = g
        .grad_out
        .chunks_exact(d)
        .zip(g.out.chunks_exact(d))
        .map(|(go, o)| dot(go, o))
        .collect();

    // Pass 1, by query: dq and the parameters' partial sums per chunk.
    let partials: Vec<Vec<f32>> = grads
        .q
        .par_chunks_mut(c * ROWS_PER_CHUNK)
        .enumerate()
        .map_init(
            || (vec![0.0f32; m], vec![0.0f32; d]),
            |(logits, qs), (chunk, dq_rows)| {
                // [pos_weight h×5 | pos_bias h | blank_k c | blank_v c]
                let mut part = vec![0.0f32; 6 * h + 2 * c];
                for (r, dq) in dq_rows.chunks_exact_mut(c).enumerate() {
                    let row = chunk * ROWS_PER_CHUNK + r;
                    let (img, i) = (row / n, row % n);
                    let scratch = (&mut logits[..], &mut qs[..]);
                    query_backward(g, &features, &delta, (img, i), scratch, dq, &mut part);
                }
                part
            },
        )
        .collect();
    for part in &partials {
        let (pw, rest) = part.split_at(5 * h);
        let (pb, rest) = rest.split_at(h);
        let (bk, bv) = rest.split_at(c);
        for (dst, src) in [
            (&mut grads.pos_weight, pw),
            (&mut grads.pos_bias, pb),
            (&mut grads.blank_k, bk),
            (&mut grads.blank_v, bv),
        ] {
            for (a, &v) in dst.iter_mut().zip(src) {
                *a += v;
            }
        }
    }

    // Pass 2, by key: dk and dv gathered from the queries that hold it.
    grads
        .kv
        .par_chunks_mut(2 * c)
        .enumerate()
        .for_each(|(row, dkv)| key_backward(g, &delta, row / n, row % n, dkv));
    Ok(grads)
}

/// Pass 1 for query `i` of image `img`: its `dq`, and its shares of the
/// position-bias and blank-token gradients added to `part`.
fn query_backward(
    g: &AttentionGradInputs<'_>,
    features: &[&[f32]; 5],
    delta: &[f32],
    (img, i): (usize, usize),
    (logits, qs): (&mut [f32], &mut [f32]),
    dq: &mut [f32],
    part: &mut [f32],
) {
    let inp = g.forward;
    let (n, h, d) = (inp.tokens, inp.heads, inp.head_dim);
    let c = h * d;
    let m = inp.nbhd.size;
    let kv = &inp.kv[img * n * 2 * c..(img + 1) * n * 2 * c];
    let row = img * n + i;
    let nbrs = inp.nbhd.of(img, i);
    let rows = &inp.bias_rows[row * m..(row + 1) * m];
    let q = &inp.q[row * c..(row + 1) * c];
    let go_row = &g.grad_out[row * c..(row + 1) * c];
    let (pw_bias, rest) = part.split_at_mut(6 * h);
    let (pos_weight, pos_bias) = pw_bias.split_at_mut(5 * h);
    let (blank_k, blank_v) = rest.split_at_mut(c);
    for t in 0..h {
        for (s, &v) in qs.iter_mut().zip(&q[t * d..(t + 1) * d]) {
            *s = v * inp.q_scale;
        }
        let blank_logit = logits_of(inp, img, i, t, qs, logits);
        let lse = g.lse[row * h + t];
        let go = &go_row[t * d..(t + 1) * d];
        let delta = delta[row * h + t];
        let dq_t = &mut dq[t * d..(t + 1) * d];
        for (s, &a) in logits.iter().enumerate() {
            let j = nbrs[s] as usize;
            let p = exp(a - lse);
            let v = &kv[j * 2 * c + t * 2 * d + d..][..d];
            let da = p * (dot(go, v) - delta);
            axpy(da, &kv[j * 2 * c + t * 2 * d..][..d], dq_t);
            let r = rows[s] as usize;
            for (k, f) in features.iter().enumerate() {
                pos_weight[t * 5 + k] += da * f[r];
            }
            pos_bias[t] += da;
        }
        let p_blank = exp(blank_logit - lse);
        let bv = &inp.blank_v[t * d..(t + 1) * d];
        let da_blank = p_blank * (dot(go, bv) - delta);
        axpy(da_blank, &inp.blank_k[t * d..(t + 1) * d], dq_t);
        axpy(da_blank, qs, &mut blank_k[t * d..(t + 1) * d]);
        axpy(p_blank, go, &mut blank_v[t * d..(t + 1) * d]);
        for v in dq_t.iter_mut() {
            *v *= inp.q_scale;
        }
    }
}

/// Pass 2 for key `j` of image `img`: `dk_j` and `dv_j` (into `dkv`, the
/// forward's kv layout), gathered over the (query, slot) pairs holding `j`.
fn key_backward(g: &AttentionGradInputs<'_>, delta: &[f32], img: usize, j: usize, dkv: &mut [f32]) {
    let inp = g.forward;
    let (n, h, d) = (inp.tokens, inp.heads, inp.head_dim);
    let c = h * d;
    let m = inp.nbhd.size;
    let kv_j = &inp.kv[(img * n + j) * 2 * c..(img * n + j + 1) * 2 * c];
    let table_rows = inp.bias_table.len() / h;
    for &(i, slot) in g.inverse.of(img, j) {
        let (i, slot) = (i as usize, slot as usize);
        let row = img * n + i;
        let q = &inp.q[row * c..(row + 1) * c];
        let go_row = &g.grad_out[row * c..(row + 1) * c];
        let bias_row = inp.bias_rows[row * m + slot] as usize;
        let masked = inp.nbhd.mask_of(img, i).is_some_and(|mask| !mask[slot]);
        for t in 0..h {
            let q_t = &q[t * d..(t + 1) * d];
            let k = &kv_j[t * 2 * d..t * 2 * d + d];
            let v = &kv_j[t * 2 * d + d..(t + 1) * 2 * d];
            // The scale applied to the dot product and to da, not to q.
            let mut a = dot(q_t, k) * inp.q_scale + inp.bias_table[t * table_rows + bias_row];
            if masked {
                a += MASKED_LOGIT;
            }
            let p = exp(a - g.lse[row * h + t]);
            let go = &go_row[t * d..(t + 1) * d];
            let da = p * (dot(go, v) - delta[row * h + t]);
            let (dk, dv) = dkv[t * 2 * d..(t + 1) * 2 * d].split_at_mut(d);
            axpy(da * inp.q_scale, q_t, dk);
            axpy(p, go, dv);
        }
    }
}
