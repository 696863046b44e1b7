//! Whole-model behaviour beyond the goldens: batches, any image size, tiny
//! inputs, few anchors, and the shared stage-0 cache (spec §10).

mod common;

use std::sync::Arc;

use autofocus::ops::clustering::KeyScope;
use autofocus::{AffConfig, AutoFocusFormer, DeviceModel, ModelKind, Tensor, Trace, TraceLevel};

fn tiny_model() -> AutoFocusFormer {
    AutoFocusFormer::load(
        common::data_dir().join("tiny-128.weights.safetensors"),
        None,
    )
    .unwrap()
}

/// A deterministic, image-like input (smooth with some sharp blobs).
fn image(batch: usize, h: usize, w: usize, seed: usize) -> Tensor {
    let data = (0..batch * 3 * h * w)
        .map(|i| {
            let (x, y) = ((i % w) as f32, ((i / w) % h) as f32);
            let c = (i / (h * w)) as f32;
            let blob = if (x as usize * 7 + y as usize * 3 + seed).is_multiple_of(23) {
                2.0
            } else {
                0.0
            };
            (0.11 * x + 0.07 * y + c + seed as f32).sin() + blob
        })
        .collect();
    Tensor::new(vec![batch, 3, h, w], data).unwrap()
}

/// With the per-image key scope, each image of a batch of different images
/// is clustered, and so keeps its tokens, exactly as it would alone; on the
/// emulated kernels too.
#[test]
fn per_image_clustering_makes_each_result_independent_of_its_batch() {
    let model = tiny_model().with_key_scope(KeyScope::Image);
    let singles: Vec<Tensor> = (0..3).map(|seed| image(1, 128, 128, seed * 11)).collect();
    let data: Vec<f32> = singles.iter().flat_map(|t| t.data().to_vec()).collect();
    let batch = Tensor::new(vec![3, 3, 128, 128], data).unwrap();
    let mut traced = Trace::new(TraceLevel::StageOutputs);
    let batched = model.forward_traced(&batch, Some(&mut traced)).unwrap();
    let classes = batched.shape()[1];
    for (i, single) in singles.iter().enumerate() {
        let mut alone = Trace::new(TraceLevel::StageOutputs);
        let logits = model.forward_traced(single, Some(&mut alone)).unwrap();
        common::assert_close("logits", &batched.data()[i * classes..][..classes], &logits);
        for s in 0..4 {
            let key = format!("stage{s}.out.pos");
            let (one, all) = (alone.f32(&key).unwrap(), traced.f32(&key).unwrap());
            let n = one.len();
            assert_eq!(&all.data()[i * n..][..n], one.data(), "image {i}, {key}");
        }
    }
    for device in common::devices() {
        let on_device = DeviceModel::<f32>::new(&model, device).unwrap();
        let two = Tensor::new(
            vec![2, 3, 128, 128],
            batch.data()[..2 * 3 * 128 * 128].to_vec(),
        )
        .unwrap();
        let both = on_device.forward(&two).unwrap();
        for (i, single) in singles.iter().take(2).enumerate() {
            let alone = on_device.forward(single).unwrap();
            common::assert_close(
                "device logits",
                &both.data()[i * classes..][..classes],
                &alone,
            );
        }
    }
}

/// Token counts per stage, from the spec: keep = floor(n·ds), at least the
/// reserve tokens (those on the 2·stride grid), at most all.
fn expected_tokens(config: &AffConfig, height: usize, width: usize) -> Vec<usize> {
    let (h, w) = (height.div_ceil(4), width.div_ceil(4));
    let mut n = h * w;
    let mut counts = vec![n];
    for s in 0..config.num_stages() - 1 {
        let stride = 2usize << s;
        let reserve = h.div_ceil(2 * stride) * w.div_ceil(2 * stride);
        n = ((n as f64 * config.ds_rate) as usize).max(reserve).min(n);
        counts.push(n);
    }
    counts
}

