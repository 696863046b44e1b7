//! One benchmark per op, at the shapes aff_mini meets at 224×224, batch 1.
//!
//! `cargo bench --bench ops`; compare ratios within one run (the machine is noisy).

use std::hint::black_box;
use std::time::Duration;

use autofocus::io::F32Buffer;
use autofocus::model::ClusterLayout;
use autofocus::ops::activation::gelu;
use autofocus::ops::cluster_attention::{AttentionInputs, cluster_attention};
use autofocus::ops::clustering::{KeyScope, grid_positions, space_filling_cluster};
use autofocus::ops::neighbourhood::{nearest_clusters, nearest_clusters_brute_force};
use autofocus::ops::pointconv_merge::{MergeInputs, pointconv_merge, weight_net_table};
use autofocus::ops::rel_pos::{OffsetTable, neighbour_rows};
use autofocus::ops::token_selection::select_tokens;
use autofocus::ops::{LayerNorm, Linear};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Deterministic values in [-1, 1).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn linear(in_dim: usize, out_dim: usize) -> Linear {
    Linear {
        weight: F32Buffer::owned(values(in_dim * out_dim, 1)),
        bias: Some(F32Buffer::owned(values(out_dim, 2))),
        in_dim,
        out_dim,
    }
}

/// Tokens of stage `s` of a 56×56 grid: every `2^s`-th row and column.
fn stage_positions(s: usize) -> Vec<f32> {
    let side = 56 >> s;
    grid_positions(side, side)
        .iter()
        .map(|p| p * (1 << s) as f32)
        .collect()
}

const GRID: (usize, usize) = (56, 56);

fn layout_ops(c: &mut Criterion) {
    let mut g = c.benchmark_group("layout");
    g.measurement_time(Duration::from_secs(3));
    let pos = stage_positions(0);
    let n = pos.len() / 2;
    g.bench_function("space_filling_cluster/stage0", |b| {
        b.iter(|| space_filling_cluster(black_box(&pos), 1, n, 8, GRID, KeyScope::Batch).unwrap())
    });
    // Nearest clusters at stage 0 of 224²: `layout_per_image/nearest_clusters/224`.
    let offsets = OffsetTable::new(GRID.0, GRID.1, None);
    g.bench_function("cluster_layout/stage1", |b| {
        let pos = stage_positions(1);
        b.iter(|| {
            ClusterLayout::build(
                black_box(&pos),
                1,
                pos.len() / 2,
                8,
                48,
                &offsets,
                GRID,
                KeyScope::Batch,
            )
            .unwrap()
        })
    });
    for s in 0..3 {
        let pos = stage_positions(s);
        let n = pos.len() / 2;
        let importance = values(n, 3).iter().map(|v| v.abs()).collect::<Vec<_>>();
        g.bench_function(format!("select_tokens/stage{s}"), |b| {
            b.iter(|| {
                select_tokens(black_box(&pos), &importance, 1, n, 2 << s, GRID, 4.0, 0.25).unwrap()
            })
        });
    }
    g.finish();
}

/// The stage-0 layout per image at the input sizes AFF was made for: 224²
/// (56×56 tokens), ADE20K 512² (128×128) and Cityscapes 1024×2048
/// (256×512): the whole layout (clustering, nearest clusters, neighbour
/// lists, bias rows), and the nearest-cluster search alone, against the
/// brute-force scan it replaces (not at 1024×2048: 2·10⁹ distances).
fn layout_at_scale(c: &mut Criterion) {
    let mut g = c.benchmark_group("layout_per_image");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(1));
    for (name, grid) in [
        ("224", (56, 56)),
        ("512", (128, 128)),
        ("1024x2048", (256, 512)),
    ] {
        let pos = grid_positions(grid.0, grid.1);
        let n = pos.len() / 2;
        let offsets = OffsetTable::new(grid.0, grid.1, None);
        g.bench_function(format!("cluster_layout/{name}"), |b| {
            b.iter(|| {
                ClusterLayout::build(
                    black_box(&pos),
                    1,
                    n,
                    8,
                    48,
                    &offsets,
                    grid,
                    KeyScope::Batch,
                )
                .unwrap()
            })
        });
        let clusters = space_filling_cluster(&pos, 1, n, 8, grid, KeyScope::Batch).unwrap();
        let k = clusters.clusters;
        g.bench_function(format!("nearest_clusters/{name}"), |b| {
            b.iter(|| {
                nearest_clusters(black_box(&clusters.pos), &clusters.means, 1, n, k, 6).unwrap()
            })
        });
        if n <= 128 * 128 {
            g.bench_function(format!("nearest_clusters_brute_force/{name}"), |b| {
                b.iter(|| {
                    nearest_clusters_brute_force(
                        black_box(&clusters.pos),
                        &clusters.means,
                        1,
                        n,
                        k,
                        6,
                    )
                    .unwrap()
                })
            });
        }
    }
    g.finish();
}

