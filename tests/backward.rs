//! Backward ops on the CPU against central finite differences of their own
//! forward evaluated in f64, on small random problems: clustered stages with
//! padded last clusters (masks on), global stages (no mask), neighbourhoods
//! shared by the batch, and arbitrary lists where a token sits in many
//! queries' lists or in none; head dims 5 and 33; batch > 1. Then
//! determinism: the same bits twice and for 1 and 2 threads.

mod common;

use autofocus::gpu::{Device, Element};
use autofocus::io::F32Buffer;
use autofocus::ops::Linear;
use autofocus::ops::cluster_attention::backward::{
    AttentionGradInputs, AttentionGrads, TILE_FLOATS, cluster_attention_backward_tiled,
};
use autofocus::ops::cluster_attention::{
    AttentionInputs, MASKED_LOGIT, cluster_attention_with_lse,
};
use autofocus::ops::neighbourhood::{InverseNeighbourhood, Neighbourhood};
use autofocus::ops::rel_pos::{OffsetTable, neighbour_rows, rel_pos_features};
use common::{assert_slices_close, download_f32, upload_as};

/// Fixed seeds: the same problems every run.
use common::SplitMix as Rng;

/// How a problem's neighbourhoods are made.
#[derive(Debug, Clone, Copy)]
enum Lists {
    /// Nearest clusters of `s` tokens (random), `nnc` per token; padded
    /// when `s` does not divide n.
    Clusters { s: usize, nnc: usize },
    /// Every token attends to all.
    Global,
    /// Clusters as above, one set shared by every image.
    SharedClusters { s: usize, nnc: usize },
    /// `m` arbitrary tokens per query, drawn from a few, so some tokens are
    /// in many lists and others in none; every fourth slot masked.
    Arbitrary { m: usize },
}

/// One attention problem: parameters as f32 (so the f32 forward and the
/// f64 reference evaluate the same function), positions on a grid.
#[derive(Clone)]
struct Problem {
    b: usize,
    n: usize,
    h: usize,
    d: usize,
    grid: (usize, usize),
    pos: Vec<f32>,
    nbhd: Neighbourhood,
    /// The clusters' size when the lists are whole clusters.
    clusters: Option<usize>,
    q: Vec<f32>,
    kv: Vec<f32>,
    pos_weight: Vec<f32>,
    pos_bias: Vec<f32>,
    blank_k: Vec<f32>,
    blank_v: Vec<f32>,
    /// The loss is Σ out · coef.
    coef: Vec<f32>,
}

impl Problem {
    fn new(seed: u64, b: usize, n: usize, h: usize, d: usize, lists: Lists) -> Self {
        let mut rng = Rng(seed);
        let grid = ((n + 6).div_ceil(7).max(6), 7);
        // Distinct cells per image.
        let pos: Vec<f32> = (0..b)
            .flat_map(|_| {
                let mut cells: Vec<usize> = (0..grid.0 * grid.1).collect();
                for i in (1..cells.len()).rev() {
                    cells.swap(i, rng.below(i + 1));
                }
                cells[..n]
                    .iter()
                    .flat_map(|&c| [(c % grid.1) as f32, (c / grid.1) as f32])
                    .collect::<Vec<_>>()
            })
            .collect();
        let nbhd = match lists {
            Lists::Global => Neighbourhood::global(n),
            Lists::Clusters { s, nnc } | Lists::SharedClusters { s, nnc } => {
                let images = if matches!(lists, Lists::SharedClusters { .. }) {
                    1
                } else {
                    b
                };
                let k = n.div_ceil(s);
                let nearest: Vec<u32> = (0..images * n)
                    .flat_map(|_| {
                        let mut ks: Vec<u32> = (0..k as u32).collect();
                        for i in (1..ks.len()).rev() {
                            ks.swap(i, rng.below(i + 1));
                        }
                        ks[..nnc].to_vec()
                    })
                    .collect();
                Neighbourhood::from_clusters(&nearest, images, n, nnc, s)
            }
            Lists::Arbitrary { m } => {
                let popular = (n / 3).max(1);
                let idx: Vec<u32> = (0..b * n * m).map(|_| rng.below(popular) as u32).collect();
                let mask = (0..b * n * m).map(|e| e % 4 != 3).collect();
                Neighbourhood {
                    images: b,
                    tokens: n,
                    size: m,
                    idx,
                    mask: Some(mask),
                }
            }
        };
        let c = h * d;
        Self {
            b,
            n,
            h,
            d,
            grid,
            pos,
            nbhd,
            clusters: match lists {
                Lists::Clusters { s, .. } | Lists::SharedClusters { s, .. } => Some(s),
                _ => None,
            },
            q: rng.floats(b * n * c, 1.0),
            kv: rng.floats(b * n * 2 * c, 1.0),
            pos_weight: rng.floats(h * 5, 0.3),
            pos_bias: rng.floats(h, 0.5),
            blank_k: rng.floats(c, 1.0),
            blank_v: rng.floats(c, 1.0),
            coef: rng.floats(b * n * c, 1.0),
        }
    }

    fn q_scale(&self) -> f32 {
        (self.d as f64).powf(-0.5) as f32
    }

    fn offsets(&self) -> OffsetTable {
        OffsetTable::new(self.grid.0, self.grid.1, None)
    }

    /// The f32 forward (output and log-sum-exp) and its gradients.
    fn backward(&self) -> (Vec<f32>, AttentionGrads) {
        self.backward_tiled(TILE_FLOATS)
    }

