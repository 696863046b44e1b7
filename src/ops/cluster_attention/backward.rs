//! The backward of [`super::cluster_attention`] on the CPU.
//!
//! The softmax is recomputed from the log-sum-exp the forward saves
//! ([`super::cluster_attention_with_lse`]): with `p = e^(a − lse)`,
//! `D = dO·O` (the blank token's share included, since `O` holds it),
//! `da = p·(dO·v − D)`. Queries are taken in tiles of at most
//! [`TILE_FLOATS`] values of `p` and `da` (a bounded scratch, never the
//! whole b×h×n×m tensor), and for each tile:
//! 1. by query: the logits and `dO·v` scored as the forward scores (blocks
//!    of cluster members, keys and values tiled together), `p` and `da`
//!    computed per head, then stored in the tile by slot (every head's `p`
//!    and `da` of one slot side by side, so pass 2 reads them together),
//!    `dq = scale · (Σ_j da_j k_j + da_blank · blank_k)`, and the
//!    position-bias weights and bias (one multiply-add per slot with a row
//!    of offset features), `blank_k` and `blank_v` (a few values shared by
//!    every query) in partial sums over fixed chunks of queries, added in
//!    chunk order;
//! 2. by key: `dk_j += scale · Σ da · q` and `dv_j += Σ p · dO` in one pass
//!    over the tile's queries whose neighbourhood holds `j`: a gather over
//!    [`InverseNeighbourhood`] lists, so no two threads write one row. Two
//!    keys of one cluster, which the same queries hold at adjacent slots,
//!    share that pass (each query's `q` and `dO` loaded once for both).
//!
//! Every sum runs in an order fixed by the inputs alone, so gradients are
//! the same bits for any number of threads.

use multiversion::multiversion;
use rayon::prelude::*;

use super::{AttentionInputs, KEYS_AND_VALUES, MASKED_LOGIT, check_inputs, transpose_heads};
use crate::error::{Error, Result, check_len};
use crate::ops::gather::{ScorePlan, Tiled, gather_weighted_sum, score_pair};
use crate::ops::neighbourhood::InverseNeighbourhood;
use crate::ops::rel_pos::OffsetTable;
use crate::ops::vector_math::{LANES, axpy, dot, exp};

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

/// The most floats of `p` and `da` a tile keeps: 512 Ki (2 MiB), whatever
/// the batch, so that pass 2 reads them back from cache (L2 or L3). Smaller
/// tiles measured slower at the aff_tiny stage-0 shape (more passes, more
/// keys split between tiles), larger ones no faster.
pub const TILE_FLOATS: usize = 1 << 19;

/// The gradients of [`super::cluster_attention`] (see the module).
///
/// # Errors
/// [`Error::Shape`] when the inputs disagree with the forward's or with
/// each other; [`Error::InvalidArgument`] for an inverse that is not over
/// the forward's tokens.
pub fn cluster_attention_backward(g: &AttentionGradInputs<'_>) -> Result<AttentionGrads> {
    cluster_attention_backward_tiled(g, TILE_FLOATS)
}

