//! The candle model (feature `candle`) against this crate's own CPU path,
//! on the same random weights: aff_mini at 224×224, batch 1, forward (the
//! issue's target: candle at most 1.5× slower), and one training step
//! (forward and backward) of the candle model.
//!
//! `cargo bench --features candle --bench candle_model` (the `…/ratio`
//! line is the median of candle/crate over alternating runs: compare that).
//!
//! Built with feature `candle-cuda` (`--no-default-features --features
//! candle-cuda`) and run where there is a GPU, it also times one training
//! step of aff_tiny at 224, batch 64, in bf16 on GPU 0: forward,
//! cross-entropy, backward and an AdamW update (`scripts/device-check.sh`).

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

/// One AdamW training step of aff_tiny, batch 64, bf16, on candle's GPU 0.
#[cfg(feature = "candle-cuda")]
fn aff_tiny_training_step_on_gpu(c: &mut Criterion) {
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};
    // The device check sets AUTOFOCUS_REQUIRE_GPU=1: there a skip would read
    // as a pass.
    let device = match Device::new_cuda(0) {
        Ok(device) => device,
        Err(e) if std::env::var("AUTOFOCUS_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("AUTOFOCUS_REQUIRE_GPU=1 but: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: the GPU training step: {e}");
            return;
        }
    };
    let (batch, size, dtype) = (64, 224, DType::BF16);
    let config = AffConfig::preset("aff_tiny").unwrap();
    let kind = ModelKind::Classifier;
    let varmap = varmap_of(
        ModelWeights::random_tensors(&config, kind, 0),
        dtype,
        &device,
    )
    .unwrap();
    let model =
        autofocus::candle::AutoFocusFormer::from_varmap(&config, kind, &varmap, dtype, &device)
            .unwrap();
    let x = image(batch, size);
    let x = candle_core::Tensor::from_vec(x.data().to_vec(), x.shape(), &device)
        .and_then(|t| t.to_dtype(dtype))
        .unwrap();
    let labels: Vec<u32> = (0..batch as u32).map(|i| i * 7 % 1000).collect();
    let labels = candle_core::Tensor::from_vec(labels, batch, &device).unwrap();
    let mut opt = AdamW::new(varmap.all_vars(), ParamsAdamW::default()).unwrap();
    let mut step = || {
        let logits = model.forward(&x).unwrap().to_dtype(DType::F32).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
        opt.backward_step(&loss).unwrap();
        device.synchronize().unwrap();
    };
    let mut g = c.benchmark_group("candle_aff_tiny_224_b64_bf16_gpu");
    g.throughput(criterion::Throughput::Elements(batch as u64));
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("training_step", |b| b.iter(&mut step));
    g.finish();
}

#[cfg(not(feature = "candle-cuda"))]
criterion_group!(benches, aff_mini);
#[cfg(feature = "candle-cuda")]
criterion_group!(benches, aff_mini, aff_tiny_training_step_on_gpu);
criterion_main!(benches);
