//! Kernels over rows gathered through neighbour lists, shared by the
//! attention and the merge, forward and backward.
//!
//! - [`score`]: dot products of one vector with the rows a neighbour list
//!   names, from rows stored dimension-major (d×n): a cluster's members are
//!   contiguous tokens, so blocks of [`SLOT_BLOCK`] neighbours are contiguous
//!   in every dimension and [`BLOCK_GROUP`] blocks accumulate together in
//!   registers ([`ScorePlan`] finds them).
//!   [`score_pair`] does two such products in one sweep, [`score4`] four
//!   vectors against the same rows.
//! - [`gather_weighted_sum`]: `Σ_k p_k · row_k` over gathered rows;
//!   [`gather_weighted_sums`] for several outputs sharing the rows.
//! - [`transpose_columns`]: the dimension-major copies [`score`] reads;
//!   [`transpose_rows`] for a range of rows.
//!
//! The loops are `#[inline(always)]`, to be compiled inside their callers'
//! multiversioned loops. Sums run in an order fixed by the inputs.

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

/// Two [`score`]s over the same neighbours in one sweep: `a[slot] = x ·
/// xt_{nbrs[slot]}` and `b[slot] = y · yt_{nbrs[slot]}` (the backward's
/// logits and `dO·v`), the same bits as two calls.
#[inline(always)]
pub fn score_pair(
    plan: &ScorePlan,
    (x, xt): (&[f32], &[f32]),
    (y, yt): (&[f32], &[f32]),
    n: usize,
    nbrs: &[u32],
    (a, b): (&mut [f32], &mut [f32]),
) {
    for (starts, slots, count) in &plan.groups {
        let mut acc_x = [[0.0f32; SLOT_BLOCK]; BLOCK_GROUP];
        let mut acc_y = [[0.0f32; SLOT_BLOCK]; BLOCK_GROUP];
        for (e, (&xe, &ye)) in x.iter().zip(y).enumerate() {
            let (row_x, row_y) = (&xt[e * n..(e + 1) * n], &yt[e * n..(e + 1) * n]);
            for g in 0..BLOCK_GROUP {
                let kx: &[f32; SLOT_BLOCK] =
                    row_x[starts[g]..starts[g] + SLOT_BLOCK].try_into().unwrap();
                let ky: &[f32; SLOT_BLOCK] =
                    row_y[starts[g]..starts[g] + SLOT_BLOCK].try_into().unwrap();
                for u in 0..SLOT_BLOCK {
                    acc_x[g][u] = xe.mul_add(kx[u], acc_x[g][u]);
                    acc_y[g][u] = ye.mul_add(ky[u], acc_y[g][u]);
                }
            }
        }
        for g in 0..*count {
            a[slots[g]..slots[g] + SLOT_BLOCK].copy_from_slice(&acc_x[g]);
            b[slots[g]..slots[g] + SLOT_BLOCK].copy_from_slice(&acc_y[g]);
        }
    }
    for &slot in &plan.singles {
        let j = nbrs[slot] as usize;
        let (mut sx, mut sy) = (0.0f32, 0.0f32);
        for (e, (&xe, &ye)) in x.iter().zip(y).enumerate() {
            sx = xe.mul_add(xt[e * n + j], sx);
            sy = ye.mul_add(yt[e * n + j], sy);
        }
        a[slot] = sx;
        b[slot] = sy;
    }
}