/// [`cluster_attention_backward`] with tiles of at most `tile_floats`
/// values of `p` and `da` (at least one chunk of queries): for tests of the
/// tiling. The key and value gradients add one partial sum per tile, so
/// their last bits depend on the tile size; the rest does not.
///
/// # Errors
/// As [`cluster_attention_backward`].
#[doc(hidden)]
pub fn cluster_attention_backward_tiled(
    g: &AttentionGradInputs<'_>,
    tile_floats: usize,
) -> Result<AttentionGrads> {
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
    let ctx = Context {
        g,
        features: position_features(g.offsets),
        kv_t: transpose_heads(inp.kv, b, n, h, d, KEYS_AND_VALUES),
    };

    // Whole chunks per tile, so the chunks (and the partial sums) are the
    // same whatever the tile size.
    let per_row = (2 * h * m).max(1);
    let tile_rows = (tile_floats / per_row / ROWS_PER_CHUNK).max(1) * ROWS_PER_CHUNK;
    let mut values = vec![0.0f32; tile_rows.min(b * n) * per_row];
    let mut partials: Vec<Vec<f32>> = Vec::new();
    for first in (0..b * n).step_by(tile_rows) {
        let tile = Tile {
            first,
            end: (first + tile_rows).min(b * n),
        };
        let rows = tile.end - first;
        // Pass 1, by query: dq, p and da, and the parameters' partial sums.
        let dq = &mut grads.q[first * c..tile.end * c];
        partials.par_extend(
            dq.par_chunks_mut(c * ROWS_PER_CHUNK)
                .zip(values[..rows * per_row].par_chunks_mut(per_row * ROWS_PER_CHUNK))
                .enumerate()
                .map_init(QueryScratch::default, |scratch, (chunk, (dq, values))| {
                    let first_row = first + chunk * ROWS_PER_CHUNK;
                    query_chunk(&ctx, first_row, dq, values, scratch)
                }),
        );
        // Pass 2, by key of the images the tile touches: dk and dv gathered
        // from the tile's queries that hold it.
        let (img0, img1) = (first / n, (tile.end - 1) / n + 1);
        let key_ranges = touched_keys(inp, tile, img0..img1);
        let tile_data = TileData {
            tile,
            values: &values,
        };
        // Only the keys in range: (image, first key, their rows of dkv).
        let mut rest = &mut grads.kv[img0 * n * 2 * c..img1 * n * 2 * c];
        let mut spans = Vec::with_capacity(key_ranges.len());
        for (img, keys) in (img0..).zip(&key_ranges) {
            let (image, tail) = rest.split_at_mut(n * 2 * c);
            rest = tail;
            if !keys.is_empty() {
                // From an even key, so that the pairs of keys pass 2 takes
                // together are pairs within clusters (which start at even
                // tokens whenever the cluster size is even).
                let start = keys.start & !1;
                spans.push((img, start, &mut image[start * 2 * c..keys.end * 2 * c]));
            }
        }
        spans.into_par_iter().for_each(|(img, first_key, dkv)| {
            dkv.par_chunks_mut(KEYS_PER_TASK * 2 * c)
                .enumerate()
                .for_each(|(k, dkv)| {
                    key_gather(&ctx, &tile_data, img, first_key + KEYS_PER_TASK * k, dkv)
                });
        });
    }
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
    Ok(grads)
}

/// For each image of `images`, the range of keys that the tile's queries
/// in it hold: pass 2 skips the others without reading their lists.
fn touched_keys(
    inp: &AttentionInputs<'_>,
    tile: Tile,
    images: std::ops::Range<usize>,
) -> Vec<std::ops::Range<usize>> {
    let n = inp.tokens;
    images
        .map(|img| {
            let rows = tile.first.max(img * n)..tile.end.min((img + 1) * n);
            let (lo, hi) = rows
                .into_par_iter()
                .map(|row| {
                    let nbrs = inp.nbhd.of(img, row - img * n);
                    let lo = nbrs.iter().fold(u32::MAX, |a, &j| a.min(j));
                    (lo, nbrs.iter().fold(0, |a, &j| a.max(j + 1)))
                })
                .reduce(|| (u32::MAX, 0), |a, b| (a.0.min(b.0), a.1.max(b.1)));
            lo as usize..hi as usize
        })
        .collect()
}

/// Lanes of a [`position_features`] row.
const FEATURE_LANES: usize = 8;

/// Per bias-table row, what the position bias `P_t(f) = w_t·f + b_t` is
/// differentiated by: the five offset features and 1 (for the bias), padded
/// to [`FEATURE_LANES`], so that one multiply-add per slot accumulates all
/// six gradients (a row load, not six gathers).
fn position_features(offsets: &OffsetTable) -> Vec<[f32; FEATURE_LANES]> {
    let features: [&[f32]; 5] = std::array::from_fn(|k| offsets.feature(k));
    (0..offsets.len())
        .map(|r| {
            let mut row = [0.0; FEATURE_LANES];
            for (v, f) in row.iter_mut().zip(&features) {
                *v = f[r];
            }
            row[5] = 1.0;
            row
        })
        .collect()
}

/// What both passes read.
struct Context<'a> {
    g: &'a AttentionGradInputs<'a>,
    /// Per bias-table row: [`position_features`].
    features: Vec<[f32; FEATURE_LANES]>,
    /// Keys and values tiled as the forward scores them, per image and
    /// head, the values after the keys in each tile
    /// ([`super::transpose_heads`]: one copy, as each head's key and value
    /// are adjacent in a kv row).
    kv_t: Vec<f32>,
}

