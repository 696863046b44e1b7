//! Each op against a plain-loop reference (f64 where sums are involved), and
//! the properties the spec promises, on random inputs of awkward sizes.

use autofocus::io::F32Buffer;
use autofocus::model::ClusterLayout;
use autofocus::ops::cluster_attention::{AttentionInputs, MASKED_LOGIT, cluster_attention};
use autofocus::ops::clustering::{KeyScope, grid_positions, space_filling_cluster};
use autofocus::ops::neighbourhood::{Neighbourhood, nearest_clusters};
use autofocus::ops::pointconv_merge::{
    INNER_CHANNELS, MergeInputs, pointconv_merge, weight_net_table,
};
use autofocus::ops::rel_pos::{OffsetTable, neighbour_rows, rel_pos_features};
use autofocus::ops::token_selection::select_tokens;
use autofocus::ops::{LayerNorm, Linear};
use proptest::prelude::*;

/// A small deterministic generator for test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn vec(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.f32()).collect()
    }
}

/// A random subset of an h×w grid (at least `min` tokens), per image.
fn random_positions(rng: &mut Rng, batch: usize, h: usize, w: usize, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(batch * n * 2);
    for _ in 0..batch {
        let mut cells: Vec<usize> = (0..h * w).collect();
        for i in 0..n {
            let j = i + rng.below(h * w - i);
            cells.swap(i, j);
        }
        for &t in &cells[..n] {
            out.extend([(t % w) as f32, (t / w) as f32]);
        }
    }
    out
}

fn assert_all_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol * w.abs().max(1.0),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

/// Plain-loop cluster attention in f64 (spec §6).
#[allow(clippy::too_many_arguments)]
fn attention_reference(
    q: &[f32],
    kv: &[f32],
    pos: &[f32],
    nbhd: &Neighbourhood,
    bias: impl Fn(usize, [f32; 5]) -> f64,
    blank_k: &[f32],
    blank_v: &[f32],
    (b, n, h, d): (usize, usize, usize, usize),
) -> Vec<f64> {
    let c = h * d;
    let mut out = vec![0.0; b * n * c];
    for img in 0..b {
        for i in 0..n {
            let row = img * n + i;
            for t in 0..h {
                let qt = &q[row * c + t * d..][..d];
                let nbrs = nbhd.of(img, i);
                let mask = nbhd.mask_of(img, i);
                let mut logits: Vec<f64> = nbrs
                    .iter()
                    .enumerate()
                    .map(|(slot, &j)| {
                        let j = img * n + j as usize;
                        let key = &kv[j * 2 * c + t * 2 * d..][..d];
                        let dot: f64 = qt.iter().zip(key).map(|(&a, &k)| a as f64 * k as f64).sum();
                        let f = rel_pos_features(
                            pos[2 * j] - pos[2 * row],
                            pos[2 * j + 1] - pos[2 * row + 1],
                        );
                        let masked = mask.is_some_and(|m| !m[slot]);
                        dot + bias(t, f) + if masked { MASKED_LOGIT as f64 } else { 0.0 }
                    })
                    .collect();
                logits.push(
                    qt.iter()
                        .zip(&blank_k[t * d..])
                        .map(|(&a, &k)| a as f64 * k as f64)
                        .sum(),
                );
                let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                for e in 0..d {
                    let mut o = exps[nbrs.len()] / sum * blank_v[t * d + e] as f64;
                    for (slot, &j) in nbrs.iter().enumerate() {
                        let j = img * n + j as usize;
                        o += exps[slot] / sum * kv[j * 2 * c + t * 2 * d + d + e] as f64;
                    }
                    out[row * c + t * d + e] = o;
                }
            }
        }
    }
    out
}

fn linear(rng: &mut Rng, in_dim: usize, out_dim: usize) -> Linear {
    Linear {
        weight: F32Buffer::owned(rng.vec(in_dim * out_dim)),
        bias: Some(F32Buffer::owned(rng.vec(out_dim))),
        in_dim,
        out_dim,
    }
}

