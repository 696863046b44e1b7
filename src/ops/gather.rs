//! Kernels over rows gathered through neighbour lists, shared by the
//! attention and the merge, forward and backward.
//!
//! - [`score`]: dot products of one vector with the rows a neighbour list
//!   names, from a [`Tiled`] copy of the rows: a cluster's members are
//!   contiguous tokens, so blocks of [`SLOT_BLOCK`] neighbours are one tile,
//!   whose every dimension is [`SLOT_BLOCK`] adjacent floats and whose
//!   dimensions follow each other; [`BLOCK_GROUP`] blocks accumulate
//!   together in registers ([`ScorePlan`] finds them).
//!   [`score_pair`] does two such products in one sweep, against the two
//!   halves of each row (keys and values tiled together), [`score4`] four
//!   vectors against the same rows.
//! - [`gather_weighted_sum`]: `Σ_k p_k · row_k` over gathered rows;
//!   [`gather_weighted_sums`] for several outputs sharing the rows.
//! - [`transpose_columns`]: the [`Tiled`] copies [`score`] reads;
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
/// blocks of [`SLOT_BLOCK`] contiguous neighbours that fill one [`Tiled`]
/// tile (a cluster's members, when clusters are [`SLOT_BLOCK`] tokens or a
/// multiple) in groups of [`BLOCK_GROUP`], whose sums stay in registers
/// across the key dimensions, and the other slots (padding, odd sizes,
/// blocks across two tiles) one by one.
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
                && first.is_multiple_of(SLOT_BLOCK)
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

/// Rows copied token-tiled, as [`score`] reads them: tiles of
/// [`SLOT_BLOCK`] tokens, each holding its tokens' dimensions one after
/// another (`[tile][e][lane]`; token `j` is lane `j % 8` of tile `j / 8`).
/// A block of 8 contiguous tokens is then one run of `8·width` floats, a
/// few adjacent cache lines, where a dimension-major copy (d×n) spreads it
/// over `width` lines `n` floats apart.
#[derive(Clone, Copy)]
pub struct Tiled<'a> {
    data: &'a [f32],
    /// Floats from one tile to the next.
    stride: usize,
}

impl<'a> Tiled<'a> {
    /// Floats a tiled copy of `tokens` rows of `width` dimensions takes
    /// (the last tile padded).
    pub fn len(tokens: usize, width: usize) -> usize {
        tokens.div_ceil(SLOT_BLOCK) * width * SLOT_BLOCK
    }

    /// A tiled copy of rows of `width` dimensions ([`Self::len`] floats).
    pub fn new(data: &'a [f32], width: usize) -> Self {
        Self {
            data,
            stride: width * SLOT_BLOCK,
        }
    }

    /// Dimension `e` of token `j`.
    #[inline(always)]
    fn at(&self, j: usize, e: usize) -> f32 {
        self.data[(j / SLOT_BLOCK) * self.stride + e * SLOT_BLOCK + j % SLOT_BLOCK]
    }

    /// The first `dims` dimensions of the tile of token `first` (a
    /// multiple of [`SLOT_BLOCK`]): `dims` runs of [`SLOT_BLOCK`] lanes.
    #[inline(always)]
    fn tile(&self, first: usize, dims: usize) -> &'a [f32] {
        &self.data[(first / SLOT_BLOCK) * self.stride..][..dims * SLOT_BLOCK]
    }
}

/// `logits[slot] = q · k_{nbrs[slot]}` from tiled keys `kt`, following
/// `plan`.
#[inline(always)]
pub fn score(plan: &ScorePlan, q: &[f32], kt: Tiled<'_>, nbrs: &[u32], logits: &mut [f32]) {
    for (starts, slots, count) in &plan.groups {
        score_group(q, kt, starts, slots, *count, logits);
    }
    for &slot in &plan.singles {
        let j = nbrs[slot] as usize;
        let mut acc = 0.0f32;
        for (e, &qe) in q.iter().enumerate() {
            acc = qe.mul_add(kt.at(j, e), acc);
        }
        logits[slot] = acc;
    }
}

