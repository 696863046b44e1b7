//! Kernel benchmarks on GPU 0; without one, only the layout's stable sort,
//! on the emulator (and the attention, dense-map and backward benchmarks'
//! problems run once there).
//!
//! The stage-0 layout (clustering, nearest clusters, selection) per image,
//! the fused attention at aff_tiny's stage-0 shape (b = 64, n = 3136,
//! 2 heads of 32, m = 48) in bf16 and f32 and at aff_base_22kto1k_384's
//! (b = 16, n = 9216, 4 heads of 32, clusters of 24, m = 144) in bf16, each
//! tiled and generic, dense maps at Cityscapes' grid (both searches), and
//! the backward kernels of the
//! attention and the merge against their forward there (bf16). Criterion's throughput is the HBM floor's
//! bytes — every input read once, the output written once — so the GB/s it
//! prints divided by the card's bandwidth is the fraction of the floor.

use std::cell::RefCell;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

use autofocus::gpu::{Buffer, Device, Element};
use autofocus::io::F32Buffer;
use autofocus::model::ClusterLayout;
use autofocus::ops::cluster_attention::gpu::{
    DeviceAttentionGrads, DeviceAttentionInputs, cluster_attention, cluster_attention_backward,
};
use autofocus::ops::clustering::gpu::space_filling_cluster;
use autofocus::ops::clustering::{KeyScope, grid_positions};
use autofocus::ops::dense::DenseOptions;
use autofocus::ops::dense::gpu::{DenseSearch, to_dense_searching};
use autofocus::ops::neighbourhood::InverseNeighbourhood;
use autofocus::ops::neighbourhood::gpu::{
    DeviceInverse, DeviceNeighbourhood, nearest_neighbourhoods,
};
use autofocus::ops::pointconv_merge::INNER_CHANNELS;
use autofocus::ops::pointconv_merge::gpu::{
    DeviceMergeGrads, DeviceMergeInputs, DeviceWeightNet, pointconv_merge, pointconv_merge_backward,
};
use autofocus::ops::rel_pos::OffsetTable;
use autofocus::ops::token_selection::gpu::select_tokens;
use autofocus::ops::{LayerNorm, Linear};

mod common;
use common::interleaved_ratio;

/// A stage-0 attention shape: `side`² tokens in clusters of `s`.
struct AttentionShape {
    name: &'static str,
    b: usize,
    side: usize,
    heads: usize,
    d: usize,
    s: usize,
    nnc: usize,
}

const AFF_TINY_STAGE0: AttentionShape = AttentionShape {
    name: "aff_tiny_stage0_b64",
    b: 64,
    side: 56,
    heads: 2,
    d: 32,
    s: 8,
    nnc: 6,
};

/// Where the tiled kernel recomputes the features per head to fit its tile.
const AFF_BASE_384_STAGE0: AttentionShape = AttentionShape {
    name: "aff_base_384_stage0_b16",
    b: 16,
    side: 96,
    heads: 4,
    d: 32,
    s: 24,
    nnc: 6,
};