/// Attention over clustered neighbourhoods (with padding) and over
/// arbitrary, non-contiguous ones, for awkward head sizes and batch > 1.
#[test]
fn cluster_attention_matches_the_reference() {
    let mut rng = Rng(0x5eed);
    for (b, h, w, n, s, nbhd_size, heads, d) in [
        (2, 9, 11, 61, 8, 48, 3, 5),
        (1, 20, 20, 397, 8, 48, 2, 16),
        (3, 7, 6, 42, 4, 9, 1, 33),
        (2, 12, 5, 60, 8, 24, 4, 8),
    ] {
        let pos = random_positions(&mut rng, b, h, w, n);
        let offsets = OffsetTable::new(h, w, None);
        let layout =
            ClusterLayout::build(&pos, b, n, s, nbhd_size, &offsets, (h, w), KeyScope::Batch)
                .unwrap();
        let arbitrary = Neighbourhood {
            images: b,
            tokens: n,
            size: 7,
            idx: (0..b * n * 7).map(|_| rng.below(n) as u32).collect(),
            mask: Some((0..b * n * 7).map(|_| rng.below(5) != 0).collect()),
        };
        for (nbhd, pos) in [(&layout.nbhd, &layout.clustering.pos), (&arbitrary, &pos)] {
            let c = heads * d;
            let q = rng.vec(b * n * c);
            let kv = rng.vec(b * n * 2 * c);
            let (blank_k, blank_v) = (rng.vec(c), rng.vec(c));
            let pos_embed = linear(&mut rng, 5, heads);
            let bias_table = offsets.apply(&pos_embed).unwrap();
            let rows = neighbour_rows(&offsets, pos, nbhd, b).unwrap();
            let q_scale = 1.0 / (d as f32).sqrt();
            let got = cluster_attention(&AttentionInputs {
                q: &q,
                q_scale,
                kv: &kv,
                nbhd,
                bias_rows: &rows,
                bias_table: &bias_table,
                blank_k: &blank_k,
                blank_v: &blank_v,
                batch: b,
                tokens: n,
                heads,
                head_dim: d,
            })
            .unwrap();
            let bias = |t: usize, f: [f32; 5]| {
                pos_embed.bias.as_ref().unwrap()[t] as f64
                    + (0..5)
                        .map(|k| f[k] as f64 * pos_embed.weight[t * 5 + k] as f64)
                        .sum::<f64>()
            };
            let scaled: Vec<f32> = q.iter().map(|v| v * q_scale).collect();
            let want = attention_reference(
                &scaled,
                &kv,
                pos,
                nbhd,
                bias,
                &blank_k,
                &blank_v,
                (b, n, heads, d),
            );
            assert_all_close(
                &format!("attention b{b} n{n} h{heads} d{d}"),
                &got,
                &want,
                2e-5,
            );
        }
    }
}

