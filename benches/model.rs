//! The whole model on random weights: aff_mini at 224×224, batch 1 and 8.
//!
//! `cargo bench --bench model`. `autofocus bench` reports the same figure
//! (median, images/s, peak memory) as one JSON line.

use std::hint::black_box;
use std::time::Duration;

use autofocus::{AffConfig, AutoFocusFormer, ModelKind};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

mod common;
use common::image;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn aff_mini(c: &mut Criterion) {
    let model = AutoFocusFormer::random(
        AffConfig::preset("aff_mini").unwrap(),
        ModelKind::Classifier,
        0,
    )
    .unwrap();
    let mut g = c.benchmark_group("aff_mini_224");
    g.measurement_time(Duration::from_secs(10));
    g.sample_size(20);
    for batch in [1, 8] {
        let x = image(batch, 224);
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(format!("batch{batch}"), |b| {
            b.iter(|| model.forward(black_box(&x)).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, aff_mini);
criterion_main!(benches);