/// Query rows `first..end` (flattened over the batch).
#[derive(Clone, Copy)]
struct Tile {
    first: usize,
    end: usize,
}

/// A tile's `p` and `da`, per row `[slot][t][p, da]`: pass 2 reads one
/// pair's values for every head from one place (one cache line), and the
/// next key of a cluster, which the same queries hold in the next slot,
/// reads the next `2h` floats.
struct TileData<'a> {
    tile: Tile,
    values: &'a [f32],
}

#[derive(Default)]
struct QueryScratch {
    plan: ScorePlan,
    query: Vec<f32>,
    /// One head's logits, then `p`, per slot.
    p: Vec<f32>,
    /// One head's `dO·v`, then `da`, per slot.
    da: Vec<f32>,
}

/// Pass 1 over rows `first_row..` (one chunk): their `dq`, `p` and `da`
/// (the tile's rows, [`TileData`]'s layout); returns the chunk's partial sums
/// `[pos_weight h×5 | pos_bias h | blank_k c | blank_v c]`.
#[multiversion(targets = "simd")]
fn query_chunk(
    ctx: &Context<'_>,
    first_row: usize,
    dq: &mut [f32],
    values: &mut [f32],
    scratch: &mut QueryScratch,
) -> Vec<f32> {
    let inp = ctx.g.forward;
    let (h, d) = (inp.heads, inp.head_dim);
    let (c, m) = (h * d, inp.nbhd.size);
    scratch.query.resize(d, 0.0);
    scratch.p.resize(m, 0.0);
    scratch.da.resize(m, 0.0);
    let mut part = vec![0.0f32; 6 * h + 2 * c];
    for (r, (dq, values)) in dq
        .chunks_exact_mut(c)
        // As the caller sized them: at least one float per row, even with no slots.
        .zip(values.chunks_exact_mut((2 * h * m).max(1)))
        .enumerate()
    {
        query_backward(ctx, first_row + r, (dq, values), &mut part, scratch);
    }
    part
}