#[test]
fn pointconv_merge_matches_the_reference() {
    let mut rng = Rng(0xface);
    for (b, h, w, n, c, kept) in [(2, 9, 11, 61, 5, 17), (1, 16, 16, 200, 32, 50)] {
        let pos = random_positions(&mut rng, b, h, w, n);
        let offsets = OffsetTable::new(h, w, None);
        let layout =
            ClusterLayout::build(&pos, b, n, 8, 48, &offsets, (h, w), KeyScope::Batch).unwrap();
        let (nbhd, pos) = (&layout.nbhd, &layout.clustering.pos);
        let feat = rng.vec(b * n * c);
        let importance: Vec<f32> = (0..b * n).map(|_| rng.f32().abs()).collect();
        let centres: Vec<u32> = (0..b * kept).map(|_| rng.below(n) as u32).collect();
        let net = linear(&mut rng, 5, INNER_CHANNELS);
        let norm = LayerNorm {
            weight: F32Buffer::owned(rng.vec(INNER_CHANNELS)),
            bias: F32Buffer::owned(rng.vec(INNER_CHANNELS)),
        };
        let table = weight_net_table(&offsets, &net, &norm).unwrap();
        let rows = neighbour_rows(&offsets, pos, nbhd, b).unwrap();
        let got = pointconv_merge(&MergeInputs {
            feat: &feat,
            importance: &importance,
            nbhd,
            centres: &centres,
            weight_rows: &rows,
            weight_table: &table,
            batch: b,
            tokens: n,
            channels: c,
        })
        .unwrap();
        // Reference: the weight net evaluated per pair, in f64.
        let weight_net = |f: [f32; 5]| -> [f64; 4] {
            let lin: Vec<f64> = (0..4)
                .map(|o| {
                    net.bias.as_ref().unwrap()[o] as f64
                        + (0..5)
                            .map(|k| f[k] as f64 * net.weight[o * 5 + k] as f64)
                            .sum::<f64>()
                })
                .collect();
            let mean = lin.iter().sum::<f64>() / 4.0;
            let var = lin.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 4.0;
            std::array::from_fn(|o| {
                let x = (lin[o] - mean) / (var + 1e-5).sqrt() * norm.weight[o] as f64
                    + norm.bias[o] as f64;
                // GELU via erf from the f32 implementation's independent twin: Φ by erfc series.
                0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
            })
        };
        let mut want = vec![0.0f64; b * kept * 4 * c];
        for img in 0..b {
            for k in 0..kept {
                let i = centres[img * kept + k] as usize;
                let row = img * n + i;
                for (slot, &j) in nbhd.of(img, i).iter().enumerate() {
                    let valid = nbhd.mask_of(img, i).is_none_or(|m| m[slot]);
                    let jr = img * n + j as usize;
                    let f = rel_pos_features(
                        pos[2 * jr] - pos[2 * row],
                        pos[2 * jr + 1] - pos[2 * row + 1],
                    );
                    let wn = weight_net(f);
                    for ic in 0..4 {
                        let wij = wn[ic] * importance[jr] as f64 * valid as u8 as f64;
                        for ch in 0..c {
                            want[((img * kept + k) * 4 + ic) * c + ch] +=
                                wij * feat[jr * c + ch] as f64;
                        }
                    }
                }
            }
        }
        assert_all_close(&format!("pointconv b{b} n{n} c{c}"), &got, &want, 1e-5);
    }
}