/// Batched GEMMs may sum in another order, so values agree to rounding;
/// the token choices (positions) must agree exactly.
#[test]
fn a_batch_of_identical_images_gives_each_the_single_image_result() {
    let model = tiny_model();
    let single = image(1, 128, 128, 5);
    let batch = Tensor::new(vec![3, 3, 128, 128], single.data().repeat(3)).unwrap();
    let (mut t1, mut t3) = (
        Trace::new(TraceLevel::StageOutputs),
        Trace::new(TraceLevel::StageOutputs),
    );
    let one = model.forward_traced(&single, Some(&mut t1)).unwrap();
    let three = model.forward_traced(&batch, Some(&mut t3)).unwrap();
    for row in three.data().chunks_exact(one.len()) {
        common::assert_close("batched logits", row, &one);
    }
    for s in 0..4 {
        let key = format!("stage{s}.out.pos");
        let (p1, p3) = (t1.f32(&key).unwrap(), t3.f32(&key).unwrap());
        assert_eq!(p3.data(), p1.data().repeat(3).as_slice(), "{key}");
    }
}

#[test]
fn any_image_size_runs_with_the_specified_token_counts() {
    let model = tiny_model();
    // Odd, non-square, tiny (a global middle stage), and a 1×1 image.
    for (h, w) in [(61, 97), (128, 40), (17, 9), (3, 5), (1, 1), (36, 36)] {
        let mut trace = Trace::new(TraceLevel::All);
        let logits = model
            .forward_traced(&image(2, h, w, 1), Some(&mut trace))
            .unwrap();
        assert_eq!(logits.shape(), &[2, 10]);
        assert!(
            logits.data().iter().all(|v| v.is_finite()),
            "{h}×{w}: non-finite logits"
        );
        let counts = expected_tokens(model.config(), h, w);
        for (s, &n) in counts.iter().enumerate() {
            let pos = trace.f32(&format!("stage{s}.in.pos")).unwrap();
            assert_eq!(pos.shape(), &[2, n, 2], "{h}×{w} stage {s}");
        }
    }
    // 36×36: 81 tokens cluster at stage 0, 20 at stage 1 attend globally.
    let mut trace = Trace::new(TraceLevel::All);
    model
        .forward_traced(&image(1, 36, 36, 2), Some(&mut trace))
        .unwrap();
    assert_eq!(trace.i32("stage0.global_attn").unwrap().data(), &[0]);
    assert_eq!(trace.i32("stage1.global_attn").unwrap().data(), &[1]);
}

#[test]
fn few_anchors_and_single_clusters_still_cluster() {
    // Clusters of 16 with neighbourhoods of one cluster: small stages have
    // one or two anchors.
    let config = AffConfig {
        cluster_size: 16,
        nbhd_size: vec![8, 8, 16, 16],
        ..AffConfig::preset("aff_mini").unwrap()
    };
    let model = AutoFocusFormer::random(config, ModelKind::Classifier, 3).unwrap();
    for (h, w) in [(16, 16), (20, 12), (8, 40), (48, 48)] {
        let logits = model.forward(&image(2, h, w, 3)).unwrap();
        assert!(logits.data().iter().all(|v| v.is_finite()), "{h}×{w}");
    }
}

#[test]
fn the_grid_cache_is_keyed_by_size_and_safe_across_threads() {
    let sizes = [(64, 64), (40, 72), (33, 33), (64, 64), (40, 72)];
    // References from fresh models, one per size.
    let want: Vec<Tensor> = sizes
        .iter()
        .map(|&(h, w)| tiny_model().forward(&image(1, h, w, 7)).unwrap())
        .collect();
    let shared = Arc::new(tiny_model());
    let handles: Vec<_> = (0..4)
        .map(|k| {
            let model = Arc::clone(&shared);
            std::thread::spawn(move || {
                (0..sizes.len())
                    .map(|i| {
                        let (h, w) = sizes[(i + k) % sizes.len()];
                        (
                            (i + k) % sizes.len(),
                            model.forward(&image(1, h, w, 7)).unwrap(),
                        )
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for handle in handles {
        for (i, got) in handle.join().unwrap() {
            assert_eq!(got, want[i], "size {:?}", sizes[i]);
        }
    }
    assert_eq!(shared.grid_cache().len(), 3);
}

#[test]
fn malformed_inputs_are_errors() {
    let model = tiny_model();
    let flat = Tensor::new(vec![3, 8, 8], vec![0.0; 192]).unwrap();
    assert!(
        model
            .forward(&flat)
            .unwrap_err()
            .to_string()
            .contains("[b, 3, H, W]")
    );
    let two_channels = Tensor::new(vec![1, 2, 8, 8], vec![0.0; 128]).unwrap();
    assert!(model.forward(&two_channels).is_err());
    let empty = Tensor::new(vec![0, 3, 8, 8], vec![]).unwrap();
    assert!(model.forward(&empty).is_err());
}