    /// As [`Self::backward`], with tiles of at most `tile_floats`.
    fn backward_tiled(&self, tile_floats: usize) -> (Vec<f32>, AttentionGrads) {
        let offsets = self.offsets();
        let layer = Linear {
            weight: F32Buffer::owned(self.pos_weight.clone()),
            bias: Some(F32Buffer::owned(self.pos_bias.clone())),
            in_dim: 5,
            out_dim: self.h,
        };
        let bias_table = offsets.apply(&layer).unwrap();
        let bias_rows = neighbour_rows(&offsets, &self.pos, &self.nbhd, self.b).unwrap();
        let inp = AttentionInputs {
            q: &self.q,
            q_scale: self.q_scale(),
            kv: &self.kv,
            nbhd: &self.nbhd,
            bias_rows: &bias_rows,
            bias_table: &bias_table,
            blank_k: &self.blank_k,
            blank_v: &self.blank_v,
            batch: self.b,
            tokens: self.n,
            heads: self.h,
            head_dim: self.d,
        };
        let (out, lse) = cluster_attention_with_lse(&inp).unwrap();
        let inverse = InverseNeighbourhood::new(&self.nbhd).unwrap();
        let grads = cluster_attention_backward_tiled(
            &AttentionGradInputs {
                forward: &inp,
                out: &out,
                lse: &lse,
                grad_out: &self.coef,
                inverse: &inverse,
                offsets: &offsets,
            },
            tile_floats,
        )
        .unwrap();
        (out, grads)
    }

    /// The f64 reference forward: plain loops, spec §6.
    fn forward64(&self, p: &Params64) -> Vec<f64> {
        let (b, n, h, d) = (self.b, self.n, self.h, self.d);
        let c = h * d;
        let scale = (d as f64).powf(-0.5);
        let mut out = vec![0.0f64; b * n * c];
        for img in 0..b {
            let pos = &self.pos[img * n * 2..];
            for i in 0..n {
                let row = img * n + i;
                let nbrs = self.nbhd.of(img, i);
                let mask = self.nbhd.mask_of(img, i);
                for t in 0..h {
                    let q: Vec<f64> = (0..d).map(|e| p.q[row * c + t * d + e] * scale).collect();
                    let key = |j: usize, e: usize| p.kv[(img * n + j) * 2 * c + t * 2 * d + e];
                    let value = |j: usize, e: usize| key(j, d + e);
                    let mut logits: Vec<f64> = nbrs
                        .iter()
                        .enumerate()
                        .map(|(s, &j)| {
                            let j = j as usize;
                            let f = rel_pos_features(
                                pos[2 * j] - pos[2 * i],
                                pos[2 * j + 1] - pos[2 * i + 1],
                            );
                            let bias = p.pos_bias[t]
                                + (0..5)
                                    .map(|k| p.pos_weight[t * 5 + k] * f[k] as f64)
                                    .sum::<f64>();
                            let masked = mask.is_some_and(|m| !m[s]);
                            (0..d).map(|e| q[e] * key(j, e)).sum::<f64>()
                                + bias
                                + if masked { MASKED_LOGIT as f64 } else { 0.0 }
                        })
                        .collect();
                    logits.push((0..d).map(|e| q[e] * p.blank_k[t * d + e]).sum());
                    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                    let total: f64 = w.iter().sum();
                    for e in 0..d {
                        let mut acc = w[nbrs.len()] * p.blank_v[t * d + e];
                        for (s, &j) in nbrs.iter().enumerate() {
                            acc += w[s] * value(j as usize, e);
                        }
                        out[row * c + t * d + e] = acc / total;
                    }
                }
            }
        }
        out
    }

    fn loss64(&self, p: &Params64) -> f64 {
        self.forward64(p)
            .iter()
            .zip(&self.coef)
            .map(|(o, &g)| o * g as f64)
            .sum()
    }
}

/// The differentiable parameters in f64, by name.
#[derive(Clone)]
struct Params64 {
    q: Vec<f64>,
    kv: Vec<f64>,
    pos_weight: Vec<f64>,
    pos_bias: Vec<f64>,
    blank_k: Vec<f64>,
    blank_v: Vec<f64>,
}

impl Params64 {
    fn of(p: &Problem) -> Self {
        let wide = |v: &[f32]| v.iter().map(|&x| x as f64).collect();
        Self {
            q: wide(&p.q),
            kv: wide(&p.kv),
            pos_weight: wide(&p.pos_weight),
            pos_bias: wide(&p.pos_bias),
            blank_k: wide(&p.blank_k),
            blank_v: wide(&p.blank_v),
        }
    }
}

impl NamedParams for Params64 {
    fn get_mut(&mut self, name: &str) -> &mut Vec<f64> {
        match name {
            "q" => &mut self.q,
            "kv" => &mut self.kv,
            "pos_weight" => &mut self.pos_weight,
            "pos_bias" => &mut self.pos_bias,
            "blank_k" => &mut self.blank_k,
            _ => &mut self.blank_v,
        }
    }
}

/// Parameters in f64 that a finite difference can move, by name.
trait NamedParams: Clone {
    fn get_mut(&mut self, name: &str) -> &mut Vec<f64>;
}

/// Every entry of `got`, the gradient of parameter `name`, against a central
/// difference of `loss` around `base`, within `1e-4 · max(1, max |fd|)`.
fn assert_matches_finite_differences<P: NamedParams>(
    what: &str,
    name: &str,
    got: &[f32],
    base: &P,
    loss: impl Fn(&P) -> f64,
) {
    let eps = 1e-4;
    let mut params = base.clone();
    let fd: Vec<f64> = (0..got.len())
        .map(|e| {
            let x = params.get_mut(name)[e];
            params.get_mut(name)[e] = x + eps;
            let up = loss(&params);
            params.get_mut(name)[e] = x - eps;
            let down = loss(&params);
            params.get_mut(name)[e] = x;
            (up - down) / (2.0 * eps)
        })
        .collect();
    let scale = fd.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    for (e, (&g, &f)) in got.iter().zip(&fd).enumerate() {
        assert!(
            (g as f64 - f).abs() <= 1e-4 * scale,
            "{what}: d{name}[{e}] = {g}, finite difference {f}"
        );
    }
}

