//! The dataset pipeline's cost over the model alone: aff_mini at 224,
//! batch 8, on a folder of 224×224 JPEGs, end to end (decode, batch, run,
//! write JSON lines) against the same forward passes on batches already in
//! memory. The target: the pipeline at most 10% slower.
//!
//! `cargo bench --bench pipeline`; compare the two `images/s` figures of
//! one run (this machine is noisy between runs).

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use autofocus::dataset::{Decoded, JsonlOutput, OutputMode, PipelineOptions, run_pipeline};
use autofocus::io::image::{Preprocess, load_image};
use autofocus::ops::clustering::KeyScope;
use autofocus::{AffConfig, AutoFocusFormer, ModelKind, Tensor};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const IMAGES: usize = 32;
const BATCH: usize = 8;

/// `IMAGES` photo-like 224×224 JPEGs.
fn jpeg_folder(dir: &Path) -> Vec<PathBuf> {
    (0..IMAGES)
        .map(|i| {
            let img = image::RgbImage::from_fn(224, 224, |x, y| {
                let v = ((x * 3 + y * 5 + i as u32 * 17) % 256) as u8;
                image::Rgb([v, ((x ^ y) % 256) as u8, (x * y / 224 % 256) as u8])
            });
            let path = dir.join(format!("img{i:03}.jpg"));
            img.save(&path).unwrap();
            path
        })
        .collect()
}

fn pipeline(c: &mut Criterion) {
    let config = AffConfig::preset("aff_mini").unwrap();
    let model = AutoFocusFormer::random(config, ModelKind::Classifier, 0)
        .unwrap()
        .with_key_scope(KeyScope::Image);
    let pre = Preprocess::for_config(model.config());
    let dir = tempfile::tempdir().unwrap();
    let paths = jpeg_folder(dir.path());
    let batches: Vec<Tensor> = paths
        .chunks(BATCH)
        .map(|chunk| {
            let pixels = chunk
                .iter()
                .flat_map(|p| load_image(p, pre).unwrap())
                .collect();
            Tensor::new(vec![chunk.len(), 3, pre.size, pre.size], pixels).unwrap()
        })
        .collect();
    let positions = (0..IMAGES)
        .map(|i| (paths[i].display().to_string(), i))
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let options = PipelineOptions {
        batch: BATCH,
        decoders: (cores / 4).max(1),
        workers: 1,
    };

    let mut g = c.benchmark_group("pipeline_aff_mini_224_batch8");
    g.measurement_time(Duration::from_secs(20));
    g.sample_size(10);
    g.throughput(Throughput::Elements(IMAGES as u64));
    g.bench_function("model_alone", |b| {
        b.iter(|| {
            for x in &batches {
                black_box(model.forward(x).unwrap());
            }
        })
    });
    // What the decoders add to the cores' work (the pipeline overlaps it
    // with the model, but on the CPU they share the cores).
    g.bench_function("decode_alone", |b| {
        b.iter(|| {
            for p in &paths {
                black_box(load_image(p, pre).unwrap());
            }
        })
    });
    g.bench_function("pipeline", |b| {
        b.iter(|| {
            let out = dir.path().join("preds.jsonl");
            let (mut file, _) =
                JsonlOutput::open(&out, &positions, OutputMode::Force, &|_| Ok(true)).unwrap();
            let decode = |path: &Path| {
                load_image(path, pre).map(|pixels| Decoded {
                    height: pre.size,
                    width: pre.size,
                    pixels,
                })
            };
            let worker = |_| {
                Ok(|x: &Tensor| {
                    let logits = model.forward(x)?;
                    Ok(logits
                        .data()
                        .chunks_exact(logits.shape()[1])
                        .map(<[f32]>::to_vec)
                        .collect())
                })
            };
            run_pipeline(
                &paths,
                options,
                decode,
                worker,
                |i, r: autofocus::Result<Vec<f32>>| {
                    let best = r?.iter().copied().fold(f32::MIN, f32::max);
                    file.append(
                        i,
                        &serde_json::json!({"path": paths[i].display().to_string(), "top": best}),
                    )
                },
            )
            .unwrap();
            file.finish(&positions).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