/// Benchmarks `shape` tiled and generic; without `c`, runs each once and
/// checks the output is finite.
fn attention<T: Element>(c: Option<&mut Criterion>, device: &Device, shape: &AttentionShape) {
    let AttentionShape {
        name,
        b,
        side,
        heads,
        d,
        s,
        nnc,
    } = *shape;
    let n = side * side;
    let ch = heads * d;
    let m = nnc * s;
    let k = n / s;
    let values = |len: usize, seed: usize| -> Vec<T> {
        (0..len)
            .map(|i| T::from_f32((((i * 7919 + seed) % 1000) as f32 / 500.0) - 1.0))
            .collect()
    };
    let pos: Vec<f32> = (0..b)
        .flat_map(|_| (0..n).flat_map(|t| [(t % side) as f32, (t / side) as f32]))
        .collect();
    // Cluster means: runs of s tokens along rows (the layout's cost is not timed here).
    let means: Vec<f32> = (0..b)
        .flat_map(|_| {
            (0..k).flat_map(|c| {
                let t = c * s;
                [(t % side) as f32 + (s - 1) as f32 / 2.0, (t / side) as f32]
            })
        })
        .collect();
    let dpos = device.upload(&pos).unwrap();
    let dmeans = device.upload(&means).unwrap();
    let mut nbhd = nearest_neighbourhoods(device, &dpos, &dmeans, (b, n, k), nnc, s).unwrap();
    let q = device.upload(&values(b * n * ch, 1)).unwrap();
    let kv = device.upload(&values(b * n * 2 * ch, 2)).unwrap();
    let pos_weight = device.upload(&vec![0.01f32; heads * 5]).unwrap();
    let pos_bias = device.upload(&vec![0.0f32; heads]).unwrap();
    let blank = device.upload(&vec![0.1f32; ch]).unwrap();
    let mut out = device.zeros::<T>(b * n * ch).unwrap();
    // Floor: q, kv, out once each; neighbour indices (i32) and positions once.
    let elem = size_of::<T>();
    let floor_bytes = b * n * (ch * elem + 2 * ch * elem + ch * elem + m * 4 + 2 * 4);
    let mut group = c.map(|c| {
        let mut group = c.benchmark_group("cluster_attention");
        group.throughput(Throughput::Bytes(floor_bytes as u64));
        group
    });
    // The same lists with their cluster structure (the tiled kernel), then
    // without it (the generic kernel).
    for (variant, cluster_size) in [("tiled", Some(s)), ("generic", None)] {
        nbhd.cluster_size = cluster_size;
        let inputs = DeviceAttentionInputs {
            q: &q,
            q_scale: (d as f32).powf(-0.5),
            kv: &kv,
            nbhd: &nbhd,
            pos: &dpos,
            pos_weight: &pos_weight,
            pos_bias: &pos_bias,
            blank_k: &blank,
            blank_v: &blank,
            offset_clamp: None,
            batch: b,
            tokens: n,
            heads,
            head_dim: d,
        };
        let id = format!("{name}_{}_{variant}", T::SUFFIX);
        if let Some(group) = group.as_mut() {
            group.bench_function(id, |bench| {
                bench.iter(|| {
                    cluster_attention(device, &inputs, &mut out).unwrap();
                    device.synchronize().unwrap();
                })
            });
        } else {
            cluster_attention(device, &inputs, &mut out).unwrap();
            let got = device.download(&out).unwrap();
            assert!(got.iter().all(|v| v.to_f32().is_finite()), "{id}");
        }
    }
    if let Some(group) = group {
        group.finish();
    }
}

/// Without a GPU: each attention benchmark's problem, shrunk to one image
/// of 24×24 tokens, once through both kernels on the emulator, so the GPU
/// run finds its inputs consistent.
fn attention_once_on_the_emulator() {
    let device = Device::emulator();
    for shape in [AFF_TINY_STAGE0, AFF_BASE_384_STAGE0] {
        let small = AttentionShape {
            b: 1,
            side: 24,
            ..shape
        };
        attention::<half::bf16>(None, &device, &small);
    }
    eprintln!("attention benchmark: its problems ran once on the emulator at 24×24, batch 1");
}