/// Runs `backward` with 1 and with 2 threads, twice: the same bits each time.
fn assert_deterministic<G: Send>(backward: impl Fn() -> G + Sync, bits: impl Fn(&G) -> Vec<u32>) {
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(&backward)
    };
    let one = bits(&run(1));
    assert_eq!(one, bits(&run(2)), "1 vs 2 threads");
    assert_eq!(one, bits(&run(2)), "run to run");
}

/// The bits of every value of `tensors`, in order.
fn bits_of(tensors: &[&Vec<f32>]) -> Vec<u32> {
    tensors
        .iter()
        .flat_map(|v| v.iter().map(|x| x.to_bits()))
        .collect()
}

/// Every gradient entry against a central difference of the f64 forward,
/// within `1e-4 · max(1, max |fd|)` per tensor.
fn check_against_finite_differences(problem: &Problem, what: &str) {
    let (out, grads) = problem.backward();
    let base = Params64::of(problem);
    let reference = problem.forward64(&base);
    let worst = out
        .iter()
        .zip(&reference)
        .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
    assert!(
        worst < 1e-5,
        "{what}: forward differs from f64 by {worst:e}"
    );
    for (name, got) in [
        ("q", &grads.q),
        ("kv", &grads.kv),
        ("pos_weight", &grads.pos_weight),
        ("pos_bias", &grads.pos_bias),
        ("blank_k", &grads.blank_k),
        ("blank_v", &grads.blank_v),
    ] {
        assert_matches_finite_differences(what, name, got, &base, |p| problem.loss64(p));
    }
}

#[test]
fn attention_gradients_match_finite_differences_clustered_and_padded() {
    // 23 tokens in clusters of 4: the last cluster padded, masks on.
    let p = Problem::new(1, 2, 23, 2, 5, Lists::Clusters { s: 4, nnc: 3 });
    assert!(p.nbhd.mask.is_some());
    check_against_finite_differences(&p, "clustered, padded");
}

#[test]
fn attention_gradients_match_finite_differences_clusters_of_eight() {
    // Clusters of 8, the published size, two per neighbourhood; the last
    // cluster is short, so token 0 also fills padded slots.
    let p = Problem::new(6, 2, 37, 2, 5, Lists::Clusters { s: 8, nnc: 2 });
    assert!(p.nbhd.mask.is_some());
    check_against_finite_differences(&p, "clusters of eight");
}

#[test]
fn attention_gradients_match_finite_differences_head_dim_16() {
    // Head dims a multiple of the CPU's vector blocks: the key gather
    // takes every head in one pass over a key's pairs.
    let p = Problem::new(7, 2, 21, 2, 16, Lists::Clusters { s: 8, nnc: 2 });
    check_against_finite_differences(&p, "head dim 16");
}

#[test]
fn attention_gradients_match_finite_differences_head_dim_32() {
    // Head dims a multiple of two vector blocks: pass 2 takes the two keys
    // of a cluster that the same queries hold ("twins") in one pass.
    let p = Problem::new(8, 2, 21, 2, 32, Lists::Clusters { s: 8, nnc: 2 });
    check_against_finite_differences(&p, "head dim 32");
}

#[test]
fn attention_gradients_match_finite_differences_global_head_dim_33() {
    let p = Problem::new(2, 2, 9, 1, 33, Lists::Global);
    check_against_finite_differences(&p, "global");
}

#[test]
fn attention_gradients_match_finite_differences_shared_lists() {
    let p = Problem::new(3, 3, 16, 2, 5, Lists::SharedClusters { s: 4, nnc: 2 });
    assert_eq!(p.nbhd.images, 1);
    check_against_finite_differences(&p, "shared by the batch");
}

#[test]
fn attention_gradients_match_finite_differences_many_and_no_queries_per_key() {
    let p = Problem::new(4, 2, 12, 2, 5, Lists::Arbitrary { m: 7 });
    let inverse = InverseNeighbourhood::new(&p.nbhd).unwrap();
    assert!(
        (0..12).any(|j| inverse.of(0, j).is_empty()),
        "a key in no list"
    );
    assert!(
        (0..12).any(|j| inverse.of(0, j).len() > 14),
        "a key in many lists"
    );
    check_against_finite_differences(&p, "arbitrary lists");
}

/// Tiles of one chunk of 32 queries, some across two images, against one
/// tile: dq and the parameters are the same bits (the chunks do not
/// change), dk and dv within rounding (one partial sum per tile).
#[test]
fn attention_gradients_do_not_depend_on_the_tile_size() {
    let p = Problem::new(6, 2, 150, 2, 8, Lists::Clusters { s: 8, nnc: 4 });
    let per_row = 2 * p.h * p.nbhd.size;
    assert!(2 * 150 * per_row <= TILE_FLOATS, "one tile by default");
    let (_, whole) = p.backward();
    let (_, tiled) = p.backward_tiled(32 * per_row);
    assert_eq!(tiled.q, whole.q);
    assert_eq!(tiled.pos_weight, whole.pos_weight);
    assert_eq!(tiled.pos_bias, whole.pos_bias);
    assert_eq!(tiled.blank_k, whole.blank_k);
    assert_eq!(tiled.blank_v, whole.blank_v);
    assert_slices_close("dkv, tiled", &tiled.kv, &whole.kv, 1e-6);
    assert_ne!(tiled.kv, vec![0.0; tiled.kv.len()]);
}