/// Two [`score`]s over the same neighbours in one sweep, against the two
/// halves of each row of `rows_t` (a [`Tiled`] table of width `2d`):
/// `a[slot] = x · r_{nbrs[slot]}[..d]` and `b[slot] = y ·
/// r_{nbrs[slot]}[d..]` (the backward's logits and `dO·v`, from keys and
/// values tiled together), the same bits as two [`score`] calls.
///
/// Both halves of a block are read from its one tile, the second at a
/// fixed distance from the first: six pointers per group of blocks, where
/// two tables took twelve, more than the registers hold (every dimension
/// then reloaded spilled pointers). Head dims 16, 24 and 32 (the published
/// models') compile with that distance as a constant; others run the same
/// loop with it at run time.
#[inline(always)]
pub fn score_pair(
    plan: &ScorePlan,
    (x, y): (&[f32], &[f32]),
    rows_t: Tiled<'_>,
    nbrs: &[u32],
    (a, b): (&mut [f32], &mut [f32]),
) {
    let d = x.len();
    assert_eq!(y.len(), d, "score_pair: x and y differ in length");
    match d {
        16 => score_pair_groups::<16, 256>(plan, (x, y), rows_t, (a, b)),
        24 => score_pair_groups::<24, 384>(plan, (x, y), rows_t, (a, b)),
        32 => score_pair_groups::<32, 512>(plan, (x, y), rows_t, (a, b)),
        _ => score_pair_groups_any(plan, (x, y), rows_t, (a, b)),
    }
    for &slot in &plan.singles {
        let j = nbrs[slot] as usize;
        let (mut sx, mut sy) = (0.0f32, 0.0f32);
        for (e, (&xe, &ye)) in x.iter().zip(y).enumerate() {
            sx = xe.mul_add(rows_t.at(j, e), sx);
            sy = ye.mul_add(rows_t.at(j, d + e), sy);
        }
        a[slot] = sx;
        b[slot] = sy;
    }
}

/// The grouped blocks of [`score_pair`] for `D`-long `x` and `y`, whose
/// tiles are `T = 2·D·SLOT_BLOCK` floats (both halves).
#[inline(always)]
fn score_pair_groups<const D: usize, const T: usize>(
    plan: &ScorePlan,
    (x, y): (&[f32], &[f32]),
    rows_t: Tiled<'_>,
    (a, b): (&mut [f32], &mut [f32]),
) {
    const { assert!(T == 2 * D * SLOT_BLOCK) };
    let (x, y): (&[f32; D], &[f32; D]) = (x.try_into().unwrap(), y.try_into().unwrap());
    for (starts, slots, count) in &plan.groups {
        let mut acc_x = [[0.0f32; SLOT_BLOCK]; BLOCK_GROUP];
        let mut acc_y = [[0.0f32; SLOT_BLOCK]; BLOCK_GROUP];
        let tiles: [&[f32; T]; BLOCK_GROUP] =
            std::array::from_fn(|g| rows_t.tile(starts[g], 2 * D).try_into().unwrap());
        for e in 0..D {
            for g in 0..BLOCK_GROUP {
                for u in 0..SLOT_BLOCK {
                    acc_x[g][u] = x[e].mul_add(tiles[g][e * SLOT_BLOCK + u], acc_x[g][u]);
                    acc_y[g][u] = y[e].mul_add(tiles[g][(D + e) * SLOT_BLOCK + u], acc_y[g][u]);
                }
            }
        }
        for g in 0..*count {
            a[slots[g]..slots[g] + SLOT_BLOCK].copy_from_slice(&acc_x[g]);
            b[slots[g]..slots[g] + SLOT_BLOCK].copy_from_slice(&acc_y[g]);
        }
    }
}

