//! Kernel benchmarks on GPU 0; without one, only the layout's stable sort,
//! on the emulator.
//!
//! The stage-0 layout (clustering, nearest clusters, selection) per image,
//! and the fused attention at aff_tiny's stage-0 shape (b = 64, n = 3136,
//! 2 heads of 32, m = 48) in bf16. Criterion's throughput is the HBM floor's
//! bytes — every input read once, the output written once — so the GB/s it
//! prints divided by the card's bandwidth is the fraction of the floor.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

use autofocus::gpu::{Device, Element};
use autofocus::ops::cluster_attention::gpu::{DeviceAttentionInputs, cluster_attention};
use autofocus::ops::clustering::KeyScope;
use autofocus::ops::clustering::gpu::space_filling_cluster;
use autofocus::ops::neighbourhood::gpu::nearest_neighbourhoods;
use autofocus::ops::token_selection::gpu::select_tokens;

fn attention<T: Element>(c: &mut Criterion, device: &Device) {
    let (b, side, heads, d, s, nnc) = (64usize, 56usize, 2usize, 32usize, 8usize, 6usize);
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
    // Cluster means: runs of 8 tokens along rows (the layout's cost is not timed here).
    let means: Vec<f32> = (0..b)
        .flat_map(|_| {
            (0..k).flat_map(|c| {
                let t = c * s;
                [(t % side) as f32 + 3.5, (t / side) as f32]
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
    let mut group = c.benchmark_group("cluster_attention");
    group.throughput(Throughput::Bytes(floor_bytes as u64));
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
        group.bench_function(
            format!("aff_tiny_stage0_b64_{}_{variant}", T::SUFFIX),
            |bench| {
                bench.iter(|| {
                    cluster_attention(device, &inputs, &mut out).unwrap();
                    device.synchronize().unwrap();
                })
            },
        );
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

fn kernels(c: &mut Criterion) {
    match Device::cuda(0) {
        Ok(device) => {
            eprintln!("benchmarking on {}", device.name());
            attention::<half::bf16>(c, &device);
            attention::<f32>(c, &device);
            layout(c, &device);
            sort(c, &device, "gpu");
        }
        Err(e) if std::env::var("AUTOFOCUS_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("AUTOFOCUS_REQUIRE_GPU=1 but: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: kernel benchmarks need a GPU ({e}); the sort on the emulator only");
            sort(c, &Device::emulator(), "emulator");
        }
    }
}

criterion_group!(benches, kernels);
criterion_main!(benches);
