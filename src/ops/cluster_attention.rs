//! Cluster attention with relative-position bias, mask and blank token (spec §6).
//!
//! For query `i`, head `t`, neighbour `j` of `i`'s neighbourhood:
//! `a_ij = q_i·k_j + P_t(f_ij) − 100·[j padded]`, plus a blank logit
//! `q_i·blank_k`; `o_i = Σ_j softmax(a)_ij v_j + softmax(a)_blank · blank_v`.
//! Logits live only in a per-query scratch row: the b×h×n×m attention tensor
//! is never materialised.
//!
//! Speed: keys are copied per head [`Tiled`] (tiles of 8 tokens, each
//! dimension 8 adjacent floats) so that the members of a cluster,
//! contiguous tokens, are one run of memory; the scores of up to
//! [`gather::BLOCK_GROUP`] clusters accumulate together in registers.
//! The hot loops use `mul_add` and are compiled per instruction set
//! (multiversioned), so FMA units are used where the CPU has them.

use multiversion::multiversion;
use rayon::prelude::*;

use super::gather::{self, ScorePlan, Tiled, score};
use super::neighbourhood::{Neighbourhood, all_below};
use super::vector_math;
use crate::error::{Error, Result, check_len};

pub mod backward;
pub mod gpu;

/// Logit added to padded neighbourhood slots (added, not −∞, as published).
pub const MASKED_LOGIT: f32 = -100.0;

/// Inputs of [`cluster_attention`].
#[derive(Debug, Clone, Copy)]
pub struct AttentionInputs<'a> {
    /// b×n×c queries, head `t` at `t·c_`, multiplied by `q_scale` on use.
    pub q: &'a [f32],
    /// The query scale, `head_dim^-0.5` (fused here rather than a pass over `q`).
    pub q_scale: f32,
    /// b×n×2c keys and values: head `t`'s key at `t·2c_`, its value at `t·2c_ + c_`.
    pub kv: &'a [f32],
    pub nbhd: &'a Neighbourhood,
    /// b×n×m: the bias-table row (relative offset) of every neighbour slot,
    /// from [`super::rel_pos::neighbour_rows`].
    pub bias_rows: &'a [u32],
    /// heads×rows position bias `P_t(f)` (from [`super::rel_pos::OffsetTable::apply`]).
    pub bias_table: &'a [f32],
    /// c: blank-token key, heads outermost.
    pub blank_k: &'a [f32],
    /// c: blank-token value, heads outermost.
    pub blank_v: &'a [f32],
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// Query rows per parallel task.
const ROWS_PER_TASK: usize = 16;

/// Computes the attention output (b×n×c, heads concatenated, before `proj`).
///
/// # Errors
/// [`Error::Shape`] when the inputs disagree; [`Error::InvalidArgument`] for
/// neighbour indices or bias rows out of range.
pub fn cluster_attention(inp: &AttentionInputs<'_>) -> Result<Vec<f32>> {
    cluster_attention_with_lse(inp).map(|(out, _)| out)
}

/// As [`cluster_attention`], also returning the statistic the backward
/// needs: the log-sum-exp of every query's logits per head (neighbours and
/// blank token), b×n×h.
///
/// # Errors
/// As [`cluster_attention`].
pub fn cluster_attention_with_lse(inp: &AttentionInputs<'_>) -> Result<(Vec<f32>, Vec<f32>)> {
    check_inputs(inp)?;
    let (b, n, h, d) = (inp.batch, inp.tokens, inp.heads, inp.head_dim);
    let c = h * d;
    let m = inp.nbhd.size;
    if b * n * c == 0 {
        return Ok((Vec::new(), vec![0.0; b * n * h]));
    }
    let keys_t = transpose_heads(inp.kv, b, n, h, d, KEYS);
    let mut out = vec![0.0f32; b * n * c];
    let mut lse = vec![0.0f32; b * n * h];
    out.par_chunks_mut(c * ROWS_PER_TASK)
        .zip(lse.par_chunks_mut(h * ROWS_PER_TASK))
        .enumerate()
        .for_each_init(
            || Scratch {
                logits: vec![0.0f32; m + 1],
                plan: ScorePlan::default(),
                query: vec![0.0f32; d],
            },
            |scratch, (task, (out, lse))| {
                attend_rows(inp, &keys_t, task * ROWS_PER_TASK, out, lse, scratch)
            },
        );
    Ok((out, lse))
}