fn attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("cluster_attention");
    g.measurement_time(Duration::from_secs(3));
    let offsets = OffsetTable::new(GRID.0, GRID.1, None);
    for (s, heads, d) in [(0, 2, 16), (1, 4, 32), (2, 8, 32)] {
        let pos = stage_positions(s);
        let n = pos.len() / 2;
        let layout =
            ClusterLayout::build(&pos, 1, n, 8, 48, &offsets, GRID, KeyScope::Batch).unwrap();
        let ch = heads * d;
        let (q, kv) = (values(n * ch, 4), values(n * 2 * ch, 5));
        let (blank_k, blank_v) = (values(ch, 6), values(ch, 7));
        let bias_table = offsets.apply(&linear(5, heads)).unwrap();
        let inp = AttentionInputs {
            q: &q,
            q_scale: 1.0 / (d as f32).sqrt(),
            kv: &kv,
            nbhd: &layout.nbhd,
            bias_rows: &layout.bias_rows,
            bias_table: &bias_table,
            blank_k: &blank_k,
            blank_v: &blank_v,
            batch: 1,
            tokens: n,
            heads,
            head_dim: d,
        };
        // Bytes each input is read once and the output written once.
        g.throughput(Throughput::Bytes(
            (4 * (q.len() + kv.len() + q.len())) as u64,
        ));
        g.bench_function(format!("stage{s}/n{n}_h{heads}_d{d}"), |b| {
            b.iter(|| cluster_attention(black_box(&inp)).unwrap())
        });
    }
    g.finish();
}

fn merge(c: &mut Criterion) {
    let mut g = c.benchmark_group("pointconv_merge");
    g.measurement_time(Duration::from_secs(3));
    let offsets = OffsetTable::new(GRID.0, GRID.1, None);
    let table = weight_net_table(
        &offsets,
        &linear(5, 4),
        &LayerNorm {
            weight: F32Buffer::owned(vec![1.0; 4]),
            bias: F32Buffer::owned(vec![0.0; 4]),
        },
    )
    .unwrap();
    for (s, ch) in [(0, 32), (1, 128), (2, 256)] {
        let pos = stage_positions(s);
        let n = pos.len() / 2;
        let layout =
            ClusterLayout::build(&pos, 1, n, 8, 48, &offsets, GRID, KeyScope::Batch).unwrap();
        let feat = values(n * ch, 8);
        let importance = values(n, 9).iter().map(|v| v.abs()).collect::<Vec<_>>();
        let centres: Vec<u32> = (0..n as u32 / 4).map(|i| i * 4).collect();
        let inp = MergeInputs {
            feat: &feat,
            importance: &importance,
            nbhd: &layout.nbhd,
            centres: &centres,
            weight_rows: &layout.bias_rows,
            weight_table: &table,
            batch: 1,
            tokens: n,
            channels: ch,
        };
        g.bench_function(format!("stage{s}/n{n}_c{ch}"), |b| {
            b.iter(|| pointconv_merge(black_box(&inp)).unwrap())
        });
    }
    g.bench_function("weight_net_table", |b| {
        let (l, n) = (
            linear(5, 4),
            LayerNorm {
                weight: F32Buffer::owned(vec![1.0; 4]),
                bias: F32Buffer::owned(vec![0.0; 4]),
            },
        );
        b.iter(|| weight_net_table(black_box(&offsets), &l, &n).unwrap())
    });
    g.bench_function("neighbour_rows/stage0", |b| {
        let pos = stage_positions(0);
        let layout = ClusterLayout::build(
            &pos,
            1,
            pos.len() / 2,
            8,
            48,
            &offsets,
            GRID,
            KeyScope::Batch,
        )
        .unwrap();
        b.iter(|| {
            neighbour_rows(black_box(&offsets), &layout.clustering.pos, &layout.nbhd, 1).unwrap()
        })
    });
    g.finish();
}

fn dense(c: &mut Criterion) {
    let mut g = c.benchmark_group("dense");
    g.measurement_time(Duration::from_secs(3));
    // (rows, in, out): the stage-0 and stage-2 MLP layers of aff_mini.
    for (rows, k, n) in [
        (3136, 32, 64),
        (3136, 64, 32),
        (196, 256, 512),
        (196, 512, 256),
    ] {
        let (lin, x) = (linear(k, n), values(rows * k, 10));
        g.throughput(Throughput::Elements((2 * rows * k * n) as u64));
        g.bench_function(format!("linear/{rows}x{k}x{n}"), |b| {
            b.iter(|| lin.forward(black_box(&x), rows).unwrap())
        });
    }
    let ln = LayerNorm {
        weight: F32Buffer::owned(values(128, 11)),
        bias: F32Buffer::owned(values(128, 12)),
    };
    let x = values(784 * 128, 13);
    g.throughput(Throughput::Elements(x.len() as u64));
    g.bench_function("layer_norm/784x128", |b| {
        b.iter(|| ln.forward(black_box(&x)).unwrap())
    });
    let mut h = values(3136 * 64, 14);
    g.bench_function("gelu/3136x64", |b| b.iter(|| gelu(black_box(&mut h))));
    g.finish();
}

criterion_group!(
    benches,
    layout_ops,
    layout_at_scale,
    attention,
    merge,
    dense
);
criterion_main!(benches);