/// [`score`] of four vectors over the same neighbours in one sweep (the
/// merge backward's `dU[o]·x_j` for its 4 inner channels): `out[o][slot]
/// = xs[o] · xt_{nbrs[slot]}`, `out` being 4 rows of `nbrs.len()`; the same
/// bits as four calls, with each gathered block loaded once.
#[inline(always)]
pub fn score4(
    plan: &ScorePlan,
    xs: [&[f32]; 4],
    xt: &[f32],
    n: usize,
    nbrs: &[u32],
    out: &mut [f32],
) {
    let m = nbrs.len();
    let d = xs[0].len();
    for (starts, slots, count) in &plan.groups {
        let mut acc = [[[0.0f32; SLOT_BLOCK]; BLOCK_GROUP]; 4];
        for e in 0..d {
            let row = &xt[e * n..(e + 1) * n];
            let x = [xs[0][e], xs[1][e], xs[2][e], xs[3][e]];
            for g in 0..BLOCK_GROUP {
                let k: &[f32; SLOT_BLOCK] =
                    row[starts[g]..starts[g] + SLOT_BLOCK].try_into().unwrap();
                for (acc, &x) in acc.iter_mut().zip(&x) {
                    for u in 0..SLOT_BLOCK {
                        acc[g][u] = x.mul_add(k[u], acc[g][u]);
                    }
                }
            }
        }
        for (o, acc) in acc.iter().enumerate() {
            for g in 0..*count {
                out[o * m + slots[g]..][..SLOT_BLOCK].copy_from_slice(&acc[g]);
            }
        }
    }
    for &slot in &plan.singles {
        let j = nbrs[slot] as usize;
        let mut acc = [0.0f32; 4];
        for e in 0..d {
            let k = xt[e * n + j];
            for (acc, x) in acc.iter_mut().zip(&xs) {
                *acc = x[e].mul_add(k, *acc);
            }
        }
        for (o, acc) in acc.into_iter().enumerate() {
            out[o * m + slot] = acc;
        }
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
/// how many [`LANES`]-wide blocks one sweep over the rows carries (two,
/// where `d` allows, so that four independent sums hide some of the
/// multiply-add latency).
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
    while start + 2 * LANES <= d {
        weighted_sweep2(p, rows, values, stride, start, out);
        start += 2 * LANES;
    }
    if start + LANES <= d {
        weighted_sweep1(p, rows, values, stride, start, out);
        start += LANES;
    }
    if start < d {
        out[start..].fill(0.0);
        for (&pv, &j) in p.iter().zip(rows) {
            let row = j as usize * stride;
            axpy(pv, &values[row + start..row + d], &mut out[start..]);
        }
    }
}

/// `outs[t] = Σ_k w[t·K + k] · v_{rows[k]}` (`K` rows) (each overwritten, all of one
/// length `d`) for `R` outputs that gather the same rows with their own
/// weights, such as the tokens of one cluster, which the same queries
/// hold: every gathered block of [`LANES`] dimensions is loaded once for
/// all `R`, whose sums stay in registers (keep `R` at most 4 for AVX2's
/// sixteen: `R` × [`LANES`] floats are `2R` of them). Every
/// element is one chain over `k` in order, so an output's bits do not
/// depend on `R`.
#[inline(always)]
pub fn gather_weighted_sums<const R: usize>(
    w: &[f32],
    rows: &[u32],
    values: &[f32],
    stride: usize,
    outs: &mut [&mut [f32]; R],
) {
    const L: usize = LANES;
    debug_assert_eq!(w.len(), rows.len() * R);
    let d = outs[0].len();
    let mut start = 0;
    while start + L <= d {
        let mut acc = [[0.0f32; L]; R];
        for (k, &j) in rows.iter().enumerate() {
            let row = row_at::<L>(values, j, stride, start);
            for (t, acc) in acc.iter_mut().enumerate() {
                let w = w[t * rows.len() + k];
                for (a, &x) in acc.iter_mut().zip(row) {
                    *a = w.mul_add(x, *a);
                }
            }
        }
        for (out, acc) in outs.iter_mut().zip(&acc) {
            out[start..start + L].copy_from_slice(acc);
        }
        start += L;
    }
    // The rest, one element at a time in the same order.
    for e in start..d {
        let mut acc = [0.0f32; R];
        for (k, &j) in rows.iter().enumerate() {
            let x = values[j as usize * stride + e];
            for (t, acc) in acc.iter_mut().enumerate() {
                *acc = w[t * rows.len() + k].mul_add(x, *acc);
            }
        }
        for (out, acc) in outs.iter_mut().zip(acc) {
            out[e] = acc;
        }
    }
}

/// The row of `values` that `j` names, from `start`, `W` wide.
#[inline(always)]
fn row_at<const W: usize>(values: &[f32], j: u32, stride: usize, start: usize) -> &[f32; W] {
    let first = j as usize * stride + start;
    values[first..first + W].try_into().unwrap()
}

/// [`gather_weighted_sum`] over one block of [`LANES`] dimensions from
/// `start`: two sums (even and odd `k`), each in its own register.
#[inline(always)]
fn weighted_sweep1(
    p: &[f32],
    rows: &[u32],
    values: &[f32],
    stride: usize,
    start: usize,
    out: &mut [f32],
) {
    const L: usize = LANES;
    let (mut even, mut odd) = ([0.0f32; L], [0.0f32; L]);
    for (pp, jj) in p.chunks_exact(2).zip(rows.chunks_exact(2)) {
        let v0 = row_at::<L>(values, jj[0], stride, start);
        let v1 = row_at::<L>(values, jj[1], stride, start);
        for l in 0..L {
            even[l] = pp[0].mul_add(v0[l], even[l]);
            odd[l] = pp[1].mul_add(v1[l], odd[l]);
        }
    }
    if p.len() % 2 == 1 {
        let v = row_at::<L>(values, rows[p.len() - 1], stride, start);
        for l in 0..L {
            even[l] = p[p.len() - 1].mul_add(v[l], even[l]);
        }
    }
    for l in 0..L {
        out[start + l] = even[l] + odd[l];
    }
}

/// [`gather_weighted_sum`] over two blocks of [`LANES`] dimensions from
/// `start`: four independent sums in named accumulators (arrays of blocks
/// end up in memory rather than registers), each element summed in the
/// same order as [`weighted_sweep1`] would.
#[inline(always)]
fn weighted_sweep2(
    p: &[f32],
    rows: &[u32],
    values: &[f32],
    stride: usize,
    start: usize,
    out: &mut [f32],
) {
    const L: usize = LANES;
    let (mut even0, mut odd0) = ([0.0f32; L], [0.0f32; L]);
    let (mut even1, mut odd1) = ([0.0f32; L], [0.0f32; L]);
    for (pp, jj) in p.chunks_exact(2).zip(rows.chunks_exact(2)) {
        let v0 = row_at::<{ 2 * L }>(values, jj[0], stride, start);
        let v1 = row_at::<{ 2 * L }>(values, jj[1], stride, start);
        for l in 0..L {
            even0[l] = pp[0].mul_add(v0[l], even0[l]);
            odd0[l] = pp[1].mul_add(v1[l], odd0[l]);
            even1[l] = pp[0].mul_add(v0[L + l], even1[l]);
            odd1[l] = pp[1].mul_add(v1[L + l], odd1[l]);
        }
    }
    if p.len() % 2 == 1 {
        let v = row_at::<{ 2 * L }>(values, rows[p.len() - 1], stride, start);
        let last = p[p.len() - 1];
        for l in 0..L {
            even0[l] = last.mul_add(v[l], even0[l]);
            even1[l] = last.mul_add(v[L + l], even1[l]);
        }
    }
    for l in 0..L {
        out[start + l] = even0[l] + odd0[l];
        out[start + L + l] = even1[l] + odd1[l];
    }
}

/// Rows `first..first + out.len() / width` of `src` (row-major, `stride`
/// floats a row), their first `width` columns dimension-major into `out`:
/// `out[e·rows + (j − first)] = src[j·stride + e]`. One task's slice of
/// [`transpose_columns`], small enough to stay in cache.
pub fn transpose_rows(src: &[f32], stride: usize, first: usize, width: usize, out: &mut [f32]) {
    const BLOCK: usize = 16;
    let rows = out.len() / width.max(1);
    for j0 in (0..rows).step_by(BLOCK) {
        let block = &src[(first + j0) * stride..(first + rows.min(j0 + BLOCK)) * stride];
        for e in 0..width {
            let run = &mut out[e * rows + j0..e * rows + j0 + block.len() / stride];
            for (x, row) in run.iter_mut().zip(block.chunks_exact(stride)) {
                *x = row[e];
            }
        }
    }
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
    let len = images * groups * width * n;
    // Written once each below, so not zeroed first (a fill as long as the
    // copy itself).
    let mut out = Vec::with_capacity(len);
    if len == 0 {
        return out;
    }
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(width * n)
        .enumerate()
        .for_each(|(img_group, dst)| {
            let (img, first) = (img_group / groups, columns[img_group % groups]);
            let src = &src[img * n * stride..(img + 1) * n * stride];
            for j0 in (0..n).step_by(BLOCK) {
                let rows = &src[j0 * stride..n.min(j0 + BLOCK) * stride];
                for e in 0..width {
                    let run = &mut dst[e * n + j0..e * n + j0 + rows.len() / stride];
                    for (x, row) in run.iter_mut().zip(rows.chunks_exact(stride)) {
                        x.write(row[first + e]);
                    }
                }
            }
        });
    // SAFETY: the chunks tile `0..len` (`len` is a multiple of `width·n`),
    // and each chunk's runs cover it: `e·n + j` for every `e < width` and
    // `j < n` (blocks of rows `j0..j0 + BLOCK` up to `n`).
    unsafe { out.set_len(len) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shape around the 8 × 8 tiles: rows and widths below, at and
    /// past multiples of 8, a stride wider than the width, an offset start.
    #[test]
    fn transpose_rows_matches_the_definition() {
        for (rows, width, stride, first) in [
            (1, 1, 1, 0),
            (7, 9, 9, 2),
            (8, 8, 8, 0),
            (17, 24, 30, 5),
            (64, 64, 64, 3),
            (13, 3, 5, 1),
        ] {
            let src: Vec<f32> = (0..(first + rows) * stride).map(|x| x as f32).collect();
            let mut out = vec![f32::NAN; rows * width];
            transpose_rows(&src, stride, first, width, &mut out);
            for j in 0..rows {
                for e in 0..width {
                    assert_eq!(
                        out[e * rows + j],
                        src[(first + j) * stride + e],
                        "{rows}×{width}: ({j}, {e})"
                    );
                }
            }
        }
    }

    /// Every element of the result as defined, for column groups of
    /// several widths (rows past a multiple of the block, several images).
    #[test]
    fn transpose_columns_matches_the_definition() {
        for (images, n, stride, columns, width) in [
            (1, 1, 1, vec![0], 1),
            (2, 17, 12, vec![0, 6], 5),
            (3, 33, 8, vec![2], 6),
            (1, 16, 4, vec![0, 1, 2], 2),
            (2, 5, 3, vec![], 3),
            (2, 0, 3, vec![0], 3),
        ] {
            let src: Vec<f32> = (0..images * n * stride).map(|x| x as f32).collect();
            let out = transpose_columns(&src, images, n, stride, &columns, width);
            assert_eq!(out.len(), images * columns.len() * width * n);
            for img in 0..images {
                for (g, &first) in columns.iter().enumerate() {
                    for e in 0..width {
                        for j in 0..n {
                            assert_eq!(
                                out[((img * columns.len() + g) * width + e) * n + j],
                                src[(img * n + j) * stride + first + e],
                                "image {img}, group {g}, ({e}, {j})"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Deterministic values in [-1, 1).
    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Each output of a shared gather has the bits it has alone, for every
    /// width (whole blocks of lanes, and a tail).
    #[test]
    fn shared_gathers_give_each_output_its_own_bits() {
        for d in [5, 16, 33, 64] {
            let (stride, n_rows) = (d + 3, 11);
            let table = values(stride * 20, d as u32);
            let rows: Vec<u32> = (0..n_rows).map(|k| (k * 7 % 20) as u32).collect();
            let w = values(8 * n_rows, 99);
            let mut together = vec![0.0f32; 8 * d];
            let mut chunks = together.chunks_exact_mut(d);
            let mut outs: [&mut [f32]; 8] = std::array::from_fn(|_| chunks.next().unwrap());
            gather_weighted_sums::<8>(&w, &rows, &table, stride, &mut outs);
            for t in 0..8 {
                let mut alone = vec![f32::NAN; d];
                let w_t = &w[t * n_rows..(t + 1) * n_rows];
                gather_weighted_sums::<1>(w_t, &rows, &table, stride, &mut [&mut alone[..]]);
                assert_eq!(
                    together[t * d..(t + 1) * d]
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                    alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "d = {d}, output {t}"
                );
                // And the sum is the sum.
                for e in 0..d {
                    let want: f64 = (0..n_rows)
                        .map(|k| w_t[k] as f64 * table[rows[k] as usize * stride + e] as f64)
                        .sum();
                    assert!(
                        (alone[e] as f64 - want).abs() < 1e-5,
                        "d = {d}, element {e}"
                    );
                }
            }
        }
    }
}
