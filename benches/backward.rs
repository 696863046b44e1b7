//! Backward ops against their forward on the CPU, at the aff_tiny stage-0
//! shape: n = 3136 tokens (56×56), 2 heads of 32 channels, neighbourhoods of
//! 48, batch 8; the merge at 64 channels keeping a quarter of the tokens.
//! The targets: attention backward ≤ 2.5× its forward, merge
//! backward ≤ 3× its forward (compare within one run: the machine is noisy).
//!
//! `cargo bench --bench backward` (each group ends with a `…/ratio` line:
//! the median ratio of alternating runs, which is what to compare).

use std::hint::black_box;
use std::time::Duration;

use autofocus::io::F32Buffer;
use autofocus::model::ClusterLayout;
use autofocus::ops::cluster_attention::backward::{
    AttentionGradInputs, cluster_attention_backward,
};
use autofocus::ops::cluster_attention::{AttentionInputs, cluster_attention_with_lse};
use autofocus::ops::clustering::{KeyScope, grid_positions};
use autofocus::ops::neighbourhood::InverseNeighbourhood;
use autofocus::ops::pointconv_merge::backward::{MergeGradInputs, pointconv_merge_backward};
use autofocus::ops::pointconv_merge::{
    INNER_CHANNELS, MergeInputs, pointconv_merge, weight_net_table,
};
use autofocus::ops::rel_pos::OffsetTable;
use autofocus::ops::{LayerNorm, Linear};
use criterion::{Criterion, criterion_group, criterion_main};

mod common;
use common::interleaved_ratio;

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

const GRID: (usize, usize) = (56, 56);
const BATCH: usize = 8;

fn backward(c: &mut Criterion) {
    let offsets = OffsetTable::new(GRID.0, GRID.1, None);
    let pos = grid_positions(GRID.0, GRID.1);
    let n = pos.len() / 2;
    let layout = ClusterLayout::build(&pos, 1, n, 8, 48, &offsets, GRID, KeyScope::Batch).unwrap();
    let inverse = InverseNeighbourhood::new(&layout.nbhd).unwrap();
    let bias_rows = layout.bias_rows.repeat(BATCH);

    let mut g = c.benchmark_group("attention_aff_tiny_stage0_b8");
    g.measurement_time(Duration::from_secs(5)).sample_size(10);
    let (heads, d) = (2, 32);
    let ch = heads * d;
    let (q, kv) = (values(BATCH * n * ch, 4), values(BATCH * n * 2 * ch, 5));
    let (blank_k, blank_v) = (values(ch, 6), values(ch, 7));
    let bias_table = offsets.apply(&linear(5, heads)).unwrap();
    let inp = AttentionInputs {
        q: &q,
        q_scale: 1.0 / (d as f32).sqrt(),
        kv: &kv,
        nbhd: &layout.nbhd,
        bias_rows: &bias_rows,
        bias_table: &bias_table,
        blank_k: &blank_k,
        blank_v: &blank_v,
        batch: BATCH,
        tokens: n,
        heads,
        head_dim: d,
    };
    let (out, lse) = cluster_attention_with_lse(&inp).unwrap();
    let grad_out = values(out.len(), 8);
    g.bench_function("forward", |b| {
        b.iter(|| cluster_attention_with_lse(black_box(&inp)).unwrap())
    });
    let grads = AttentionGradInputs {
        forward: &inp,
        out: &out,
        lse: &lse,
        grad_out: &grad_out,
        inverse: &inverse,
        offsets: &offsets,
    };
    g.bench_function("backward", |b| {
        b.iter(|| cluster_attention_backward(black_box(&grads)).unwrap())
    });
    g.finish();
    interleaved_ratio(
        "attention_aff_tiny_stage0_b8",
        "backward/forward",
        || drop(cluster_attention_with_lse(&inp).unwrap()),
        || drop(cluster_attention_backward(&grads).unwrap()),
    );

    let mut g = c.benchmark_group("merge_aff_tiny_stage0_b8");
    g.measurement_time(Duration::from_secs(5)).sample_size(10);
    let ch = 64;
    let (net, norm) = (
        linear(5, 4),
        LayerNorm {
            weight: F32Buffer::owned(vec![1.0; 4]),
            bias: F32Buffer::owned(vec![0.0; 4]),
        },
    );
    let table = weight_net_table(&offsets, &net, &norm).unwrap();
    let feat = values(BATCH * n * ch, 9);
    let importance: Vec<f32> = values(BATCH * n, 10).iter().map(|v| v.abs()).collect();
    let kept = n / 4;
    let centres: Vec<u32> = (0..BATCH)
        .flat_map(|_| (0..kept as u32).map(|i| i * 4))
        .collect();
    let inp = MergeInputs {
        feat: &feat,
        importance: &importance,
        nbhd: &layout.nbhd,
        centres: &centres,
        weight_rows: &bias_rows,
        weight_table: &table,
        batch: BATCH,
        tokens: n,
        channels: ch,
    };
    let grad_out = values(BATCH * kept * INNER_CHANNELS * ch, 11);
    g.bench_function("forward", |b| {
        b.iter(|| pointconv_merge(black_box(&inp)).unwrap())
    });
    let grads = MergeGradInputs {
        forward: &inp,
        grad_out: &grad_out,
        inverse: &inverse,
        offsets: &offsets,
        weight_net: &net,
        weight_norm: &norm,
    };
    g.bench_function("backward", |b| {
        b.iter(|| pointconv_merge_backward(black_box(&grads)).unwrap())
    });
    g.finish();
    interleaved_ratio(
        "merge_aff_tiny_stage0_b8",
        "backward/forward",
        || drop(pointconv_merge(&inp).unwrap()),
        || drop(pointconv_merge_backward(&grads).unwrap()),
    );
}

criterion_group!(benches, backward);
criterion_main!(benches);
