//! The candle backend (feature `candle`) against this crate's own ops: the
//! custom op's forward and the gradients candle's autograd gets through it
//! must be the ops' own results, bit for bit in f32 on the CPU (the ops'
//! backward is checked against finite differences in `tests/backward.rs`).
//! With feature `candle-cuda` and a GPU, the same cases run on candle's GPU
//! too, through this crate's kernels, within the spec's f32 tolerance.
#![cfg(feature = "candle")]

use autofocus::candle::{ClusterAttention, NeighbourSlots, PointConvMerge};
use autofocus::io::F32Buffer;
use autofocus::model::ClusterLayout;
use autofocus::ops::cluster_attention::backward::{
    AttentionGradInputs, AttentionGrads, cluster_attention_backward,
};
use autofocus::ops::cluster_attention::{AttentionInputs, cluster_attention_with_lse};
use autofocus::ops::clustering::{KeyScope, grid_positions};
use autofocus::ops::neighbourhood::InverseNeighbourhood;
use autofocus::ops::pointconv_merge::backward::{
    MergeGradInputs, MergeGrads, pointconv_merge_backward,
};
use autofocus::ops::pointconv_merge::{
    INNER_CHANNELS, MergeInputs, pointconv_merge, weight_net_table,
};
use autofocus::ops::rel_pos::OffsetTable;
use autofocus::ops::{LayerNorm, Linear};
use candle_core::{DType, Device, Tensor, Var};

mod common;

/// Deterministic values in [-1, 1).
fn values(len: usize, seed: u64) -> Vec<f32> {
    common::SplitMix(seed).floats(len, 1.0)
}

/// The neighbour slots of a test layout, its bias rows as each slot's row,
/// with the tokens' positions (which the GPU kernels read).
fn slots(layout: &ClusterLayout, offsets: &OffsetTable) -> NeighbourSlots {
    NeighbourSlots::new(
        layout.nbhd.clone(),
        layout.bias_rows.clone(),
        offsets.clone(),
    )
    .unwrap()
    .with_positions(layout.clustering.pos.clone())
    .unwrap()
}

/// The op's result against the ops': bit for bit on the CPU (the same
/// code); on a GPU, whose kernels sum in another order, within the spec's
/// f32 tolerance.
fn assert_agrees(what: &str, got: &[f32], want: &[f32], dev: &Device) {
    if dev.is_cpu() {
        assert_eq!(got, want, "{what}");
    } else {
        common::assert_within(&format!("{what} on {dev:?}"), got, want, 1e-4);
    }
}

/// The gradients of `Σ out · coef` through candle's autograd.
fn backward_of_weighted_sum(out: &Tensor, coef: &[f32]) -> candle_core::backprop::GradStore {
    let coef = Tensor::from_vec(coef.to_vec(), out.dims(), out.device()).unwrap();
    (out * &coef)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
}

/// Every variable's gradient has its shape and the ops' values (as
/// [`assert_agrees`] compares them), and is not all zero (which would test
/// nothing).
fn assert_gradients(
    grads: &candle_core::backprop::GradStore,
    want: &[(&str, &Var, &Vec<f32>)],
    dev: &Device,
) {
    for &(name, var, want) in want {
        let got = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(got.dims(), var.dims(), "{name}: gradient shape");
        assert_agrees(name, &flat(got), want, dev);
        assert!(
            want.iter().any(|&g| g != 0.0),
            "{name}: a zero gradient tests nothing"
        );
    }
}

/// A clustered stage on an `h × w` grid (clusters of 8, neighbourhoods of
/// 24, the last cluster padded when 8 does not divide the tokens), for a
/// batch of `b`: one layout per image, or one shared by the batch.
struct Case {
    b: usize,
    n: usize,
    heads: usize,
    d: usize,
    layout: ClusterLayout,
    offsets: OffsetTable,
    q: Vec<f32>,
    kv: Vec<f32>,
    pos_weight: Vec<f32>,
    pos_bias: Vec<f32>,
    blank_k: Vec<f32>,
    blank_v: Vec<f32>,
    coef: Vec<f32>,
}