/// Pass 1 for query row `row`: `dq`, and its `p` and `da` per head and
/// slot (`values`, [`TileData`]'s row); its shares of the parameter
/// gradients are added to `part`.
#[inline(always)]
fn query_backward(
    ctx: &Context<'_>,
    row: usize,
    (dq, values): (&mut [f32], &mut [f32]),
    part: &mut [f32],
    scratch: &mut QueryScratch,
) {
    let inp = ctx.g.forward;
    let (n, h, d) = (inp.tokens, inp.heads, inp.head_dim);
    let c = h * d;
    let m = inp.nbhd.size;
    let (img, i) = (row / n, row % n);
    let kv = &inp.kv[img * n * 2 * c..(img + 1) * n * 2 * c];
    let nbrs = inp.nbhd.of(img, i);
    let mask = inp.nbhd.mask_of(img, i);
    let rows = &inp.bias_rows[row * m..(row + 1) * m];
    let q = &inp.q[row * c..(row + 1) * c];
    let go_row = &ctx.g.grad_out[row * c..(row + 1) * c];
    let table_rows = inp.bias_table.len() / h;
    let (pw_bias, rest) = part.split_at_mut(6 * h);
    let (pos_weight, pos_bias) = pw_bias.split_at_mut(5 * h);
    let (blank_k, blank_v) = rest.split_at_mut(c);
    scratch.plan.build(nbrs);
    for t in 0..h {
        let qs = &mut scratch.query[..];
        for (s, &v) in qs.iter_mut().zip(&q[t * d..(t + 1) * d]) {
            *s = v * inp.q_scale;
        }
        let qs = &scratch.query[..];
        let go = &go_row[t * d..(t + 1) * d];
        // The head's keys and values, tiled together (the values follow
        // the keys in each tile).
        let per_head = Tiled::len(n, 2 * d);
        let keys = Tiled::new(&ctx.kv_t[(img * h + t) * per_head..][..per_head], 2 * d);
        let (p, da) = (&mut scratch.p[..], &mut scratch.da[..]);
        // Logits into `p`, dO·v into `da` (one sweep), then p and da in
        // place (in separate loops, so that each vectorises).
        score_pair(&scratch.plan, (qs, go), keys, nbrs, (&mut *p, &mut *da));
        let bias = &inp.bias_table[t * table_rows..(t + 1) * table_rows];
        for (a, &r) in p.iter_mut().zip(rows) {
            // SAFETY: `check_inputs` checked every bias row against the
            // table's row count; unchecked, this gather vectorises.
            *a += unsafe { *bias.get_unchecked(r as usize) };
        }
        if let Some(mask) = mask {
            for (a, &valid) in p.iter_mut().zip(mask) {
                *a += if valid { 0.0 } else { MASKED_LOGIT };
            }
        }
        let lse = ctx.g.lse[row * h + t];
        // D = dO·O, here where dO is read anyway (not a pass of its own).
        let delta = dot(go, &ctx.g.out[row * c + t * d..row * c + (t + 1) * d]);
        for (p, da) in p.iter_mut().zip(da.iter_mut()) {
            *p = exp(*p - lse);
            *da = *p * (*da - delta);
        }
        for (slot, (&p, &da)) in values.chunks_exact_mut(2 * h).zip(p.iter().zip(da.iter())) {
            slot[2 * t] = p;
            slot[2 * t + 1] = da;
        }
        let da = &scratch.da[..];
        let dq_t = &mut dq[t * d..(t + 1) * d];
        // Key of token j: kv[j·2c + t·2d ..][..d].
        gather_weighted_sum(da, nbrs, &kv[t * 2 * d..], 2 * c, dq_t);
        let (bk, bv) = (
            &inp.blank_k[t * d..(t + 1) * d],
            &inp.blank_v[t * d..(t + 1) * d],
        );
        let p_blank = exp(dot(qs, bk) - lse);
        let da_blank = p_blank * (dot(go, bv) - delta);
        axpy(da_blank, bk, dq_t);
        for v in dq_t.iter_mut() {
            *v *= inp.q_scale;
        }
        axpy(da_blank, qs, &mut blank_k[t * d..(t + 1) * d]);
        axpy(p_blank, go, &mut blank_v[t * d..(t + 1) * d]);
        // Position bias: P_t(f) = w_t·f + b_t per table row. Even and odd
        // slots in two sums (two chains of multiply-adds, not one), added
        // at the end.
        let feature = |r: u32| {
            // SAFETY: `check_inputs` checked every bias row against the
            // table's row count, which the features have (checked against
            // `offsets`).
            unsafe { ctx.features.get_unchecked(r as usize) }
        };
        let (mut even, mut odd) = ([0.0f32; FEATURE_LANES], [0.0f32; FEATURE_LANES]);
        for (da, r) in da.chunks_exact(2).zip(rows.chunks_exact(2)) {
            let (f0, f1) = (feature(r[0]), feature(r[1]));
            for l in 0..FEATURE_LANES {
                even[l] = da[0].mul_add(f0[l], even[l]);
                odd[l] = da[1].mul_add(f1[l], odd[l]);
            }
        }
        if m % 2 == 1 {
            let f = feature(rows[m - 1]);
            for l in 0..FEATURE_LANES {
                even[l] = da[m - 1].mul_add(f[l], even[l]);
            }
        }
        let acc: [f32; FEATURE_LANES] = std::array::from_fn(|l| even[l] + odd[l]);
        for (w, &a) in pos_weight[t * 5..(t + 1) * 5].iter_mut().zip(&acc) {
            *w += a;
        }
        pos_bias[t] += acc[5];
    }
}

/// Keys that pass 2 takes at once: two keys of one cluster are held by the
/// same queries at adjacent slots ("twins"), so one pass over those queries
/// serves both, each `q` and `dO` row loaded once for the two.
const KEYS_PER_TASK: usize = 2;