/// The same bits twice, and with 1 and 2 threads.
#[test]
fn attention_gradients_are_deterministic() {
    let p = Problem::new(5, 2, 150, 2, 8, Lists::Clusters { s: 8, nnc: 4 });
    assert_deterministic(
        || p.backward().1,
        |g: &AttentionGrads| {
            bits_of(&[
                &g.q,
                &g.kv,
                &g.pos_weight,
                &g.pos_bias,
                &g.blank_k,
                &g.blank_v,
            ])
        },
    );
}

// ------------------------------------------------------------ merge ----

use autofocus::ops::LayerNorm;
use autofocus::ops::pointconv_merge::backward::{
    MergeGradInputs, MergeGrads, pointconv_merge_backward,
};
use autofocus::ops::pointconv_merge::{
    INNER_CHANNELS, MergeInputs, pointconv_merge, weight_net_table,
};
use autofocus::ops::token_selection::{importance, importance_backward};

/// erf in f64 by its Taylor series (|x| < 6; beyond, ±1 to 1e-16).
fn erf64(x: f64) -> f64 {
    if x.abs() >= 6.0 {
        return x.signum();
    }
    let mut term = x;
    let mut sum = x;
    for k in 1..200 {
        term *= -x * x / k as f64;
        let add = term / (2 * k + 1) as f64;
        sum += add;
        if add.abs() < 1e-17 * sum.abs() {
            break;
        }
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

fn gelu64(x: f64) -> f64 {
    0.5 * x * (1.0 + erf64(x / std::f64::consts::SQRT_2))
}

/// A merge problem: an attention problem's tokens and lists, plus
/// importance, centres and the weight net.
#[derive(Clone)]
struct MergeProblem {
    base: Problem,
    c: usize,
    feat: Vec<f32>,
    p: Vec<f32>,
    centres: Vec<u32>,
    kept: usize,
    net_weight: Vec<f32>,
    net_bias: Vec<f32>,
    norm_weight: Vec<f32>,
    norm_bias: Vec<f32>,
    coef: Vec<f32>,
}

#[derive(Clone)]
struct Merge64 {
    feat: Vec<f64>,
    p: Vec<f64>,
    net_weight: Vec<f64>,
    net_bias: Vec<f64>,
    norm_weight: Vec<f64>,
    norm_bias: Vec<f64>,
}

impl NamedParams for Merge64 {
    fn get_mut(&mut self, name: &str) -> &mut Vec<f64> {
        match name {
            "feat" => &mut self.feat,
            "importance" => &mut self.p,
            "net_weight" => &mut self.net_weight,
            "net_bias" => &mut self.net_bias,
            "norm_weight" => &mut self.norm_weight,
            _ => &mut self.norm_bias,
        }
    }
}

impl MergeProblem {
    fn new(seed: u64, b: usize, n: usize, c: usize, kept: usize, lists: Lists) -> Self {
        let base = Problem::new(seed, b, n, 1, 1, lists);
        let mut rng = Rng(seed ^ 0xFEED);
        let centres = (0..b)
            .flat_map(|_| {
                let mut t: Vec<u32> = (0..n as u32).collect();
                for i in (1..t.len()).rev() {
                    t.swap(i, rng.below(i + 1));
                }
                t[..kept].to_vec()
            })
            .collect();
        Self {
            c,
            feat: rng.floats(b * n * c, 1.0),
            p: (0..b * n).map(|_| 0.5 + 0.45 * rng.float()).collect(),
            centres,
            kept,
            net_weight: rng.floats(INNER_CHANNELS * 5, 0.5),
            net_bias: rng.floats(INNER_CHANNELS, 0.5),
            norm_weight: (0..INNER_CHANNELS)
                .map(|_| 1.0 + 0.3 * rng.float())
                .collect(),
            norm_bias: rng.floats(INNER_CHANNELS, 0.3),
            coef: rng.floats(b * kept * INNER_CHANNELS * c, 1.0),
            base,
        }
    }

    fn layers(&self) -> (Linear, LayerNorm) {
        (
            Linear {
                weight: F32Buffer::owned(self.net_weight.clone()),
                bias: Some(F32Buffer::owned(self.net_bias.clone())),
                in_dim: 5,
                out_dim: INNER_CHANNELS,
            },
            LayerNorm {
                weight: F32Buffer::owned(self.norm_weight.clone()),
                bias: F32Buffer::owned(self.norm_bias.clone()),
            },
        )
    }

    fn backward(&self) -> (Vec<f32>, MergeGrads) {
        let pb = &self.base;
        let offsets = pb.offsets();
        let (linear, norm) = self.layers();
        let table = weight_net_table(&offsets, &linear, &norm).unwrap();
        let rows = neighbour_rows(&offsets, &pb.pos, &pb.nbhd, pb.b).unwrap();
        let inp = MergeInputs {
            feat: &self.feat,
            importance: &self.p,
            nbhd: &pb.nbhd,
            centres: &self.centres,
            weight_rows: &rows,
            weight_table: &table,
            batch: pb.b,
            tokens: pb.n,
            channels: self.c,
        };
        let out = pointconv_merge(&inp).unwrap();
        let inverse = InverseNeighbourhood::new(&pb.nbhd).unwrap();
        let grads = pointconv_merge_backward(&MergeGradInputs {
            forward: &inp,
            grad_out: &self.coef,
            inverse: &inverse,
            offsets: &offsets,
            weight_net: &linear,
            weight_norm: &norm,
        })
        .unwrap();
        (out, grads)
    }

    fn forward64(&self, q: &Merge64) -> Vec<f64> {
        let pb = &self.base;
        let (b, n, c, kept) = (pb.b, pb.n, self.c, self.kept);
        let mut out = vec![0.0f64; b * kept * INNER_CHANNELS * c];
        for img in 0..b {
            let pos = &pb.pos[img * n * 2..];
            for r in 0..kept {
                let i = self.centres[img * kept + r] as usize;
                let u = &mut out[(img * kept + r) * INNER_CHANNELS * c..][..INNER_CHANNELS * c];
                let mask = pb.nbhd.mask_of(img, i);
                for (s, &j) in pb.nbhd.of(img, i).iter().enumerate() {
                    let j = j as usize;
                    if mask.is_some_and(|m| !m[s]) {
                        continue;
                    }
                    let f =
                        rel_pos_features(pos[2 * j] - pos[2 * i], pos[2 * j + 1] - pos[2 * i + 1]);
                    let z: Vec<f64> = (0..4)
                        .map(|o| {
                            q.net_bias[o]
                                + (0..5)
                                    .map(|k| q.net_weight[o * 5 + k] * f[k] as f64)
                                    .sum::<f64>()
                        })
                        .collect();
                    let mean = z.iter().sum::<f64>() / 4.0;
                    let var = z.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 4.0;
                    let scale = q.p[img * n + j];
                    for o in 0..4 {
                        let y =
                            (z[o] - mean) / (var + 1e-5).sqrt() * q.norm_weight[o] + q.norm_bias[o];
                        let w = gelu64(y) * scale;
                        for e in 0..c {
                            u[o * c + e] += w * q.feat[(img * n + j) * c + e];
                        }
                    }
                }
            }
        }
        out
    }

    fn params64(&self) -> Merge64 {
        let wide = |v: &[f32]| v.iter().map(|&x| x as f64).collect();
        Merge64 {
            feat: wide(&self.feat),
            p: wide(&self.p),
            net_weight: wide(&self.net_weight),
            net_bias: wide(&self.net_bias),
            norm_weight: wide(&self.norm_weight),
            norm_bias: wide(&self.norm_bias),
        }
    }
}

fn check_merge_against_finite_differences(problem: &MergeProblem, what: &str) {
    let (out, grads) = problem.backward();
    let base = problem.params64();
    let reference = problem.forward64(&base);
    let worst = out
        .iter()
        .zip(&reference)
        .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
    assert!(
        worst < 1e-5,
        "{what}: merge forward differs from f64 by {worst:e}"
    );
    let loss = |q: &Merge64| -> f64 {
        problem
            .forward64(q)
            .iter()
            .zip(&problem.coef)
            .map(|(o, &g)| o * g as f64)
            .sum()
    };
    for (name, got) in [
        ("feat", &grads.feat),
        ("importance", &grads.importance),
        ("net_weight", &grads.net_weight),
        ("net_bias", &grads.net_bias),
        ("norm_weight", &grads.norm_weight),
        ("norm_bias", &grads.norm_bias),
    ] {
        assert_matches_finite_differences(what, name, got, &base, loss);
    }
}

#[test]
fn merge_gradients_match_finite_differences_clustered_and_padded() {
    let p = MergeProblem::new(11, 2, 23, 5, 7, Lists::Clusters { s: 4, nnc: 3 });
    check_merge_against_finite_differences(&p, "clustered, padded");
}

#[test]
fn merge_gradients_match_finite_differences_clusters_of_eight() {
    // Runs of 8, 4, 2 and 1 tokens with the same holders share gathers.
    let p = MergeProblem::new(16, 2, 45, 5, 9, Lists::Clusters { s: 8, nnc: 2 });
    check_merge_against_finite_differences(&p, "clusters of eight");
}

#[test]
fn merge_gradients_match_finite_differences_global_wide() {
    let p = MergeProblem::new(12, 2, 9, 33, 3, Lists::Global);
    check_merge_against_finite_differences(&p, "global");
}

#[test]
fn merge_gradients_match_finite_differences_shared_and_arbitrary_lists() {
    let p = MergeProblem::new(13, 3, 16, 5, 5, Lists::SharedClusters { s: 4, nnc: 2 });
    check_merge_against_finite_differences(&p, "shared by the batch");
    let p = MergeProblem::new(14, 2, 12, 5, 4, Lists::Arbitrary { m: 7 });
    check_merge_against_finite_differences(&p, "arbitrary lists");
}

#[test]
fn merge_gradients_are_deterministic() {
    let p = MergeProblem::new(15, 2, 150, 16, 40, Lists::Clusters { s: 8, nnc: 4 });
    assert_deterministic(
        || p.backward().1,
        |g: &MergeGrads| {
            bits_of(&[
                &g.feat,
                &g.importance,
                &g.net_weight,
                &g.net_bias,
                &g.norm_weight,
                &g.norm_bias,
            ])
        },
    );
}

// ------------------------------------------------------- importance ----

#[test]
fn importance_gradients_match_finite_differences() {
    let mut rng = Rng(21);
    let (rows, dim) = (37, 45);
    let x = rng.floats(rows * dim, 1.0);
    let w = rng.floats(dim, 0.3);
    let bias = 0.2f32;
    let coef = rng.floats(rows, 1.0);
    let p = importance(&x, &w, bias, rows, dim).unwrap();
    let grads = importance_backward(&x, &w, &p, &coef, rows, dim).unwrap();
    let loss = |x: &[f64], w: &[f64], b: f64| -> f64 {
        x.chunks(dim)
            .zip(&coef)
            .map(|(r, &g)| {
                let logit: f64 = r.iter().zip(w).map(|(a, b)| a * b).sum::<f64>() + b;
                g as f64 / (1.0 + (-logit).exp())
            })
            .sum()
    };
    let (x64, w64): (Vec<f64>, Vec<f64>) = (
        x.iter().map(|&v| v as f64).collect(),
        w.iter().map(|&v| v as f64).collect(),
    );
    let eps = 1e-5;
    let fd = |f: &dyn Fn(f64) -> f64| (f(eps) - f(-eps)) / (2.0 * eps);
    for e in (0..rows * dim).step_by(7) {
        let want = fd(&|h| {
            let mut x = x64.clone();
            x[e] += h;
            loss(&x, &w64, bias as f64)
        });
        assert!((grads.x[e] as f64 - want).abs() < 1e-5, "dx[{e}]");
    }
    for e in 0..dim {
        let want = fd(&|h| {
            let mut w = w64.clone();
            w[e] += h;
            loss(&x64, &w, bias as f64)
        });
        assert!((grads.weight[e] as f64 - want).abs() < 1e-4, "dw[{e}]");
    }
    let want = fd(&|h| loss(&x64, &w64, bias as f64 + h));
    assert!((grads.bias as f64 - want).abs() < 1e-4, "db");
}

// --------------------------------------------------- device kernels ----

use autofocus::ops::cluster_attention::gpu::{
    DeviceAttentionInputs, KeyGradientPlan,
    cluster_attention_backward as device_attention_backward, key_gradient_plan, split_param_grads,
};
use autofocus::ops::neighbourhood::gpu::{DeviceInverse, DeviceNeighbourhood};

/// The attention backward kernels against the CPU backward, on the
/// problem's inputs as stored in `T` (so only the kernels' arithmetic differs).
/// Lists of whole clusters run again through the tiled key kernel, which
/// must give the generic one's bits. Returns whether some cluster had more
/// holders than the tiled kernel stages.
fn check_attention_kernels<T: Element>(
    device: &Device,
    problem: &Problem,
    global: bool,
    tol: f32,
) -> bool {
    let stored = |v: &[f32]| download_f32(device, &upload_as::<T>(device, v));
    let rounded = Problem {
        q: stored(&problem.q),
        kv: stored(&problem.kv),
        coef: stored(&problem.coef),
        ..problem.clone()
    };
    let (out, want) = rounded.backward();
    let (b, n, h, d) = (problem.b, problem.n, problem.h, problem.d);
    let nbhd = if global {
        DeviceNeighbourhood::global(n)
    } else {
        DeviceNeighbourhood::upload(device, &problem.nbhd).unwrap()
    };
    let inverse = if global {
        DeviceInverse::global(n)
    } else {
        DeviceInverse::upload(device, &InverseNeighbourhood::new(&problem.nbhd).unwrap()).unwrap()
    };
    let (q, kv) = (
        upload_as::<T>(device, &rounded.q),
        upload_as::<T>(device, &rounded.kv),
    );
    let pos = device.upload(&problem.pos).unwrap();
    let (pw, pb) = (
        device.upload(&problem.pos_weight).unwrap(),
        device.upload(&problem.pos_bias).unwrap(),
    );
    let (bk, bv) = (
        device.upload(&problem.blank_k).unwrap(),
        device.upload(&problem.blank_v).unwrap(),
    );
    let inp = DeviceAttentionInputs {
        q: &q,
        q_scale: problem.q_scale(),
        kv: &kv,
        nbhd: &nbhd,
        pos: &pos,
        pos_weight: &pw,
        pos_bias: &pb,
        blank_k: &bk,
        blank_v: &bv,
        offset_clamp: None,
        batch: b,
        tokens: n,
        heads: h,
        head_dim: d,
    };
    let (dout, dgrad) = (
        upload_as::<T>(device, &out),
        upload_as::<T>(device, &rounded.coef),
    );
    let got = device_attention_backward(device, &inp, &dout, &dgrad, &inverse).unwrap();
    let what = format!("{} on {device:?} (global lists: {global})", T::SUFFIX);
    assert_slices_close(
        &format!("dq, {what}"),
        &download_f32(device, &got.q),
        &want.q,
        tol,
    );
    assert_slices_close(
        &format!("dkv, {what}"),
        &download_f32(device, &got.kv),
        &want.kv,
        tol,
    );
    let params = device.download(&got.params).unwrap();
    let (pw, pb, bk, bv) = split_param_grads(&params, h);
    assert_slices_close(&format!("dpos_weight, {what}"), pw, &want.pos_weight, tol);
    assert_slices_close(&format!("dpos_bias, {what}"), pb, &want.pos_bias, tol);
    assert_slices_close(&format!("dblank_k, {what}"), bk, &want.blank_k, tol);
    assert_slices_close(&format!("dblank_v, {what}"), bv, &want.blank_v, tol);
    // No atomics: a second run gives the same bits.
    let again = device_attention_backward(device, &inp, &dout, &dgrad, &inverse).unwrap();
    assert_eq!(
        device.download(&again.params).unwrap(),
        params,
        "{what}: rerun"
    );
    assert_eq!(
        download_f32(device, &again.kv),
        download_f32(device, &got.kv),
        "{what}: rerun"
    );
    let Some(s) = problem.clusters.filter(|_| !global) else {
        return false;
    };
    let KeyGradientPlan::Tiled(plan) = key_gradient_plan::<T>(problem.nbhd.size, Some(s), d) else {
        panic!("{what}: clusters of {s} planned for the generic key kernel");
    };
    let clustered = DeviceNeighbourhood::upload_clustered(device, &problem.nbhd, s).unwrap();
    let tiled = device_attention_backward(
        device,
        &DeviceAttentionInputs {
            nbhd: &clustered,
            ..inp
        },
        &dout,
        &dgrad,
        &inverse,
    )
    .unwrap();
    let what = format!("{what}, tiled key kernel (clusters of {s}, {plan:?})");
    assert_eq!(
        download_f32(device, &tiled.kv),
        download_f32(device, &got.kv),
        "{what}"
    );
    assert_eq!(
        download_f32(device, &tiled.q),
        download_f32(device, &got.q),
        "{what}"
    );
    assert_eq!(device.download(&tiled.params).unwrap(), params, "{what}");
    // The most queries holding one cluster's first member.
    let host_inverse = InverseNeighbourhood::new(&problem.nbhd).unwrap();
    (0..problem.nbhd.images)
        .flat_map(|img| (0..n).step_by(s).map(move |j| (img, j)))
        .any(|(img, j)| host_inverse.of(img, j).len() > plan.staged_queries)
}

#[test]
fn attention_backward_kernels_match_the_cpu() {
    let cases = [
        Problem::new(31, 2, 23, 2, 5, Lists::Clusters { s: 4, nnc: 3 }),
        Problem::new(32, 2, 9, 1, 33, Lists::Global),
        Problem::new(33, 3, 16, 2, 5, Lists::SharedClusters { s: 4, nnc: 2 }),
        Problem::new(34, 2, 12, 2, 5, Lists::Arbitrary { m: 7 }),
        Problem::new(35, 2, 40, 2, 40, Lists::Clusters { s: 8, nnc: 3 }),
        // Keys held by ~54 queries: the key gather's chunks of 32 pairs.
        Problem::new(36, 1, 70, 2, 5, Lists::Clusters { s: 8, nnc: 7 }),
        // One cluster per query: some clusters have more holders than the
        // tiled key kernel stages (1.5·m), the rest read from global memory.
        Problem::new(37, 2, 42, 2, 6, Lists::Clusters { s: 4, nnc: 1 }),
        // The presets' largest cluster size, padded: blocks of 24 warps.
        Problem::new(38, 1, 61, 1, 8, Lists::Clusters { s: 24, nnc: 2 }),
    ];
    for device in common::devices() {
        let mut beyond_staging = false;
        for (k, problem) in cases.iter().enumerate() {
            beyond_staging |= check_attention_kernels::<f32>(&device, problem, false, 1e-4);
            if k == 1 {
                check_attention_kernels::<f32>(&device, problem, true, 1e-4);
            }
        }
        assert!(beyond_staging, "no cluster had more holders than staged");
        check_attention_kernels::<half::f16>(&device, &cases[0], false, 5e-3);
        check_attention_kernels::<half::bf16>(&device, &cases[0], false, 3e-2);
        check_attention_kernels::<half::bf16>(&device, &cases[2], false, 3e-2);
    }
}

use autofocus::ops::pointconv_merge::gpu::{
    DeviceMergeInputs, DeviceWeightNet, pointconv_merge_backward as device_merge_backward,
};

/// The merge backward kernels against the CPU backward, inputs as stored in `T`.
fn check_merge_kernels<T: Element>(
    device: &Device,
    problem: &MergeProblem,
    global: bool,
    tol: f32,
) {
    let stored = |v: &[f32]| download_f32(device, &upload_as::<T>(device, v));
    let rounded = MergeProblem {
        feat: stored(&problem.feat),
        coef: stored(&problem.coef),
        ..problem.clone()
    };
    let (_, want) = rounded.backward();
    let pb = &problem.base;
    let (b, n, c, kept) = (pb.b, pb.n, problem.c, problem.kept);
    let nbhd = if global {
        DeviceNeighbourhood::global(n)
    } else {
        DeviceNeighbourhood::upload(device, &pb.nbhd).unwrap()
    };
    let inverse = if global {
        DeviceInverse::global(n)
    } else {
        DeviceInverse::upload(device, &InverseNeighbourhood::new(&pb.nbhd).unwrap()).unwrap()
    };
    let (linear, norm) = problem.layers();
    let net = DeviceWeightNet::upload(device, &linear, &norm).unwrap();
    let feat = upload_as::<T>(device, &rounded.feat);
    let importance = device.upload(&problem.p).unwrap();
    let centres: Vec<i32> = problem.centres.iter().map(|&i| i as i32).collect();
    let centres = device.upload(&centres).unwrap();
    let pos = device.upload(&pb.pos).unwrap();
    let inp = DeviceMergeInputs {
        feat: &feat,
        importance: &importance,
        nbhd: &nbhd,
        centres: &centres,
        pos: &pos,
        weight_net: &net,
        offset_clamp: None,
        batch: b,
        tokens: n,
        kept,
        channels: c,
    };
    let grad_out = upload_as::<T>(device, &rounded.coef);
    let got = device_merge_backward(device, &inp, &grad_out, &inverse).unwrap();
    let what = format!("{} on {device:?} (global lists: {global})", T::SUFFIX);
    assert_slices_close(
        &format!("dfeat, {what}"),
        &download_f32(device, &got.feat),
        &want.feat,
        tol,
    );
    let dp = device.download(&got.importance).unwrap();
    assert_slices_close(&format!("dimportance, {what}"), &dp, &want.importance, tol);
    let net_grads = device.download(&got.weight_net).unwrap();
    let want_net: Vec<f32> = [
        &want.net_weight,
        &want.net_bias,
        &want.norm_weight,
        &want.norm_bias,
    ]
    .into_iter()
    .flatten()
    .copied()
    .collect();
    assert_slices_close(&format!("dweight_net, {what}"), &net_grads, &want_net, tol);
    let again = device_merge_backward(device, &inp, &grad_out, &inverse).unwrap();
    assert_eq!(
        device.download(&again.weight_net).unwrap(),
        net_grads,
        "{what}: rerun"
    );
}

#[test]
fn merge_backward_kernels_match_the_cpu() {
    let cases = [
        MergeProblem::new(41, 2, 23, 5, 7, Lists::Clusters { s: 4, nnc: 3 }),
        MergeProblem::new(42, 2, 9, 33, 3, Lists::Global),
        MergeProblem::new(43, 3, 16, 5, 5, Lists::SharedClusters { s: 4, nnc: 2 }),
        MergeProblem::new(44, 2, 12, 5, 4, Lists::Arbitrary { m: 7 }),
        MergeProblem::new(45, 2, 40, 300, 10, Lists::Clusters { s: 8, nnc: 3 }),
        // Tokens held by ~47 centres: the token gather's chunks of 32.
        MergeProblem::new(46, 1, 70, 5, 60, Lists::Clusters { s: 8, nnc: 7 }),
    ];
    for device in common::devices() {
        for (k, problem) in cases.iter().enumerate() {
            check_merge_kernels::<f32>(&device, problem, false, 1e-4);
            if k == 1 {
                check_merge_kernels::<f32>(&device, problem, true, 1e-4);
            }
        }
        check_merge_kernels::<half::f16>(&device, &cases[0], false, 5e-3);
        check_merge_kernels::<half::bf16>(&device, &cases[0], false, 3e-2);
    }
}

#[test]
fn importance_backward_kernels_match_the_cpu() {
    let mut rng = Rng(51);
    for device in common::devices() {
        for (rows, dim) in [(37, 45), (5, 1), (64, 300)] {
            let x = rng.floats(rows * dim, 1.0);
            let w = rng.floats(dim, 0.3);
            let p = importance(&x, &w, 0.1, rows, dim).unwrap();
            let coef = rng.floats(rows, 1.0);
            let want = importance_backward(&x, &w, &p, &coef, rows, dim).unwrap();
            let (dx, dw) = (device.upload(&x).unwrap(), device.upload(&w).unwrap());
            let (dp, dg) = (device.upload(&p).unwrap(), device.upload(&coef).unwrap());
            let got = autofocus::ops::token_selection::gpu::importance_backward(
                &device,
                &dx,
                &dw,
                &dp,
                &dg,
                (rows, dim),
            )
            .unwrap();
            let what = format!("{rows}×{dim} on {device:?}");
            assert_slices_close(
                &format!("dx, {what}"),
                &device.download(&got.x).unwrap(),
                &want.x,
                1e-5,
            );
            let params = device.download(&got.params).unwrap();
            assert_slices_close(&format!("dw, {what}"), &params[..dim], &want.weight, 1e-5);
            assert_slices_close(&format!("db, {what}"), &params[dim..], &[want.bias], 1e-5);
        }
    }
}

/// Every preset's clustered stages plan the tiled key kernel within the
/// shared memory a launch may use, staging at least a cluster's average
/// holders (m) in f16/bf16, and in f32 except at cluster size 24 (m = 144,
/// d 32: 111 of them, the rest read from global memory).
#[test]
fn every_preset_plans_the_tiled_key_gradients() {
    fn check<T: Element>(name: &str, stage: usize, m: usize, s: usize, d: usize) {
        let what = format!("{name} stage {stage} (m {m}, s {s}, d {d}) {}", T::SUFFIX);
        let KeyGradientPlan::Tiled(plan) = key_gradient_plan::<T>(m, Some(s), d) else {
            panic!("{what}: planned for the generic key kernel");
        };
        assert!(
            plan.shared_bytes <= autofocus::gpu::MAX_SHARED_BYTES,
            "{what}: {plan:?}"
        );
        assert!(plan.staged_queries <= m * 3 / 2 + 1, "{what}: {plan:?}");
        if T::SUFFIX != "f32" || s != 24 {
            assert!(plan.staged_queries >= m, "{what}: {plan:?}");
        }
    }
    for (name, stage, m, s, d) in common::preset_stage_shapes() {
        check::<f32>(name, stage, m, s, d);
        check::<half::f16>(name, stage, m, s, d);
        check::<half::bf16>(name, stage, m, s, d);
    }
}

/// On the layouts the model makes (stage 0 of aff_tiny at 224² and of
/// aff_base_22kto1k_384 at 384²) every cluster's holders fit the bf16
/// plan's staging: they spread around m (the average), up to ~1.3·m.
#[test]
fn model_layouts_holders_fit_the_key_staging() {
    for (h, w, s, nnc, clusters, nearest) in common::model_stage0_layouts() {
        let mut holders = vec![0usize; clusters];
        for &k in &nearest {
            holders[k as usize] += 1;
        }
        let m = s * nnc;
        let KeyGradientPlan::Tiled(plan) = key_gradient_plan::<half::bf16>(m, Some(s), 32) else {
            panic!("{h}x{w}: planned for the generic key kernel");
        };
        let most = *holders.iter().max().unwrap();
        assert!(
            most <= plan.staged_queries,
            "{h}x{w} s {s}: {most} holders, {plan:?}"
        );
        // Not equal by construction: a cluster's holders vary.
        assert!(most > m, "{h}x{w} s {s}: at most {most} holders");
    }
}