/// Dense maps on Cityscapes' stage-0 grid (`(h, w)` = 256×512 cells) at
/// stage 2's density (a token on every 4th cell of every 4th row: 8192, many
/// equal distances), 256 channels, f32, one image: every token searched
/// against the rings. Without `c`, runs each once and checks the two agree.
fn dense(c: Option<&mut Criterion>, device: &Device, (h, w): (usize, usize)) {
    let (across, channels) = (w / 4, 256);
    let n = across * (h / 4);
    let pos: Vec<f32> = (0..n)
        .flat_map(|t| [(t % across * 4) as f32, (t / across * 4) as f32])
        .collect();
    let feat: Vec<f32> = (0..n * channels)
        .map(|i| (i % 1000) as f32 / 1000.0)
        .collect();
    let (pos, feat) = (device.upload(&pos).unwrap(), device.upload(&feat).unwrap());
    let mut out = device.zeros::<f32>(channels * h * w).unwrap();
    let run = |search, out: &mut Buffer<f32>| {
        let sizes = (1, n, channels);
        let options = DenseOptions::default();
        to_dense_searching(device, &pos, &feat, out, sizes, (h, w), options, search).unwrap();
        device.synchronize().unwrap();
    };
    let Some(c) = c else {
        let mut maps = Vec::new();
        for search in [DenseSearch::AllTokens, DenseSearch::Rings] {
            run(search, &mut out);
            maps.push(device.download(&out).unwrap());
        }
        assert_eq!(maps[0], maps[1], "the two searches disagree");
        eprintln!("dense benchmark: its problem ran once on the emulator at {h}×{w}");
        return;
    };
    let mut group = c.benchmark_group("to_dense");
    group.sample_size(10);
    for search in [DenseSearch::AllTokens, DenseSearch::Rings] {
        let id = format!("{h}x{w}_n{n}_c{channels}_f32_{search:?}");
        group.bench_function(id, |bench| bench.iter(|| run(search, &mut out)));
    }
    group.finish();
}

/// Stage-0 layout and selection per image: clustering + nearest clusters +
/// selection, uncached (the model computes the stage-0 layout once per
/// grid), at 224² (56×56 tokens, batch 64), ADE20K 512² (128×128, batch 8)
/// and Cityscapes 1024×2048 (256×512, batch 2); clusters of 8, 6 nearest.
/// Throughput in images, so criterion reports images/s (µs per image =
/// 1e6/that).
fn layout(c: &mut Criterion, device: &Device) {
    let (s, nnc) = (8usize, 6usize);
    let mut group = c.benchmark_group("stage0_layout");
    group.sample_size(10);
    for (name, b, (h, w)) in [
        ("224", 64usize, (56usize, 56usize)),
        ("512", 8, (128, 128)),
        ("1024x2048", 2, (256, 512)),
    ] {
        let n = h * w;
        let pos: Vec<f32> = (0..b)
            .flat_map(|_| (0..n).flat_map(|t| [(t % w) as f32, (t / w) as f32]))
            .collect();
        let importance: Vec<f32> = (0..b * n)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
            .collect();
        let dpos = device.upload(&pos).unwrap();
        let dimp = device.upload(&importance).unwrap();
        group.throughput(Throughput::Elements(b as u64));
        group.bench_function(format!("cluster+nearest+select_b{b}_{name}"), |bench| {
            bench.iter(|| {
                let clustering =
                    space_filling_cluster(device, &dpos, b, n, s, (h, w), KeyScope::Batch).unwrap();
                let k = clustering.clusters;
                let nbhd = nearest_neighbourhoods(
                    device,
                    &clustering.pos,
                    &clustering.means,
                    (b, n, k),
                    nnc,
                    s,
                )
                .unwrap();
                let selection =
                    select_tokens(device, &clustering.pos, &dimp, b, n, 2, 4.0, 0.25).unwrap();
                device.synchronize().unwrap();
                (nbhd, selection)
            })
        });
    }
    group.finish();
}

/// The layout's stable sort (clustering keys, token selection) per image at
/// the token counts of stage 1 for 224² (784), 512² (4096) and 1024×2048
/// (32768), and stage 0 of 1024×2048 (131072), with ties, against the
/// CPU's stable sort of the same keys.
fn sort(c: &mut Criterion, device: &Device, name: &str) {
    let mut group = c.benchmark_group(format!("stable_sort_{name}"));
    group.sample_size(10);
    for n in [784usize, 4096, 32_768, 131_072] {
        // Keys as clustering makes them: anchor rank · scale + ratio, ties
        // where f32 absorbs the ratio.
        let keys: Vec<f32> = (0..n)
            .map(|i| (i * 7919 % n / 8) as f32 * 17.0 + ((i * 31) % 97) as f32 / 97.0)
            .collect();
        let dkeys = device.upload(&keys).unwrap();
        let mut order = device.alloc::<i32>(n).unwrap();
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("n{n}"), |bench| {
            bench.iter(|| {
                autofocus::gpu::sort::stable_sort(device, &dkeys, &mut order, 1, n).unwrap();
                device.synchronize().unwrap();
            })
        });
        group.bench_function(format!("n{n}_cpu_std"), |bench| {
            bench.iter(|| {
                let mut idx: Vec<u32> = (0..n as u32).collect();
                idx.sort_by(|&a, &b| keys[a as usize].total_cmp(&keys[b as usize]));
                idx
            })
        });
    }
    group.finish();
}

