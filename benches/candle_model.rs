//! The candle model (feature `candle`) against this crate's own CPU path,
//! on the same random weights: aff_mini at 224×224, batch 1, forward (the
//! issue's target: candle at most 1.5× slower), and one training step
//! (forward and backward) of the candle model.
//!
//! `cargo bench --features candle --bench candle_model` (the `…/ratio`
//! line is the median of candle/crate over alternating runs: compare that).

use std::hint::black_box;
use std::time::Duration;

use autofocus::candle::varmap_of;
use autofocus::model::ModelWeights;
use autofocus::{AffConfig, AutoFocusFormer, ModelKind};
use candle_core::{DType, Device};
use criterion::{Criterion, criterion_group, criterion_main};

mod common;
use common::{image, interleaved_ratio};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn aff_mini(c: &mut Criterion) {
    let config = AffConfig::preset("aff_mini").unwrap();
    let kind = ModelKind::Classifier;
    let crate_model = AutoFocusFormer::random(config.clone(), kind, 0).unwrap();
    let device = Device::Cpu;
    let varmap = varmap_of(
        ModelWeights::random_tensors(&config, kind, 0),
        DType::F32,
        &device,
    )
    .unwrap();
    let candle_model = autofocus::candle::AutoFocusFormer::from_varmap(
        &config,
        kind,
        &varmap,
        DType::F32,
        &device,
    )
    .unwrap();
    let x = image(1, 224);
    let x_candle = candle_core::Tensor::from_vec(x.data().to_vec(), x.shape(), &device).unwrap();

    let mut g = c.benchmark_group("candle_aff_mini_224_b1");
    g.measurement_time(Duration::from_secs(10)).sample_size(20);
    g.bench_function("crate_forward", |b| {
        b.iter(|| crate_model.forward(black_box(&x)).unwrap())
    });
    g.bench_function("candle_forward", |b| {
        b.iter(|| candle_model.forward(black_box(&x_candle)).unwrap())
    });
    let train_step = || {
        let loss = candle_model.forward(&x_candle).unwrap().sum_all().unwrap();
        drop(loss.backward().unwrap());
    };
    g.bench_function("candle_forward_backward", |b| b.iter(train_step));
    g.finish();
    interleaved_ratio(
        "candle_aff_mini_224_b1",
        "candle/crate forward",
        || drop(crate_model.forward(&x).unwrap()),
        || drop(candle_model.forward(&x_candle).unwrap()),
    );
}

criterion_group!(benches, aff_mini);
criterion_main!(benches);