/// Pass 2 for keys `j..` of image `img` (as many as `dkv` holds, at most
/// [`KEYS_PER_TASK`]): adds to their `dk` and `dv` (in `dkv`, the forward's
/// kv layout) the shares of the tile's queries that hold them.
#[multiversion(targets = "simd")]
fn key_gather(ctx: &Context<'_>, tile: &TileData<'_>, img: usize, j: usize, dkv: &mut [f32]) {
    let inp = ctx.g.forward;
    let (h, d) = (inp.heads, inp.head_dim);
    let c = h * d;
    let (first, second) = dkv.split_at_mut((2 * c).min(dkv.len()));
    let sweep = KeySweep::new(ctx, tile, img, j);
    let next = if second.is_empty() {
        None
    } else {
        KeySweep::new(ctx, tile, img, j + 1)
    };
    if let (Some(sweep), Some(next)) = (&sweep, &next)
        && d.is_multiple_of(2 * LANES)
        && sweep.twin(next)
    {
        return sweep.add_twins(h, d, inp.q_scale, dkv);
    }
    // Every head in one pass over the pairs where the row is a few blocks
    // of LANES, each within one head (the published stage-0 shapes).
    let blocks = if d % LANES == 0 { c / LANES } else { 0 };
    for (sweep, dkv) in [(sweep, first), (next, second)] {
        let Some(sweep) = sweep else {
            continue;
        };
        match blocks {
            1 => sweep.add_heads::<1>(inp.q_scale, dkv),
            2 => sweep.add_heads::<2>(inp.q_scale, dkv),
            3 => sweep.add_heads::<3>(inp.q_scale, dkv),
            4 => sweep.add_heads::<4>(inp.q_scale, dkv),
            _ => sweep.add_by_head(h, d, inp.q_scale, dkv),
        }
    }
}

/// One key's pairs in a tile, and what their shares read.
struct KeySweep<'a> {
    pairs: &'a [(u32, u32)],
    /// The tile's `p` and `da` ([`TileData`]).
    values: &'a [f32],
    /// The image's query 0 as a row flattened over the batch (query `i` is
    /// row `row0 + i`, which the tile holds from row `first`).
    row0: usize,
    first: usize,
    m: usize,
    heads: usize,
    /// The image's queries and output gradients (n×c).
    q: &'a [f32],
    grad_out: &'a [f32],
    c: usize,
}

impl<'a> KeySweep<'a> {
    /// The tile's pairs that hold key `j` of image `img`, or `None` when
    /// there are none.
    #[inline(always)]
    fn new(ctx: &'a Context<'_>, tile: &'a TileData<'_>, img: usize, j: usize) -> Option<Self> {
        let inp = ctx.g.forward;
        let (n, c) = (inp.tokens, inp.heads * inp.head_dim);
        // The pairs are in ascending query order: the tile's are one run.
        let pairs = ctx.g.inverse.of(img, j);
        let in_tile = |&(i, _): &(u32, u32)| {
            (tile.tile.first..tile.tile.end).contains(&(img * n + i as usize))
        };
        // Most keys' lists lie in one tile: then no search.
        let whole = pairs.first().is_some_and(in_tile) && pairs.last().is_some_and(in_tile);
        let pairs = if whole {
            pairs
        } else {
            let lo = pairs.partition_point(|&(i, _)| img * n + (i as usize) < tile.tile.first);
            let hi = pairs.partition_point(|&(i, _)| img * n + (i as usize) < tile.tile.end);
            &pairs[lo..hi]
        };
        (!pairs.is_empty()).then(|| Self {
            pairs,
            values: tile.values,
            row0: img * n,
            first: tile.tile.first,
            m: inp.nbhd.size,
            heads: inp.heads,
            q: &inp.q[img * n * c..(img + 1) * n * c],
            grad_out: &ctx.g.grad_out[img * n * c..(img + 1) * n * c],
            c,
        })
    }

    /// Whether `next` (the next key's sweep) is held by the same queries
    /// in the same order, each at the next slot: the two keys are then
    /// members of one cluster.
    #[inline(always)]
    fn twin(&self, next: &Self) -> bool {
        self.pairs.len() == next.pairs.len()
            && self
                .pairs
                .iter()
                .zip(next.pairs)
                .all(|(&(i, slot), &(i_next, slot_next))| i == i_next && slot_next == slot + 1)
    }