/// A stage-0 problem for the backward kernels against their forward: the
/// aff_tiny shape at `grid` (tokens in clustered order, clusters of 8, six
/// nearest: m = 48), one layout shared by the `b` images; the attention
/// with 2 heads of 32 channels (the tiled kernel), the merge at 64 channels
/// keeping every fourth token. The targets on the CPU are ≤ 2.5×
/// (attention) and ≤ 3× (merge); `benches/backward.rs` measures those.
struct BackwardProblem<T: Element> {
    b: usize,
    n: usize,
    kept: usize,
    nbhd: DeviceNeighbourhood,
    /// The same lists without their cluster size: the generic kernels.
    nbhd_lists: DeviceNeighbourhood,
    inverse: DeviceInverse,
    pos: Buffer<f32>,
    q: Buffer<T>,
    kv: Buffer<T>,
    pos_weight: Buffer<f32>,
    pos_bias: Buffer<f32>,
    blank: Buffer<f32>,
    /// Written by the forward (through a shared reference: the benchmark's
    /// closures hold the problem), read by the backward.
    attention_out: RefCell<Buffer<T>>,
    attention_grad: Buffer<T>,
    feat: Buffer<T>,
    importance: Buffer<f32>,
    centres: Buffer<i32>,
    net: DeviceWeightNet,
    merge_out: RefCell<Buffer<T>>,
    merge_grad: Buffer<T>,
}

const HEADS: usize = 2;
const HEAD_DIM: usize = 32;
const MERGE_CHANNELS: usize = 64;