/// [`score_pair_groups`] for any length (the same chains, so the same bits).
#[inline(always)]
fn score_pair_groups_any(
    plan: &ScorePlan,
    (x, y): (&[f32], &[f32]),
    rows_t: Tiled<'_>,
    (a, b): (&mut [f32], &mut [f32]),
) {
    let d = x.len();
    for (starts, slots, count) in &plan.groups {
        let mut acc_x = [[0.0f32; SLOT_BLOCK]; BLOCK_GROUP];
        let mut acc_y = [[0.0f32; SLOT_BLOCK]; BLOCK_GROUP];
        let tiles: [&[f32]; BLOCK_GROUP] = std::array::from_fn(|g| rows_t.tile(starts[g], 2 * d));
        for e in 0..d {
            for g in 0..BLOCK_GROUP {
                let kx: &[f32; SLOT_BLOCK] =
                    tiles[g][e * SLOT_BLOCK..][..SLOT_BLOCK].try_into().unwrap();
                let ky: &[f32; SLOT_BLOCK] = tiles[g][(d + e) * SLOT_BLOCK..][..SLOT_BLOCK]
                    .try_into()
                    .unwrap();
                for u in 0..SLOT_BLOCK {
                    acc_x[g][u] = x[e].mul_add(kx[u], acc_x[g][u]);
                    acc_y[g][u] = y[e].mul_add(ky[u], acc_y[g][u]);
                }
            }
        }
        for g in 0..*count {
            a[slots[g]..slots[g] + SLOT_BLOCK].copy_from_slice(&acc_x[g]);
            b[slots[g]..slots[g] + SLOT_BLOCK].copy_from_slice(&acc_y[g]);
        }
    }
}