    /// [`Self::add`] for every head at once, the row being `B` blocks of
    /// [`LANES`] columns, each within one head (`d` a multiple of
    /// [`LANES`]): one pass over the pairs, each pair's values for every
    /// head read together and its `q` and `dO` rows whole, `2B` blocks of
    /// sums in registers. Every element is the same chain over the pairs as
    /// in [`Self::add`], so the same bits.
    #[inline(always)]
    fn add_heads<const B: usize>(&self, scale: f32, dkv: &mut [f32]) {
        let (h, c) = (self.heads, self.c);
        let d = c / h;
        debug_assert!(B * LANES == c && d % LANES == 0);
        let head: [usize; B] = std::array::from_fn(|b| b * LANES / d);
        let (mut ak, mut av) = ([[0.0f32; LANES]; B], [[0.0f32; LANES]; B]);
        for &(i, slot) in self.pairs {
            let i = i as usize;
            let at = ((self.row0 + i - self.first) * self.m + slot as usize) * h * 2;
            let values = &self.values[at..at + 2 * h];
            let q = &self.q[i * c..(i + 1) * c];
            let go = &self.grad_out[i * c..(i + 1) * c];
            for b in 0..B {
                let (p, da) = (values[2 * head[b]], values[2 * head[b] + 1]);
                let q: &[f32; LANES] = q[b * LANES..(b + 1) * LANES].try_into().unwrap();
                let go: &[f32; LANES] = go[b * LANES..(b + 1) * LANES].try_into().unwrap();
                for l in 0..LANES {
                    ak[b][l] = da.mul_add(q[l], ak[b][l]);
                    av[b][l] = p.mul_add(go[l], av[b][l]);
                }
            }
        }
        for b in 0..B {
            // Block b is dimensions e.. of head t: its key at t·2d + e in
            // the kv row, its value d further.
            let (t, e) = (head[b], b * LANES - head[b] * d);
            let (dk, dv) = dkv[t * 2 * d + e..].split_at_mut(d);
            for l in 0..LANES {
                // The scale belongs to the logit: d(q·k·scale)/dk = scale·q.
                dk[l] += scale * ak[b][l];
                dv[l] += av[b][l];
            }
        }
    }

    /// The general case, head by head: [`Self::add`] over blocks of
    /// 2·[`LANES`], [`LANES`], then 1 dimension (every element is one chain
    /// over the pairs in order, whatever the block).
    #[inline(always)]
    fn add_by_head(&self, h: usize, d: usize, scale: f32, dkv: &mut [f32]) {
        for t in 0..h {
            let (dk, dv) = dkv[t * 2 * d..(t + 1) * 2 * d].split_at_mut(d);
            let mut e = 0;
            while e + 2 * LANES <= d {
                self.add::<{ 2 * LANES }>(t, t * d + e, scale, &mut dk[e..], &mut dv[e..]);
                e += 2 * LANES;
            }
            if e + LANES <= d {
                self.add::<LANES>(t, t * d + e, scale, &mut dk[e..], &mut dv[e..]);
                e += LANES;
            }
            while e < d {
                self.add::<1>(t, t * d + e, scale, &mut dk[e..], &mut dv[e..]);
                e += 1;
            }
        }
    }

    /// [`Self::add_by_head`] for this key and its [`Self::twin`] (whose row
    /// follows in `dkv`), `d` a multiple of 2·[`LANES`]: per head and block
    /// of 2·[`LANES`] dimensions, one pass over the pairs for both keys,
    /// each pair's `q` and `dO` loaded once for the two (a load per
    /// multiply-add, where one key alone needs one and a half). The sums
    /// are named variables, not arrays (arrays this large stay in memory),
    /// each element the same chain over the pairs as in [`Self::add`].
    #[inline(always)]
    fn add_twins(&self, h: usize, d: usize, scale: f32, dkv: &mut [f32]) {
        const L: usize = LANES;
        let c = h * d;
        debug_assert!(d.is_multiple_of(2 * L) && dkv.len() == 2 * 2 * c);
        let fma = |acc: &mut [f32; L], w: f32, x: &[f32]| {
            for l in 0..L {
                acc[l] = w.mul_add(x[l], acc[l]);
            }
        };
        for t in 0..h {
            for e in (0..d).step_by(2 * L) {
                let col = t * d + e;
                let zero = [0.0f32; L];
                // (key 0 | key 1) × (k | v) × (first | second block of L).
                let (mut k00, mut k01, mut v00, mut v01) = (zero, zero, zero, zero);
                let (mut k10, mut k11, mut v10, mut v11) = (zero, zero, zero, zero);
                for &(i, slot) in self.pairs {
                    let i = i as usize;
                    // Slot `slot + 1` (the twin's) follows, 2h floats on.
                    let at = (((self.row0 + i - self.first) * self.m + slot as usize) * h + t) * 2;
                    let pd = &self.values[at..at + 2 * h + 2];
                    let (p0, da0, p1, da1) = (pd[0], pd[1], pd[2 * h], pd[2 * h + 1]);
                    let q: &[f32; 2 * L] = self.q[i * c + col..][..2 * L].try_into().unwrap();
                    let go: &[f32; 2 * L] =
                        self.grad_out[i * c + col..][..2 * L].try_into().unwrap();
                    let (q0, q1) = q.split_at(L);
                    let (go0, go1) = go.split_at(L);
                    fma(&mut k00, da0, q0);
                    fma(&mut k01, da0, q1);
                    fma(&mut v00, p0, go0);
                    fma(&mut v01, p0, go1);
                    fma(&mut k10, da1, q0);
                    fma(&mut k11, da1, q1);
                    fma(&mut v10, p1, go0);
                    fma(&mut v11, p1, go1);
                }
                for (key, sums) in [[k00, k01, v00, v01], [k10, k11, v10, v11]]
                    .iter()
                    .enumerate()
                {
                    // The head's key at t·2d in the kv row, its value d further.
                    let (dk, dv) = dkv[key * 2 * c + t * 2 * d + e..].split_at_mut(d);
                    for l in 0..L {
                        // The scale belongs to the logit: d(q·k·scale)/dk = scale·q.
                        dk[l] += scale * sums[0][l];
                        dk[L + l] += scale * sums[1][l];
                        dv[l] += sums[2][l];
                        dv[L + l] += sums[3][l];
                    }
                }
            }
        }
    }