impl<T: Element> BackwardProblem<T> {
    fn new(device: &Device, grid: (usize, usize), b: usize) -> Self {
        let offsets = OffsetTable::new(grid.0, grid.1, None);
        let n = grid.0 * grid.1;
        let layout = ClusterLayout::build(
            &grid_positions(grid.0, grid.1),
            1,
            n,
            8,
            48,
            &offsets,
            grid,
            KeyScope::Batch,
        )
        .unwrap();
        let values = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| (((i * 7919 + seed) % 1000) as f32 / 500.0) - 1.0)
                .collect()
        };
        let stored = |len: usize, seed: usize| -> Buffer<T> {
            let v: Vec<T> = values(len, seed).into_iter().map(T::from_f32).collect();
            device.upload(&v).unwrap()
        };
        let ch = HEADS * HEAD_DIM;
        let kept = n / 4;
        let centres: Vec<i32> = (0..b)
            .flat_map(|_| (0..kept as i32).map(|i| i * 4))
            .collect();
        let norm = LayerNorm {
            weight: F32Buffer::owned(vec![1.0; INNER_CHANNELS]),
            bias: F32Buffer::owned(vec![0.0; INNER_CHANNELS]),
        };
        let net = Linear {
            weight: F32Buffer::owned(values(INNER_CHANNELS * 5, 3)),
            bias: Some(F32Buffer::owned(values(INNER_CHANNELS, 4))),
            in_dim: 5,
            out_dim: INNER_CHANNELS,
        };
        let importance: Vec<f32> = values(b * n, 5).iter().map(|v| v.abs()).collect();
        let merged = b * kept * INNER_CHANNELS * MERGE_CHANNELS;
        Self {
            b,
            n,
            kept,
            nbhd: DeviceNeighbourhood::upload_clustered(device, &layout.nbhd, 8).unwrap(),
            nbhd_lists: DeviceNeighbourhood::upload(device, &layout.nbhd).unwrap(),
            inverse: DeviceInverse::upload(
                device,
                &InverseNeighbourhood::new(&layout.nbhd).unwrap(),
            )
            .unwrap(),
            pos: device.upload(&layout.clustering.pos.repeat(b)).unwrap(),
            q: stored(b * n * ch, 1),
            kv: stored(b * n * 2 * ch, 2),
            pos_weight: device.upload(&[0.01f32; HEADS * 5]).unwrap(),
            pos_bias: device.upload(&[0.0f32; HEADS]).unwrap(),
            blank: device.upload(&vec![0.1f32; ch]).unwrap(),
            attention_out: RefCell::new(device.zeros::<T>(b * n * ch).unwrap()),
            attention_grad: stored(b * n * ch, 6),
            feat: stored(b * n * MERGE_CHANNELS, 7),
            importance: device.upload(&importance).unwrap(),
            centres: device.upload(&centres).unwrap(),
            net: DeviceWeightNet::upload(device, &net, &norm).unwrap(),
            merge_out: RefCell::new(device.zeros::<T>(merged).unwrap()),
            merge_grad: stored(merged, 8),
        }
    }

    fn attention_inputs(&self) -> DeviceAttentionInputs<'_, T> {
        DeviceAttentionInputs {
            q: &self.q,
            q_scale: (HEAD_DIM as f32).powf(-0.5),
            kv: &self.kv,
            nbhd: &self.nbhd,
            pos: &self.pos,
            pos_weight: &self.pos_weight,
            pos_bias: &self.pos_bias,
            blank_k: &self.blank,
            blank_v: &self.blank,
            offset_clamp: None,
            batch: self.b,
            tokens: self.n,
            heads: HEADS,
            head_dim: HEAD_DIM,
        }
    }

    fn merge_inputs(&self) -> DeviceMergeInputs<'_, T> {
        DeviceMergeInputs {
            feat: &self.feat,
            importance: &self.importance,
            nbhd: &self.nbhd,
            centres: &self.centres,
            pos: &self.pos,
            weight_net: &self.net,
            offset_clamp: None,
            batch: self.b,
            tokens: self.n,
            kept: self.kept,
            channels: MERGE_CHANNELS,
        }
    }

    /// The attention's forward into its output (which the backward reads).
    fn attention_forward(&self, device: &Device) {
        let mut out = self.attention_out.borrow_mut();
        cluster_attention(device, &self.attention_inputs(), &mut out).unwrap();
        device.synchronize().unwrap();
    }

    fn attention_backward(&self, device: &Device) -> DeviceAttentionGrads<T> {
        self.attention_backward_over(device, &self.nbhd)
    }

    /// As `attention_backward`, the key gradients by the generic kernel.
    fn attention_backward_generic(&self, device: &Device) -> DeviceAttentionGrads<T> {
        self.attention_backward_over(device, &self.nbhd_lists)
    }

    fn attention_backward_over(
        &self,
        device: &Device,
        nbhd: &DeviceNeighbourhood,
    ) -> DeviceAttentionGrads<T> {
        let grads = cluster_attention_backward(
            device,
            &DeviceAttentionInputs {
                nbhd,
                ..self.attention_inputs()
            },
            &self.attention_out.borrow(),
            &self.attention_grad,
            &self.inverse,
        )
        .unwrap();
        device.synchronize().unwrap();
        grads
    }

    fn merge_forward(&self, device: &Device) {
        let mut out = self.merge_out.borrow_mut();
        pointconv_merge(device, &self.merge_inputs(), &mut out).unwrap();
        device.synchronize().unwrap();
    }

    fn merge_backward(&self, device: &Device) -> DeviceMergeGrads<T> {
        let grads = pointconv_merge_backward(
            device,
            &self.merge_inputs(),
            &self.merge_grad,
            &self.inverse,
        )
        .unwrap();
        device.synchronize().unwrap();
        grads
    }
}

