//! Kernels over rows gathered through neighbour lists, shared by the
//! attention and the merge, forward and backward.
//!
//! - [`score`]: dot products of one vector with the rows a neighbour list
//!   names, from rows stored dimension-major (d×n): a cluster's members are
//!   contiguous tokens, so blocks of [`SLOT_BLOCK`] neighbours are contiguous
//!   in every dimension and [`BLOCK_GROUP`] blocks accumulate together in
//!   registers ([`ScorePlan`] finds them).
//! - [`gather_weighted_sum`]: `Σ_k p_k · row_k` over gathered rows.
//!
//! Every function is `#[inline(always)]`, to be compiled inside its
//! callers' multiversioned loops. Sums run in an order fixed by the inputs.

use rayon::prelude::*;

use super::vector_math::{LANES, axpy};

/// Neighbour slots scored as one block: a cluster's members (or part of them).
pub const SLOT_BLOCK: usize = 8;

/// Contiguous blocks whose scores accumulate at once (6 clusters of 8 make
/// the published neighbourhood of 48).
pub const BLOCK_GROUP: usize = 6;

/// How one vector's neighbour slots are scored (the same for every head,
/// or every inner channel):
/// blocks of [`SLOT_BLOCK`] contiguous neighbours (a cluster's members) in
/// groups of [`BLOCK_GROUP`], whose sums stay in registers across the key
/// dimensions, and the other slots (padding, odd sizes) one by one.
#[derive(Default)]
pub struct ScorePlan {
    /// (first token of each block, its first slot, blocks used).
    groups: Vec<([usize; BLOCK_GROUP], [usize; BLOCK_GROUP], usize)>,
    singles: Vec<usize>,
}

impl ScorePlan {
    #[inline(always)]
    pub fn build(&mut self, nbrs: &[u32]) {
        self.groups.clear();
        self.singles.clear();
        let mut group = ([0usize; BLOCK_GROUP], [0usize; BLOCK_GROUP], 0usize);
        let mut slot = 0;
        while slot < nbrs.len() {
            let block = &nbrs[slot..nbrs.len().min(slot + SLOT_BLOCK)];
            let first = block[0] as usize;
            let contiguous = block.len() == SLOT_BLOCK
                && block
                    .iter()
                    .enumerate()
                    .all(|(u, &j)| j as usize == first + u);
            if contiguous {
                group.0[group.2] = first;
                group.1[group.2] = slot;
                group.2 += 1;
                if group.2 == BLOCK_GROUP {
                    self.groups.push(group);
                    group.2 = 0;
                }
            } else {
                self.singles.extend(slot..slot + block.len());
            }
            slot += block.len();
        }
        if group.2 > 0 {
            // Unused entries score the first block again; their results are dropped.
            for g in group.2..BLOCK_GROUP {
                group.0[g] = group.0[0];
            }
            self.groups.push(group);
        }
    }
}

/// `logits[slot] = q · k_{nbrs[slot]}` from dimension-major keys `kt` (d×n),
/// following `plan`.
#[inline(always)]
pub fn score(plan: &ScorePlan, q: &[f32], kt: &[f32], n: usize, nbrs: &[u32], logits: &mut [f32]) {
    for (starts, slots, count) in &plan.groups {
        score_group(q, kt, n, starts, slots, *count, logits);
    }
    for &slot in &plan.singles {
        let j = nbrs[slot] as usize;
        let mut acc = 0.0f32;
        for (e, &qe) in q.iter().enumerate() {
            acc = qe.mul_add(kt[e * n + j], acc);
        }
        logits[slot] = acc;
    }
}

/// Scores [`BLOCK_GROUP`] contiguous blocks starting at tokens `starts`
/// into `logits` at `slots`; only the first `count` are kept.
#[inline(always)]
fn score_group(
    q: &[f32],
    kt: &[f32],
    n: usize,
    starts: &[usize; BLOCK_GROUP],
    slots: &[usize; BLOCK_GROUP],
    count: usize,
    logits: &mut [f32],
) {
    let mut acc = [[0.0f32; SLOT_BLOCK]; BLOCK_GROUP];
    for (e, &qe) in q.iter().enumerate() {
        let row = &kt[e * n..(e + 1) * n];
        for g in 0..BLOCK_GROUP {
            let k: &[f32; SLOT_BLOCK] = row[starts[g]..starts[g] + SLOT_BLOCK].try_into().unwrap();
            for u in 0..SLOT_BLOCK {
                acc[g][u] = qe.mul_add(k[u], acc[g][u]);
            }
        }
    }
    for g in 0..count {
        logits[slots[g]..slots[g] + SLOT_BLOCK].copy_from_slice(&acc[g]);
    }
}