/// Checks every input of the attention (forward and backward).
pub(crate) fn check_inputs(inp: &AttentionInputs<'_>) -> Result<()> {
    let (b, n, h, d) = (inp.batch, inp.tokens, inp.heads, inp.head_dim);
    let c = h * d;
    let nbhd = inp.nbhd;
    let m = nbhd.size;
    const OP: &str = "cluster_attention";
    check_len(OP, "q", &[b, n, c], inp.q.len())?;
    check_len(OP, "kv", &[b, n, 2 * c], inp.kv.len())?;
    check_len(OP, "blank_k", &[c], inp.blank_k.len())?;
    check_len(OP, "blank_v", &[c], inp.blank_v.len())?;
    check_len(OP, "bias_rows", &[b, n, m], inp.bias_rows.len())?;
    nbhd.check(OP, b, n)?;
    if h == 0 || !inp.bias_table.len().is_multiple_of(h) {
        return Err(Error::shape(
            OP,
            "bias_table",
            "heads×rows",
            inp.bias_table.len(),
        ));
    }
    let table_rows = inp.bias_table.len() / h;
    if !all_below(inp.bias_rows, table_rows) {
        return Err(Error::InvalidArgument(format!(
            "{OP}: bias rows must be below the table's {table_rows}"
        )));
    }
    Ok(())
}

/// Per-task buffers: the logits (+ blank) of one query and head, and the
/// query's scoring plan.
struct Scratch {
    logits: Vec<f32>,
    plan: ScorePlan,
    /// One head's scaled query.
    query: Vec<f32>,
}

/// What of a kv row [`transpose_heads`] copies: each head's key, or its
/// key and value (adjacent in the row, so one pass reads them together).
const KEYS: usize = 1;
const KEYS_AND_VALUES: usize = 2;

/// Each head's first `parts·d` columns of kv (its key, then its value),
/// per image and head [`Tiled`] (`Tiled::len(n, parts·d)` floats each).
fn transpose_heads(kv: &[f32], b: usize, n: usize, h: usize, d: usize, parts: usize) -> Vec<f32> {
    let columns: Vec<usize> = (0..h).map(|t| t * 2 * d).collect();
    gather::transpose_columns(kv, b, n, 2 * h * d, &columns, parts * d)
}

#[multiversion(targets = "simd")]
fn attend_rows(
    inp: &AttentionInputs<'_>,
    keys_t: &[f32],
    first_row: usize,
    out: &mut [f32],
    lse: &mut [f32],
    scratch: &mut Scratch,
) {
    let (c, h) = (inp.heads * inp.head_dim, inp.heads);
    for (r, (o, l)) in out
        .chunks_exact_mut(c)
        .zip(lse.chunks_exact_mut(h))
        .enumerate()
    {
        let row = first_row + r;
        attend_one(
            inp,
            keys_t,
            row / inp.tokens,
            row % inp.tokens,
            scratch,
            o,
            l,
        );
    }
}