    /// `dk[..W] += scale · Σ da · q[col..]`, `dv[..W] += Σ p · dO[col..]`
    /// over the pairs, for head `t`: the two sums share one pass over the
    /// pairs and keep `2W` floats in registers.
    #[inline(always)]
    fn add<const W: usize>(
        &self,
        t: usize,
        col: usize,
        scale: f32,
        dk: &mut [f32],
        dv: &mut [f32],
    ) {
        let (mut ak, mut av) = ([0.0f32; W], [0.0f32; W]);
        for &(i, slot) in self.pairs {
            let i = i as usize;
            let at = (((self.row0 + i - self.first) * self.m + slot as usize) * self.heads + t) * 2;
            let (p, da) = (self.values[at], self.values[at + 1]);
            let q: &[f32; W] = self.q[i * self.c + col..][..W].try_into().unwrap();
            let go: &[f32; W] = self.grad_out[i * self.c + col..][..W].try_into().unwrap();
            for l in 0..W {
                ak[l] = da.mul_add(q[l], ak[l]);
                av[l] = p.mul_add(go[l], av[l]);
            }
        }
        for l in 0..W {
            // The scale belongs to the logit: d(q·k·scale)/dk = scale·q.
            dk[l] += scale * ak[l];
            dv[l] += av[l];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// Deterministic values in [-1, 1), from the crate's one generator.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        SplitMix64(seed).floats(len, 1.0)
    }

    /// Two twin keys' sums in one pass are the same bits as each key's
    /// own pass, through either single-key path.
    #[test]
    fn twin_keys_get_the_bits_of_their_own_passes() {
        let (h, d, m, queries) = (2, 32, 5, 7);
        let c = h * d;
        let (q, grad_out) = (values(queries * c, 3), values(queries * c, 4));
        // The tile's p and da per [row][slot][head], rows 2.. of the tile.
        let (first, row0) = (10, 12);
        let tile_values = values((row0 - first + queries) * m * h * 2, 5);
        let key = [(0, 1), (2, 0), (3, 3), (6, 2)];
        let twin: Vec<(u32, u32)> = key.iter().map(|&(i, s)| (i, s + 1)).collect();
        let sweep = |pairs| KeySweep {
            pairs,
            values: &tile_values,
            row0,
            first,
            m,
            heads: h,
            q: &q,
            grad_out: &grad_out,
            c,
        };
        let (a, b) = (sweep(&key), sweep(&twin));
        assert!(a.twin(&b) && !b.twin(&a));
        let start = values(2 * 2 * c, 6);
        let scale = 0.17;
        let mut together = start.clone();
        a.add_twins(h, d, scale, &mut together);
        for single in 0..2 {
            let mut apart = start.clone();
            let (first_key, second_key) = apart.split_at_mut(2 * c);
            for (sweep, dkv) in [(&a, first_key), (&b, second_key)] {
                if single == 0 {
                    sweep.add_by_head(h, d, scale, dkv);
                } else {
                    sweep.add_heads::<4>(scale, dkv);
                }
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&together), bits(&apart), "single-key path {single}");
        }
        assert_ne!(together, start);
    }
}