/// The backward kernels against their forward at aff_tiny's stage 0, batch
/// 64 (a training batch), each group ending with the median ratio of
/// alternating runs (`…/ratio`), which is what the targets are
/// about.
fn backward<T: Element>(c: &mut Criterion, device: &Device) {
    let problem = BackwardProblem::<T>::new(device, (56, 56), 64);
    let name = |op: &str| format!("backward_{op}_aff_tiny_stage0_b64_{}", T::SUFFIX);
    forward_and_backward(
        c,
        &name("attention"),
        || problem.attention_forward(device),
        || drop(problem.attention_backward(device)),
    );
    // The whole attention backward with the key gradients by the tiled
    // kernel (a block per key cluster staging its members' holders) and by
    // the generic one: the rest is the same work.
    let mut group = c.benchmark_group(name("attention_keys"));
    group.bench_function("tiled", |bench| {
        bench.iter(|| drop(problem.attention_backward(device)))
    });
    group.bench_function("generic", |bench| {
        bench.iter(|| drop(problem.attention_backward_generic(device)))
    });
    group.finish();
    forward_and_backward(
        c,
        &name("merge"),
        || problem.merge_forward(device),
        || drop(problem.merge_backward(device)),
    );
}

/// Group `name`: `forward` and `backward` timed, then their ratio. The
/// forward runs first, so the backward reads its output.
fn forward_and_backward(c: &mut Criterion, name: &str, forward: impl Fn(), backward: impl Fn()) {
    forward();
    let mut group = c.benchmark_group(name);
    group.bench_function("forward", |bench| bench.iter(&forward));
    group.bench_function("backward", |bench| bench.iter(&backward));
    group.finish();
    interleaved_ratio(name, "backward/forward", forward, backward);
}

/// Without a GPU: the benchmark's problem through every op once on the
/// emulator, at a grid small enough for it, so the GPU run finds its inputs
/// consistent (shapes, layout, inverse lists).
fn backward_once_on_the_emulator() {
    let device = Device::emulator();
    let problem = BackwardProblem::<f32>::new(&device, (11, 13), 2);
    problem.attention_forward(&device);
    problem.merge_forward(&device);
    let attention = problem.attention_backward(&device);
    let merge = problem.merge_backward(&device);
    let generic = problem.attention_backward_generic(&device);
    assert_eq!(
        device.download(&generic.kv).unwrap(),
        device.download(&attention.kv).unwrap(),
        "the tiled and generic key kernels"
    );
    let finite = |v: Vec<f32>| v.iter().all(|x| x.is_finite());
    assert!(finite(device.download(&attention.q).unwrap()));
    assert!(finite(device.download(&attention.params).unwrap()));
    assert!(finite(device.download(&merge.feat).unwrap()));
    assert!(finite(device.download(&merge.weight_net).unwrap()));
    eprintln!("backward benchmark: its problem ran once on the emulator at 11×13, batch 2");
}

fn kernels(c: &mut Criterion) {
    match Device::cuda(0) {
        Ok(device) => {
            eprintln!("benchmarking on {}", device.name());
            attention::<half::bf16>(Some(c), &device, &AFF_TINY_STAGE0);
            attention::<f32>(Some(c), &device, &AFF_TINY_STAGE0);
            attention::<half::bf16>(Some(c), &device, &AFF_BASE_384_STAGE0);
            dense(Some(c), &device, (256, 512));
            layout(c, &device);
            sort(c, &device, "gpu");
            backward::<half::bf16>(c, &device);
        }
        Err(e) if std::env::var("AUTOFOCUS_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("AUTOFOCUS_REQUIRE_GPU=1 but: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: kernel benchmarks need a GPU ({e}); the sort on the emulator only");
            attention_once_on_the_emulator();
            dense(None, &Device::emulator(), (32, 64));
            backward_once_on_the_emulator();
            sort(c, &Device::emulator(), "emulator");
        }
    }
}

criterion_group!(benches, kernels);
criterion_main!(benches);