/// erf by its Taylor series (|x| ≤ 3) or the asymptotic continued fraction.
fn erf(x: f64) -> f64 {
    if x.abs() > 3.0 {
        // erfc(x) ≈ e^{-x²}/(x√π) · (1 − 1/(2x²) + 3/(4x⁴)) is far below f32 resolution here.
        let z = x.abs();
        let tail = (-z * z).exp() / (z * std::f64::consts::PI.sqrt())
            * (1.0 - 0.5 / (z * z) + 0.75 / z.powi(4));
        return x.signum() * (1.0 - tail);
    }
    let mut term = x;
    let mut sum = x;
    for k in 1..200 {
        term *= -x * x / k as f64;
        sum += term / (2 * k + 1) as f64;
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Clustering is a permutation into ceil(n/s) consecutive clusters of s
    /// (the last padded), whose means are the means of their members.
    #[test]
    fn clustering_is_a_balanced_permutation(
        h in 1usize..40, w in 1usize..40, s in 1usize..12, frac in 0.05f64..1.0, b in 1usize..3, seed in any::<u64>(),
    ) {
        let mut rng = Rng(seed | 1);
        let n = ((h * w) as f64 * frac).ceil() as usize;
        let pos = random_positions(&mut rng, b, h, w, n);
        let c = space_filling_cluster(&pos, b, n, s, (h, w), KeyScope::Batch).unwrap();
        prop_assert_eq!(c.clusters, n.div_ceil(c.cluster_size));
        for img in 0..b {
            let mut order: Vec<u32> = c.reorder[img * n..(img + 1) * n].to_vec();
            for (r, &t) in order.iter().enumerate() {
                let old = &pos[(img * n + t as usize) * 2..][..2];
                prop_assert_eq!(old, &c.pos[(img * n + r) * 2..][..2]);
            }
            order.sort_unstable();
            prop_assert_eq!(order, (0..n as u32).collect::<Vec<_>>());
            for k in 0..c.clusters {
                let members = k * c.cluster_size..((k + 1) * c.cluster_size).min(n);
                let count = members.len() as f64;
                let mean_x: f64 = members.clone().map(|r| c.pos[(img * n + r) * 2] as f64).sum::<f64>() / count;
                let got = c.means[(img * c.clusters + k) * 2] as f64;
                prop_assert!((got - mean_x).abs() <= 1e-5 * mean_x.abs().max(1.0));
            }
        }
    }

    /// With the published sizes (clusters of 8, neighbourhoods of 48), every
    /// token's neighbourhood is its nearest clusters' members, in order (spec
    /// §4), and only padded slots are masked. (Not necessarily its own
    /// cluster: a stretched cluster's mean can be farther from a member than
    /// six other means, which a random subset of the grid once showed.)
    #[test]
    fn neighbourhoods_are_the_nearest_clusters_members(
        h in 8usize..48, w in 8usize..48, frac in 0.1f64..1.0, seed in any::<u64>(),
    ) {
        let mut rng = Rng(seed | 1);
        let n = ((h * w) as f64 * frac).ceil() as usize;
        prop_assume!(n > 48);
        let pos = random_positions(&mut rng, 1, h, w, n);
        let offsets = OffsetTable::new(h, w, None);
        let l = ClusterLayout::build(&pos, 1, n, 8, 48, &offsets, (h, w), KeyScope::Batch).unwrap();
        prop_assert_eq!(l.nnc, 6);
        for i in 0..n {
            let nbrs = l.nbhd.of(0, i);
            let mask = l.nbhd.mask_of(0, i);
            for (slot, &j) in nbrs.iter().enumerate() {
                let member = l.nearest[i * l.nnc + slot / 8] as usize * 8 + slot % 8;
                let valid = mask.is_none_or(|m| m[slot]);
                prop_assert_eq!(valid, member < n, "token {} slot {}", i, slot);
                if valid {
                    prop_assert_eq!(j as usize, member, "token {} slot {}", i, slot);
                }
            }
        }
    }

    /// Nearest clusters agree with sorting every cluster by (distance, index).
    #[test]
    fn nearest_clusters_match_brute_force(
        n in 1usize..60, k in 1usize..20, nnc_frac in 0.0f64..1.0, seed in any::<u64>(),
    ) {
        let mut rng = Rng(seed | 1);
        let pos: Vec<f32> = (0..2 * n).map(|_| rng.below(12) as f32).collect();
        // Means on a coarse lattice so that ties are common.
        let means: Vec<f32> = (0..2 * k).map(|_| rng.below(8) as f32 * 1.5).collect();
        let nnc = 1 + ((k - 1) as f64 * nnc_frac) as usize;
        let got = nearest_clusters(&pos, &means, 1, n, k, nnc).unwrap();
        for t in 0..n {
            let mut all: Vec<(f64, u32)> = (0..k)
                .map(|c| {
                    let dx = pos[2 * t] as f64 - means[2 * c] as f64;
                    let dy = pos[2 * t + 1] as f64 - means[2 * c + 1] as f64;
                    (dx * dx + dy * dy, c as u32)
                })
                .collect();
            all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let want: Vec<u32> = all[..nnc].iter().map(|x| x.1).collect();
            prop_assert_eq!(&got[t * nnc..(t + 1) * nnc], &want[..]);
        }
    }

    /// Selection keeps every reserve token, exactly max(keep, reserve) tokens
    /// in all, no token twice, and the sampled ones by descending score.
    #[test]
    fn selection_keeps_reserve_and_keep_tokens(
        h in 1usize..30, w in 1usize..30, frac in 0.05f64..1.0, stage in 0usize..3, ds in 0.1f64..0.5, seed in any::<u64>(),
    ) {
        let mut rng = Rng(seed | 1);
        let stride = 2usize << stage;
        let n = ((h * w) as f64 * frac).ceil() as usize;
        // Reserve tokens (coordinates divisible by 2·stride) are always present, as in the model.
        let mut pos = random_positions(&mut rng, 1, h, w, n);
        for t in 0..h * w {
            let (x, y) = (t % w, t / w);
            let on_reserve_grid = x % (2 * stride) == 0 && y % (2 * stride) == 0;
            let present = pos.chunks_exact(2).any(|p| p[0] as usize == x && p[1] as usize == y);
            if on_reserve_grid && !present {
                pos.extend([x as f32, y as f32]);
            }
        }
        let n = pos.len() / 2;
        let importance: Vec<f32> = (0..n).map(|_| (rng.f32() + 1.0) / 2.0).collect();
        let sel = select_tokens(&pos, &importance, 1, n, stride, (h, w), 4.0, ds).unwrap();
        let keep = (n as f64 * ds) as usize;
        let reserve: Vec<u32> = (0..n as u32)
            .filter(|&t| {
                let p = &pos[2 * t as usize..];
                (p[0] as usize).is_multiple_of(2 * stride) && (p[1] as usize).is_multiple_of(2 * stride)
            })
            .collect();
        prop_assert_eq!(sel.reserve, reserve.len());
        prop_assert_eq!(sel.kept, keep.max(reserve.len()).min(n));
        prop_assert_eq!(&sel.order[sel.sampled..], &reserve[..]);
        let mut seen = sel.order.clone();
        seen.sort_unstable();
        seen.dedup();
        prop_assert_eq!(seen.len(), sel.kept);
    }
}

#[test]
fn grid_clustering_is_the_same_for_every_image_of_a_batch() {
    let (h, w) = (13, 17);
    let one =
        space_filling_cluster(&grid_positions(h, w), 1, h * w, 8, (h, w), KeyScope::Batch).unwrap();
    let three = space_filling_cluster(
        &grid_positions(h, w).repeat(3),
        3,
        h * w,
        8,
        (h, w),
        KeyScope::Batch,
    )
    .unwrap();
    assert_eq!(three.reorder, one.reorder.repeat(3));
    assert_eq!(three.means, one.means.repeat(3));
}

/// `KeyScope::Image` clusters every image exactly as it would be clustered
/// alone; the published `KeyScope::Batch` does not always (an image's
/// clusters change with the images beside it, which is why the dataset
/// pipeline uses the per-image scope).
#[test]
fn per_image_key_scope_clusters_each_image_as_if_alone() {
    // Large ranks: a key r·(M + 1) + ratio then absorbs the last bits of the
    // ratio, and which near-equal ratios tie depends on M.
    let (h, w, n, s, b) = (160, 160, 12_000, 8, 3);
    let mut rng = Rng(7);
    let mut batch_scope_differs = false;
    for _ in 0..4 {
        let pos = random_positions(&mut rng, b, h, w, n);
        let per_image = space_filling_cluster(&pos, b, n, s, (h, w), KeyScope::Image).unwrap();
        let whole = space_filling_cluster(&pos, b, n, s, (h, w), KeyScope::Batch).unwrap();
        let k = per_image.clusters;
        for img in 0..b {
            let own = &pos[img * n * 2..(img + 1) * n * 2];
            let alone = space_filling_cluster(own, 1, n, s, (h, w), KeyScope::Batch).unwrap();
            assert_eq!(
                &per_image.reorder[img * n..(img + 1) * n],
                &alone.reorder[..]
            );
            assert_eq!(
                &per_image.means[img * k * 2..(img + 1) * k * 2],
                &alone.means[..]
            );
            batch_scope_differs |= whole.reorder[img * n..(img + 1) * n] != alone.reorder[..];
        }
    }
    assert!(
        batch_scope_differs,
        "no trial showed the batch dependence this scope exists to remove"
    );
}