/// [`score`] of four vectors over the same neighbours in one sweep (the
/// merge backward's `dU[o]·x_j` for its 4 inner channels): `out[o][slot]
/// = xs[o] · xt_{nbrs[slot]}`, `out` being 4 rows of `nbrs.len()`; the same
/// bits as four calls, with each gathered block loaded once.
#[inline(always)]
pub fn score4(plan: &ScorePlan, xs: [&[f32]; 4], xt: Tiled<'_>, nbrs: &[u32], out: &mut [f32]) {
    let m = nbrs.len();
    let d = xs[0].len();
    for (starts, slots, count) in &plan.groups {
        let mut acc = [[[0.0f32; SLOT_BLOCK]; BLOCK_GROUP]; 4];
        let tiles: [&[f32]; BLOCK_GROUP] = std::array::from_fn(|g| xt.tile(starts[g], d));
        for e in 0..d {
            let x = xs.map(|x| x[e]);
            let lanes = e * SLOT_BLOCK..(e + 1) * SLOT_BLOCK;
            for g in 0..BLOCK_GROUP {
                let k: &[f32; SLOT_BLOCK] = tiles[g][lanes.clone()].try_into().unwrap();
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
            let k = xt.at(j, e);
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
    kt: Tiled<'_>,
    starts: &[usize; BLOCK_GROUP],
    slots: &[usize; BLOCK_GROUP],
    count: usize,
    logits: &mut [f32],
) {
    let mut acc = [[0.0f32; SLOT_BLOCK]; BLOCK_GROUP];
    let tiles: [&[f32]; BLOCK_GROUP] = std::array::from_fn(|g| kt.tile(starts[g], q.len()));
    for (e, &qe) in q.iter().enumerate() {
        let lanes = e * SLOT_BLOCK..(e + 1) * SLOT_BLOCK;
        for g in 0..BLOCK_GROUP {
            let k: &[f32; SLOT_BLOCK] = tiles[g][lanes.clone()].try_into().unwrap();
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

/// Rows `rows` of `src` (row-major, `stride` floats a row), their first
/// `width` columns, [`Tiled`] into `out` ([`Tiled::len`] of them; the
/// padding lanes of the last tile are left as they are): row `rows.start`
/// is token 0. For one task's range of rows, small enough to stay in cache
/// (where [`transpose_columns`] copies whole images).
pub fn transpose_rows(
    src: &[f32],
    stride: usize,
    rows: std::ops::Range<usize>,
    width: usize,
    out: &mut [f32],
) {
    if width == 0 {
        return;
    }
    let src = &src[rows.start * stride..rows.end * stride];
    for (tile, rows) in out[..Tiled::len(rows.len(), width)]
        .chunks_exact_mut(width * SLOT_BLOCK)
        .zip(src.chunks(stride * SLOT_BLOCK))
    {
        for (u, row) in rows.chunks_exact(stride).enumerate() {
            for (e, &x) in row[..width].iter().enumerate() {
                tile[e * SLOT_BLOCK + u] = x;
            }
        }
    }
}

/// Column groups of row-major rows, [`Tiled`] as [`score`] reads them:
/// `src` holds `images×n` rows of `stride` floats; the result holds, per
/// image and group, the tiled copy (`Tiled::len(n, width)` floats) of
/// columns `columns[g]..columns[g] + width` (padding lanes zero).
pub fn transpose_columns(
    src: &[f32],
    images: usize,
    n: usize,
    stride: usize,
    columns: &[usize],
    width: usize,
) -> Vec<f32> {
    let per_group = Tiled::len(n, width);
    let len = images * columns.len() * per_group;
    // Written once each below, so not zeroed first (a fill as long as the
    // copy itself).
    let mut out = Vec::with_capacity(len);
    if len == 0 {
        return out;
    }
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(per_group)
        .enumerate()
        .for_each(|(img_group, dst)| {
            let (img, first) = (
                img_group / columns.len(),
                columns[img_group % columns.len()],
            );
            let src = &src[img * n * stride..(img + 1) * n * stride];
            for (t, tile) in dst.chunks_exact_mut(width * SLOT_BLOCK).enumerate() {
                let rows = &src[t * SLOT_BLOCK * stride..n.min((t + 1) * SLOT_BLOCK) * stride];
                let real = rows.len() / stride;
                for e in 0..width {
                    let lanes = &mut tile[e * SLOT_BLOCK..(e + 1) * SLOT_BLOCK];
                    for (x, row) in lanes.iter_mut().zip(rows.chunks_exact(stride)) {
                        x.write(row[first + e]);
                    }
                    for x in &mut lanes[real..] {
                        x.write(0.0);
                    }
                }
            }
        });
    // SAFETY: the chunks tile `0..len` (`len` is a multiple of
    // `per_group`, itself a multiple of the tile's `width·SLOT_BLOCK`), and
    // each tile's lanes are written for every `e < width`: the real rows'
    // lanes from `src`, the rest zero.
    unsafe { out.set_len(len) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shape around the tiles of 8: rows and widths below, at and
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
            (4, 0, 2, 1),
        ] {
            let src: Vec<f32> = (0..(first + rows) * stride).map(|x| x as f32).collect();
            let mut out = vec![f32::NAN; Tiled::len(rows, width)];
            transpose_rows(&src, stride, first..first + rows, width, &mut out);
            let tiled = Tiled::new(&out, width);
            for j in 0..rows {
                for e in 0..width {
                    assert_eq!(
                        tiled.at(j, e),
                        src[(first + j) * stride + e],
                        "{rows}×{width}: ({j}, {e})"
                    );
                }
            }
        }
    }

    /// Every element of the result as defined, for column groups of
    /// several widths (rows past a multiple of the tile, several images);
    /// the padding is zero.
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
            let src: Vec<f32> = (0..images * n * stride).map(|x| 1.0 + x as f32).collect();
            let out = transpose_columns(&src, images, n, stride, &columns, width);
            let per_group = Tiled::len(n, width);
            assert_eq!(out.len(), images * columns.len() * per_group);
            for img in 0..images {
                for (g, &first) in columns.iter().enumerate() {
                    let at = (img * columns.len() + g) * per_group;
                    let tiled = Tiled::new(&out[at..at + per_group], width);
                    for e in 0..width {
                        for j in 0..n.next_multiple_of(SLOT_BLOCK) {
                            let want = if j < n {
                                src[(img * n + j) * stride + first + e]
                            } else {
                                0.0
                            };
                            assert_eq!(tiled.at(j, e), want, "image {img}, group {g}, ({e}, {j})");
                        }
                    }
                }
            }
        }
    }

    /// Neighbour lists mixing the plan's cases: whole tiles (grouped, more
    /// than one group), blocks of contiguous tokens across two tiles, short
    /// and scattered slots. Every score has the bits of the plain chain
    /// `Σ_e x_e·k_e` in order, whichever way the plan scored it; and the
    /// pair and the four-vector sweeps give each output its own bits, for
    /// every head dim the pair's loop is compiled for and one other.
    #[test]
    fn scores_are_the_plain_chains_however_planned() {
        // The lengths score_pair compiles as constants, and one it does not.
        for d in [16, 24, 32, 33] {
            let n = 96;
            let rows = values(n * 2 * d, 5);
            let table = transpose_columns(&rows, 1, n, 2 * d, &[0], 2 * d);
            let keys = Tiled::new(&table, 2 * d);
            let lists: [Vec<u32>; 3] = [
                // Seven whole tiles (two groups), then a block across tiles 1 and 2.
                [40, 0, 8, 88, 16, 24, 56, 12]
                    .iter()
                    .flat_map(|&s| s..s + 8)
                    .collect(),
                // A tile, three scattered slots, a tile: the second is no block.
                (48..56).chain([3, 70, 9]).chain(64..72).collect(),
                vec![95, 0, 17],
            ];
            let chain = |x: &[f32], k: &[f32], j: u32| {
                (0..d).fold(0.0f32, |a, e| x[e].mul_add(k[j as usize * 2 * d + e], a))
            };
            let vs: Vec<Vec<f32>> = (0..4).map(|s| values(d, 10 + s)).collect();
            let mut plan = ScorePlan::default();
            // (groups, single slots) each list makes.
            for (nbrs, planned) in lists.iter().zip([(2, 8), (1, 11), (0, 3)]) {
                plan.build(nbrs);
                assert_eq!((plan.groups.len(), plan.singles.len()), planned, "{nbrs:?}");
                let m = nbrs.len();
                let key_chain =
                    |x: &[f32]| nbrs.iter().map(|&j| chain(x, &rows, j)).collect::<Vec<_>>();
                let value_chain = |y: &[f32]| {
                    nbrs.iter()
                        .map(|&j| chain(y, &rows[d..], j))
                        .collect::<Vec<_>>()
                };
                let mut logits = vec![f32::NAN; m];
                score(&plan, &vs[0], keys, nbrs, &mut logits);
                assert_eq!(bits(&logits), bits(&key_chain(&vs[0])), "score, {nbrs:?}");
                let (mut a, mut b) = (vec![f32::NAN; m], vec![f32::NAN; m]);
                score_pair(&plan, (&vs[0], &vs[1]), keys, nbrs, (&mut a, &mut b));
                assert_eq!(
                    bits(&a),
                    bits(&key_chain(&vs[0])),
                    "score_pair keys, d = {d}"
                );
                assert_eq!(
                    bits(&b),
                    bits(&value_chain(&vs[1])),
                    "score_pair values, d = {d}"
                );
                let mut four = vec![f32::NAN; 4 * m];
                let xs: [&[f32]; 4] = std::array::from_fn(|o| &vs[o][..]);
                score4(&plan, xs, keys, nbrs, &mut four);
                for (o, x) in xs.iter().enumerate() {
                    assert_eq!(
                        bits(&four[o * m..(o + 1) * m]),
                        bits(&key_chain(x)),
                        "score4 {o}"
                    );
                }
            }
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
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