/// `out = Σ_k p[k] · v_{rows[k]}` with `v_j = values[j·stride..][..d]` and
/// `d = out.len()` (overwritten): a weighted sum of gathered rows,
/// accumulated in registers. Every element sums the even and the odd `k`
/// apart, then adds the two: the order depends only on the inputs, not on
/// how many [`LANES`]-wide blocks one sweep over the rows carries (up to
/// four, so that eight independent sums hide the multiply-add latency).
#[inline(always)]
pub fn gather_weighted_sum(
    p: &[f32],
    rows: &[u32],
    values: &[f32],
    stride: usize,
    out: &mut [f32],
) {
    let d = out.len();
    let mut start = 0;
    while start + LANES <= d {
        // Direct calls (not a function pointer), so each is inlined into
        // the caller's multiversioned loop.
        start += match (d - start) / LANES {
            1 => weighted_sweep::<LANES>(p, rows, values, stride, start, out),
            2 => weighted_sweep::<{ 2 * LANES }>(p, rows, values, stride, start, out),
            3 => weighted_sweep::<{ 3 * LANES }>(p, rows, values, stride, start, out),
            _ => weighted_sweep::<{ 4 * LANES }>(p, rows, values, stride, start, out),
        };
    }
    if start < d {
        out[start..].fill(0.0);
        for (&pv, &j) in p.iter().zip(rows) {
            let row = j as usize * stride;
            axpy(pv, &values[row + start..row + d], &mut out[start..]);
        }
    }
}

/// [`gather_weighted_sum`] over `W` dimensions from `start` (a multiple
/// of [`LANES`]); returns `W`.
#[inline(always)]
fn weighted_sweep<const W: usize>(
    p: &[f32],
    rows: &[u32],
    values: &[f32],
    stride: usize,
    start: usize,
    out: &mut [f32],
) -> usize {
    let value = |j: u32| -> &[f32; W] {
        let first = j as usize * stride + start;
        values[first..first + W].try_into().unwrap()
    };
    let (mut even, mut odd) = ([0.0f32; W], [0.0f32; W]);
    let mut pairs = p.chunks_exact(2).zip(rows.chunks_exact(2));
    for (pp, jj) in pairs.by_ref() {
        let (v0, v1) = (value(jj[0]), value(jj[1]));
        for l in 0..W {
            even[l] = pp[0].mul_add(v0[l], even[l]);
            odd[l] = pp[1].mul_add(v1[l], odd[l]);
        }
    }
    if p.len() % 2 == 1 {
        let v = value(rows[p.len() - 1]);
        for l in 0..W {
            even[l] = p[p.len() - 1].mul_add(v[l], even[l]);
        }
    }
    for (o, (e, d)) in out[start..start + W].iter_mut().zip(even.iter().zip(&odd)) {
        *o = e + d;
    }
    W
}

/// Column groups of row-major rows, dimension-major, as [`score`] reads
/// them: `src` holds `images×n` rows of `stride` floats; the result is
/// `[img][g][e][j] = src[(img·n + j)·stride + columns[g] + e]` for `e` below
/// `width`.
pub fn transpose_columns(
    src: &[f32],
    images: usize,
    n: usize,
    stride: usize,
    columns: &[usize],
    width: usize,
) -> Vec<f32> {
    // Blocks of rows, so that every write is a contiguous run.
    const BLOCK: usize = 16;
    let groups = columns.len();
    let mut out = vec![0.0f32; images * groups * width * n];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(width * n)
        .enumerate()
        .for_each(|(img_group, dst)| {
            let (img, first) = (img_group / groups, columns[img_group % groups]);
            let src = &src[img * n * stride..(img + 1) * n * stride];
            for j0 in (0..n).step_by(BLOCK) {
                let rows = &src[j0 * stride..n.min(j0 + BLOCK) * stride];
                for e in 0..width {
                    let run = &mut dst[e * n + j0..e * n + j0 + rows.len() / stride];
                    for (x, row) in run.iter_mut().zip(rows.chunks_exact(stride)) {
                        *x = row[first + e];
                    }
                }
            }
        });
    out
}