#[inline(always)]
fn attend_one(
    inp: &AttentionInputs<'_>,
    keys_t: &[f32],
    img: usize,
    i: usize,
    scratch: &mut Scratch,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let (n, h, d) = (inp.tokens, inp.heads, inp.head_dim);
    let c = h * d;
    let kv = &inp.kv[img * n * 2 * c..(img + 1) * n * 2 * c];
    let q = &inp.q[(img * n + i) * c..(img * n + i + 1) * c];
    let nbrs = inp.nbhd.of(img, i);
    let mask = inp.nbhd.mask_of(img, i);
    let m = nbrs.len();
    let rows = &inp.bias_rows[(img * n + i) * m..(img * n + i + 1) * m];
    let table_rows = inp.bias_table.len() / h;
    scratch.plan.build(nbrs);
    let scratch_logits = &mut scratch.logits;
    for t in 0..h {
        for (s, &v) in scratch.query.iter_mut().zip(&q[t * d..(t + 1) * d]) {
            *s = v * inp.q_scale;
        }
        let qt = &scratch.query[..];
        let per_head = Tiled::len(n, d);
        let kt = Tiled::new(&keys_t[(img * h + t) * per_head..][..per_head], d);
        let (logits, blank) = scratch_logits.split_at_mut(m);
        score(&scratch.plan, qt, kt, nbrs, logits);
        let bias = &inp.bias_table[t * table_rows..(t + 1) * table_rows];
        for (l, &row) in logits.iter_mut().zip(rows) {
            // SAFETY: `cluster_attention` checked every bias row against the
            // table's row count; unchecked, this gather vectorises.
            *l += unsafe { *bias.get_unchecked(row as usize) };
        }
        if let Some(mask) = mask {
            for (l, &valid) in logits.iter_mut().zip(mask) {
                *l += if valid { 0.0 } else { MASKED_LOGIT };
            }
        }
        blank[0] = vector_math::dot(qt, &inp.blank_k[t * d..(t + 1) * d]);
        let max = vector_math::max(scratch_logits);

        // Softmax over the neighbours and the blank token, normalised after
        // the weighted sum (d multiplies instead of m + 1).
        let sum = vector_math::exp_sum(scratch_logits, max);
        lse[t] = max + sum.ln();
        let inv_sum = 1.0 / sum;
        let ot = &mut out[t * d..(t + 1) * d];
        // Value of token j: kv[j·2c + t·2d + d ..][..d].
        gather::gather_weighted_sum(&scratch_logits[..m], nbrs, &kv[t * 2 * d + d..], 2 * c, ot);
        vector_math::axpy(scratch_logits[m], &inp.blank_v[t * d..(t + 1) * d], ot);
        for o in ot.iter_mut() {
            *o *= inv_sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_token<'a>(
        nbhd: &'a Neighbourhood,
        bias: &'a [f32],
        kv: &'a [f32],
    ) -> AttentionInputs<'a> {
        AttentionInputs {
            q: &[1.0],
            q_scale: 1.0,
            kv,
            nbhd,
            bias_rows: &[0],
            bias_table: bias,
            blank_k: &[0.0],
            blank_v: &[2.0],
            batch: 1,
            tokens: 1,
            heads: 1,
            head_dim: 1,
        }
    }

    #[test]
    fn one_neighbour_and_blank_split_by_softmax() {
        // One token attending to itself; q·k = 0, bias 0, blank logit 0: equal split.
        let nbhd = Neighbourhood::global(1);
        let inp = one_token(&nbhd, &[0.0], &[0.0, 4.0]);
        assert_eq!(cluster_attention(&inp).unwrap(), [3.0]);
        // A bias of ln 3 weights the neighbour 3:1.
        let bias = [3f32.ln()];
        let out = cluster_attention(&one_token(&nbhd, &bias, &[0.0, 4.0])).unwrap();
        assert!((out[0] - 3.5).abs() < 1e-6);
    }

    #[test]
    fn empty_inputs_give_empty_outputs() {
        let nbhd = Neighbourhood::global(0);
        let inp = AttentionInputs {
            q: &[],
            kv: &[],
            bias_rows: &[],
            batch: 1,
            tokens: 0,
            ..one_token(&nbhd, &[0.0], &[])
        };
        assert!(cluster_attention(&inp).unwrap().is_empty());
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_tensor() {
        let nbhd = Neighbourhood::global(1);
        let inp = AttentionInputs {
            q: &[1.0, 2.0],
            ..one_token(&nbhd, &[0.0], &[0.0, 4.0])
        };
        let err = cluster_attention(&inp).unwrap_err().to_string();
        assert!(
            err.contains("cluster_attention") && err.contains("`q`"),
            "{err}"
        );
        let inp = AttentionInputs {
            bias_rows: &[3],
            ..one_token(&nbhd, &[0.0], &[0.0, 4.0])
        };
        assert!(cluster_attention(&inp).is_err());
    }
}