impl Case {
    fn new(b: usize, (h, w): (usize, usize), heads: usize, d: usize, shared: bool) -> Self {
        let offsets = OffsetTable::new(h, w, None);
        let n = h * w;
        let images = if shared { 1 } else { b };
        let pos = grid_positions(h, w).repeat(images);
        let layout =
            ClusterLayout::build(&pos, images, n, 8, 24, &offsets, (h, w), KeyScope::Image)
                .unwrap();
        assert_eq!(layout.nbhd.images, images);
        let c = heads * d;
        Self {
            b,
            n,
            heads,
            d,
            layout,
            offsets,
            q: values(b * n * c, 1),
            kv: values(b * n * 2 * c, 2),
            pos_weight: values(heads * 5, 3),
            pos_bias: values(heads, 4),
            blank_k: values(c, 5),
            blank_v: values(c, 6),
            coef: values(b * n * c, 7),
        }
    }

    /// The op over the layout's slots; `tiled`: declared whole clusters, so
    /// that on a GPU the attention takes its tiled kernel (the CPU op is
    /// the same either way).
    fn attention(&self, tiled: bool) -> ClusterAttention {
        let mut slots = slots(&self.layout, &self.offsets);
        if tiled {
            slots = slots
                .with_cluster_size(self.layout.clustering.cluster_size)
                .unwrap();
        }
        ClusterAttention::new(&slots, self.heads).unwrap()
    }

    /// The forward output and every gradient of `Σ out · coef`, through the
    /// crate's ops directly.
    fn reference(&self) -> (Vec<f32>, AttentionGrads) {
        let (b, n, h, d) = (self.b, self.n, self.heads, self.d);
        let layer = Linear {
            weight: F32Buffer::owned(self.pos_weight.clone()),
            bias: Some(F32Buffer::owned(self.pos_bias.clone())),
            in_dim: 5,
            out_dim: h,
        };
        let bias_table = self.offsets.apply(&layer).unwrap();
        let bias_rows = self.layout.bias_rows.repeat(b / self.layout.nbhd.images);
        let inp = AttentionInputs {
            q: &self.q,
            q_scale: (d as f32).powf(-0.5),
            kv: &self.kv,
            nbhd: &self.layout.nbhd,
            bias_rows: &bias_rows,
            bias_table: &bias_table,
            blank_k: &self.blank_k,
            blank_v: &self.blank_v,
            batch: b,
            tokens: n,
            heads: h,
            head_dim: d,
        };
        let (out, lse) = cluster_attention_with_lse(&inp).unwrap();
        let inverse = InverseNeighbourhood::new(&self.layout.nbhd).unwrap();
        let grads = cluster_attention_backward(&AttentionGradInputs {
            forward: &inp,
            out: &out,
            lse: &lse,
            grad_out: &self.coef,
            inverse: &inverse,
            offsets: &self.offsets,
        })
        .unwrap();
        (out, grads)
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn check_against_the_ops(case: &Case) {
    for dev in common::candle_devices() {
        for tiled in [false, true] {
            check_against_the_ops_on(case, &dev, tiled);
        }
    }
}

fn check_against_the_ops_on(case: &Case, dev: &Device, tiled: bool) {
    let (b, n, h, c) = (case.b, case.n, case.heads, case.heads * case.d);
    let var = |v: &[f32], shape: &[usize]| Var::from_vec(v.to_vec(), shape, dev).unwrap();
    let q = var(&case.q, &[b, n, c]);
    let kv = var(&case.kv, &[b, n, 2 * c]);
    let pos_weight = var(&case.pos_weight, &[h, 5]);
    let pos_bias = var(&case.pos_bias, &[h]);
    // The published blank token is 1×1×c: any shape of c values is taken.
    let blank_k = var(&case.blank_k, &[1, 1, c]);
    let blank_v = var(&case.blank_v, &[c]);
    let out = case
        .attention(tiled)
        .forward(&q, &kv, &pos_weight, &pos_bias, &blank_k, &blank_v)
        .unwrap();
    assert_eq!(out.dims(), [b, n, c]);
    let grads = backward_of_weighted_sum(&out, &case.coef);

    let (want_out, want) = case.reference();
    assert_agrees(
        &format!("forward (tiled: {tiled})"),
        &flat(&out),
        &want_out,
        dev,
    );
    assert_gradients(
        &grads,
        &[
            ("q", &q, &want.q),
            ("kv", &kv, &want.kv),
            ("pos_weight", &pos_weight, &want.pos_weight),
            ("pos_bias", &pos_bias, &want.pos_bias),
            ("blank_k", &blank_k, &want.blank_k),
            ("blank_v", &blank_v, &want.blank_v),
        ],
        dev,
    );
}

#[test]
fn attention_matches_the_ops_with_a_layout_per_image() {
    // 11 × 13 = 143 tokens: the last cluster padded, so masks are on.
    let case = Case::new(2, (11, 13), 2, 8, false);
    assert!(case.layout.nbhd.mask.is_some());
    check_against_the_ops(&case);
}

#[test]
fn attention_matches_the_ops_with_a_layout_shared_by_the_batch() {
    check_against_the_ops(&Case::new(3, (8, 8), 3, 5, true));
}

/// f16 and bf16 tensors: the op computes in f32 on the exactly widened
/// inputs and rounds its output once, and the gradients come back in the
/// inputs' dtypes.
#[test]
fn attention_takes_half_precision_tensors() {
    for dev in common::candle_devices() {
        half_precision_on(&dev);
    }
}

fn half_precision_on(dev: &Device) {
    let case = Case::new(1, (8, 8), 2, 8, false);
    let (n, h, c) = (case.n, case.heads, case.heads * case.d);
    let both_kernels = [false, true];
    for (dtype, tiled) in [DType::F16, DType::BF16]
        .into_iter()
        .flat_map(|dtype| both_kernels.map(|tiled| (dtype, tiled)))
    {
        let tensor = |v: &[f32], shape: &[usize]| {
            Tensor::from_vec(v.to_vec(), shape, dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let q = Var::from_tensor(&tensor(&case.q, &[1, n, c])).unwrap();
        let kv = tensor(&case.kv, &[1, n, 2 * c]);
        let (w, bias) = (
            tensor(&case.pos_weight, &[h, 5]),
            tensor(&case.pos_bias, &[h]),
        );
        let (bk, bv) = (tensor(&case.blank_k, &[c]), tensor(&case.blank_v, &[c]));
        let out = case
            .attention(tiled)
            .forward(&q, &kv, &w, &bias, &bk, &bv)
            .unwrap();
        assert_eq!(out.dtype(), dtype);
        // The same op on the rounded inputs, in f32, rounded once.
        let widened = Case {
            q: flat(&q),
            kv: flat(&kv),
            pos_weight: flat(&w),
            pos_bias: flat(&bias),
            blank_k: flat(&bk),
            blank_v: flat(&bv),
            ..Case::new(1, (8, 8), 2, 8, false)
        };
        let want = Tensor::from_vec(widened.reference().0, (1, n, c), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        if dev.is_cpu() {
            assert_eq!(flat(&out), flat(&want), "{dtype:?} (tiled: {tiled})");
        } else {
            // The kernels' f32 differs in the last bits, which can move
            // the rounding by one unit of the half type.
            let unit = if dtype == DType::BF16 {
                2f32.powi(-7)
            } else {
                2f32.powi(-10)
            };
            common::assert_within(
                &format!("{dtype:?} on {dev:?} (tiled: {tiled})"),
                &flat(&out),
                &flat(&want),
                unit,
            );
        }
        let grads = out.sum_all().unwrap().backward().unwrap();
        let dq = grads.get(&q).expect("dq");
        assert_eq!((dq.dtype(), dq.dims()), (dtype, q.dims()));
    }
}

#[test]
fn bad_shapes_are_errors_naming_the_tensor() {
    let case = Case::new(1, (8, 8), 2, 8, false);
    let dev = Device::Cpu;
    let (n, c) = (case.n, 16);
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &dev).unwrap();
    let attention = case.attention(false);
    let q = zeros(&[1, n, c]);
    let (w, b, bk, bv) = (zeros(&[2, 5]), zeros(&[2]), zeros(&[c]), zeros(&[c]));
    let err = |r: candle_core::Result<Tensor>| r.unwrap_err().to_string();

    let e = err(attention.forward(&q, &zeros(&[1, n, c]), &w, &b, &bk, &bv));
    assert!(e.contains("`kv`") && e.contains("[1, 64, 32]"), "{e}");
    let e = err(attention.forward(&q, &zeros(&[1, n, 2 * c]), &zeros(&[2, 4]), &b, &bk, &bv));
    assert!(e.contains("`pos_weight`") && e.contains("[2, 4]"), "{e}");
    let e = err(attention.forward(
        &zeros(&[1, n + 1, c]),
        &zeros(&[1, n + 1, 2 * c]),
        &w,
        &b,
        &bk,
        &bv,
    ));
    assert!(e.contains("`q`") && e.contains("65 tokens"), "{e}");
    let e = err(attention.forward(
        &zeros(&[1, n, 15]),
        &zeros(&[1, n, 30]),
        &w,
        &b,
        &zeros(&[15]),
        &zeros(&[15]),
    ));
    assert!(e.contains("15 channels") && e.contains("2 heads"), "{e}");
    let ints = Tensor::zeros((1, n, c), DType::U32, &dev).unwrap();
    let e = err(attention.forward(&ints, &zeros(&[1, n, 2 * c]), &w, &b, &bk, &bv));
    assert!(e.contains("f32, f16 or bf16"), "{e}");

    let short = NeighbourSlots::new(case.layout.nbhd.clone(), vec![0; 3], case.offsets.clone())
        .unwrap_err()
        .to_string();
    assert!(
        short.contains("`rows`") && short.contains("found 3"),
        "{short}"
    );
    let images = case.layout.nbhd.images;
    let positions = slots(&case.layout, &case.offsets)
        .with_positions(vec![0.0; images * n * 2 - 1])
        .unwrap_err()
        .to_string();
    assert!(
        positions.contains("`pos`") && positions.contains(&format!("[{images}, {n}, 2]")),
        "{positions}"
    );
    // Lists of clusters of 8 are not whole clusters of 3 (24 slots each,
    // split in 3s), nor of 0.
    for s in [3, 0] {
        let not_clusters = slots(&case.layout, &case.offsets)
            .with_cluster_size(s)
            .unwrap_err()
            .to_string();
        assert!(
            not_clusters.contains(&format!("not whole clusters of {s} ")),
            "{not_clusters}"
        );
    }
    let no_heads = ClusterAttention::new(&slots(&case.layout, &case.offsets), 0)
        .unwrap_err()
        .to_string();
    assert!(no_heads.contains("`heads`"), "{no_heads}");
}

// ------------------------------------------------------------ merge ----

/// A merge over a clustered stage: every third token kept as a centre.
struct MergeCase {
    b: usize,
    n: usize,
    c: usize,
    layout: ClusterLayout,
    offsets: OffsetTable,
    centres: Vec<u32>,
    feat: Vec<f32>,
    importance: Vec<f32>,
    /// Linear(5 → 4) weight and bias, LayerNorm(4) weight and bias.
    net: [Vec<f32>; 4],
    coef: Vec<f32>,
}

impl MergeCase {
    fn new(b: usize, (h, w): (usize, usize), c: usize, shared: bool) -> Self {
        let attention = Case::new(b, (h, w), 1, c, shared);
        let n = h * w;
        let centres: Vec<u32> = (0..b).flat_map(|_| (0..n as u32).step_by(3)).collect();
        let kept = centres.len() / b;
        Self {
            b,
            n,
            c,
            layout: attention.layout,
            offsets: attention.offsets,
            centres,
            feat: values(b * n * c, 11),
            importance: values(b * n, 12).iter().map(|v| 0.5 + 0.4 * v).collect(),
            net: [
                values(5 * INNER_CHANNELS, 13),
                values(INNER_CHANNELS, 14),
                values(INNER_CHANNELS, 15)
                    .iter()
                    .map(|v| 1.0 + 0.2 * v)
                    .collect(),
                values(INNER_CHANNELS, 16),
            ],
            coef: values(b * kept * INNER_CHANNELS * c, 17),
        }
    }

    fn merge(&self) -> PointConvMerge {
        PointConvMerge::new(
            &slots(&self.layout, &self.offsets),
            self.centres.clone(),
            self.b,
        )
        .unwrap()
    }

    fn reference(&self) -> (Vec<f32>, MergeGrads) {
        let linear = Linear {
            weight: F32Buffer::owned(self.net[0].clone()),
            bias: Some(F32Buffer::owned(self.net[1].clone())),
            in_dim: 5,
            out_dim: INNER_CHANNELS,
        };
        let norm = LayerNorm {
            weight: F32Buffer::owned(self.net[2].clone()),
            bias: F32Buffer::owned(self.net[3].clone()),
        };
        let table = weight_net_table(&self.offsets, &linear, &norm).unwrap();
        let rows = self
            .layout
            .bias_rows
            .repeat(self.b / self.layout.nbhd.images);
        let inp = MergeInputs {
            feat: &self.feat,
            importance: &self.importance,
            nbhd: &self.layout.nbhd,
            centres: &self.centres,
            weight_rows: &rows,
            weight_table: &table,
            batch: self.b,
            tokens: self.n,
            channels: self.c,
        };
        let merged = pointconv_merge(&inp).unwrap();
        let inverse = InverseNeighbourhood::new(&self.layout.nbhd).unwrap();
        let grads = pointconv_merge_backward(&MergeGradInputs {
            forward: &inp,
            grad_out: &self.coef,
            inverse: &inverse,
            offsets: &self.offsets,
            weight_net: &linear,
            weight_norm: &norm,
        })
        .unwrap();
        (merged, grads)
    }
}

fn check_merge_against_the_ops(case: &MergeCase) {
    for dev in common::candle_devices() {
        check_merge_against_the_ops_on(case, &dev);
    }
}

fn check_merge_against_the_ops_on(case: &MergeCase, dev: &Device) {
    let (b, n, c) = (case.b, case.n, case.c);
    let kept = case.centres.len() / b;
    let var = |v: &[f32], shape: &[usize]| Var::from_vec(v.to_vec(), shape, dev).unwrap();
    let feat = var(&case.feat, &[b, n, c]);
    // The published importance is b×n×1.
    let importance = var(&case.importance, &[b, n, 1]);
    let net_weight = var(&case.net[0], &[INNER_CHANNELS, 5]);
    let net_bias = var(&case.net[1], &[INNER_CHANNELS]);
    let norm_weight = var(&case.net[2], &[INNER_CHANNELS]);
    let norm_bias = var(&case.net[3], &[INNER_CHANNELS]);
    let merged = case
        .merge()
        .forward(
            &feat,
            &importance,
            &net_weight,
            &net_bias,
            &norm_weight,
            &norm_bias,
        )
        .unwrap();
    assert_eq!(merged.dims(), [b, kept, INNER_CHANNELS * c]);
    let grads = backward_of_weighted_sum(&merged, &case.coef);

    let (want_merged, want) = case.reference();
    assert_agrees("forward", &flat(&merged), &want_merged, dev);
    assert_gradients(
        &grads,
        &[
            ("feat", &feat, &want.feat),
            ("importance", &importance, &want.importance),
            ("net_weight", &net_weight, &want.net_weight),
            ("net_bias", &net_bias, &want.net_bias),
            ("norm_weight", &norm_weight, &want.norm_weight),
            ("norm_bias", &norm_bias, &want.norm_bias),
        ],
        dev,
    );
}

#[test]
fn merge_matches_the_ops_with_a_layout_per_image() {
    check_merge_against_the_ops(&MergeCase::new(2, (11, 13), 6, false));
}

#[test]
fn merge_matches_the_ops_with_a_layout_shared_by_the_batch() {
    check_merge_against_the_ops(&MergeCase::new(3, (8, 8), 5, true));
}

#[test]
fn merge_shapes_are_checked() {
    let case = MergeCase::new(1, (8, 8), 4, false);
    let dev = Device::Cpu;
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &dev).unwrap();
    let merge = case.merge();
    let (w, b, nw, nb) = (zeros(&[4, 5]), zeros(&[4]), zeros(&[4]), zeros(&[4]));
    let err = |r: candle_core::Result<Tensor>| r.unwrap_err().to_string();
    let e = err(merge.forward(&zeros(&[1, 64, 4]), &zeros(&[1, 63]), &w, &b, &nw, &nb));
    assert!(e.contains("`importance`") && e.contains("[1, 63]"), "{e}");
    let e = err(merge.forward(
        &zeros(&[1, 64, 4]),
        &zeros(&[1, 64]),
        &zeros(&[5, 4, 1]),
        &b,
        &nw,
        &nb,
    ));
    assert!(e.contains("`net_weight`") && e.contains("[5, 4, 1]"), "{e}");
    let e = err(merge.forward(&zeros(&[2, 64, 4]), &zeros(&[2, 64]), &w, &b, &nw, &nb));
    assert!(e.contains("batch of 2") && e.contains("centres 1"), "{e}");
    let slots = slots(&case.layout, &case.offsets);
    let e = PointConvMerge::new(&slots, vec![0, 64], 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`centres`") && e.contains("below 64"), "{e}");
    let e = PointConvMerge::new(&slots, vec![0, 1, 2], 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`centres`") && e.contains("found 3"), "{e}");
}
