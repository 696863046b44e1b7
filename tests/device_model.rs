//! The whole model through the kernels ([`DeviceModel`]) against the golden
//! logits: on the CPU emulator always, on GPU 0 when present; f32 within
//! 1e-4 of the published model, f16/bf16 within the agreement measured here.

mod common;

use autofocus::gpu::{Device, Element};
use autofocus::model::ModelKind;
use autofocus::{AnyTensor, AutoFocusFormer, DeviceModel};
use common::{Case, assert_close, assert_exact};

fn logits_on<T: Element>(case: &Case, device: &Device) -> Vec<f32> {
    let model = DeviceModel::<T>::new(&case.model, device.clone()).unwrap();
    let image = case.f32("input.image");
    model.forward(&image).unwrap().data().to_vec()
}

/// Every classification case's logits through the kernels, f32, on every
/// device, within 1e-4 of the golden.
#[test]
fn every_classification_case_matches_its_golden_logits() {
    common::for_each_golden_case(ModelKind::Classifier, |case| {
        let want = case.f32("logits");
        for device in common::devices() {
            let got = logits_on::<f32>(case, &device);
            assert_close(
                &format!("{} f32 logits on {device:?}", case.name),
                &got,
                &want,
            );
        }
    });
}

/// Half-precision storage: the logits agree with the f32 golden to the
/// tolerance given (relative to max(1, max |logit|)); measured on the
/// emulator, which rounds as the GPU does.
#[test]
fn half_precision_logits_agree_with_f32() {
    let Some(case) = Case::load("tiny-128") else {
        return;
    };
    let want = case.f32("logits");
    let scale = want.data().iter().fold(1.0f32, |m, v| m.max(v.abs()));
    for device in common::devices() {
        for (dtype, got, tol) in [
            ("f16", logits_on::<half::f16>(&case, &device), 5e-3),
            ("bf16", logits_on::<half::bf16>(&case, &device), 2e-1),
        ] {
            let err = got
                .iter()
                .zip(want.data())
                .fold(0.0f32, |m, (g, w)| m.max((g - w).abs()))
                / scale;
            eprintln!("{dtype} on {device:?}: max error {err:.2e} of the largest logit");
            assert!(err <= tol, "{dtype} on {device:?}: max error {err} > {tol}");
        }
    }
}

/// Every segmentation case (the bundled one is 130×190, padded to 132×192,
/// offsets clamped): every stage's features within 1e-4, positions exact.
#[test]
fn every_backbone_case_matches_its_golden_features() {
    common::for_each_golden_case(ModelKind::Backbone, |case| {
        let image = case.f32("input.image");
        let shape = case.i32("spatial_shape");
        for device in common::devices() {
            let on_device = DeviceModel::<f32>::new(&case.model, device.clone()).unwrap();
            let features = on_device.features(&image).unwrap();
            let grid = [features.grid.0 as i32, features.grid.1 as i32];
            assert_eq!(&grid[..], shape.data(), "{} grid", case.name);
            assert_eq!(features.stages.len(), 4);
            for (s, stage) in features.stages.iter().enumerate() {
                let key = format!("res{}", s + 2);
                let what = format!("{} {key} on {device:?}", case.name);
                assert_close(&what, &stage.feat, &case.f32(&key));
                let pos = case.f32(&format!("{key}_pos"));
                assert_exact(&format!("{what} pos"), &stage.pos, pos.data());
            }
            // A backbone has no classification head, on a device as on the CPU.
            assert!(on_device.forward(&image).is_err());
        }
    });
}

/// Sizes whose token counts are not multiples of the cluster size (the last
/// cluster of every clustered stage padded), batch 2, random weights: the
/// kernels cluster, find neighbourhoods and select tokens exactly as the
/// CPU does, stage by stage; importance and logits agree to 1e-4.
#[test]
fn odd_sizes_lay_out_tokens_exactly_as_the_cpu() {
    use autofocus::model::ModelKind;
    use autofocus::{AffConfig, Trace, TraceLevel};
    let cases = [
        (5, [20, 20, 20, 20], (72, 100)),
        (6, [24, 24, 24, 25], (50, 130)),
        (7, [35, 35, 35, 36], (72, 100)),
        (6, [30, 30, 30, 30], (90, 62)),
    ];
    for (round, (cluster_size, nbhd, (height, width))) in cases.into_iter().enumerate() {
        let config = AffConfig {
            num_classes: 10,
            embed_dim: vec![16, 32, 64, 96],
            depths: vec![1, 1, 2, 1],
            num_heads: vec![2, 2, 4, 8],
            mlp_ratio: 2.0,
            cluster_size,
            nbhd_size: nbhd.to_vec(),
            alpha: 4.0,
            ds_rate: 0.25,
            layer_scale: 0.0,
            img_size: 128,
        };
        let model =
            AutoFocusFormer::random(config, ModelKind::Classifier, 40 + round as u64).unwrap();
        // Smooth blobs plus a fixed pseudo-random texture: scores well spread.
        let batch = 2;
        let pixels: Vec<f32> = (0..batch * 3 * height * width)
            .map(|i| {
                let (x, y) = ((i % width) as f32, ((i / width) % height) as f32);
                let hash = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
                (x * 0.13 + y * 0.07 + i as f32 * 1e-4).sin()
                    + (hash as f32 / (1 << 24) as f32 - 0.5)
            })
            .collect();
        let image = autofocus::Tensor::new(vec![batch, 3, height, width], pixels).unwrap();
        let mut want = Trace::new(TraceLevel::All);
        model.forward_traced(&image, Some(&mut want)).unwrap();
        for device in common::devices() {
            let on_device = DeviceModel::<f32>::new(&model, device.clone()).unwrap();
            let mut got = Trace::new(TraceLevel::All);
            let logits = on_device.forward_traced(&image, Some(&mut got)).unwrap();
            let what = format!("s = {cluster_size}, {height}×{width} on {device:?}");
            let mut compared = 0;
            for (key, got) in got.tensors() {
                let want = want
                    .tensors()
                    .get(key)
                    .unwrap_or_else(|| panic!("{what}: {key} not on the CPU"));
                assert_eq!(got.shape(), want.shape(), "{what}: {key} shape");
                match (got, want) {
                    (AnyTensor::I32(g), AnyTensor::I32(w)) => {
                        assert_exact(&format!("{what} {key}"), g.data(), w.data())
                    }
                    (AnyTensor::F32(g), AnyTensor::F32(w)) if key.ends_with("pos") => {
                        assert_exact(&format!("{what} {key}"), g.data(), w.data())
                    }
                    (AnyTensor::F32(g), AnyTensor::F32(w)) => {
                        assert_close(&format!("{what} {key}"), g.data(), w)
                    }
                    _ => panic!("{what}: {key} has another type"),
                }
                compared += 1;
            }
            // Per stage: cluster pos, reorder, nbhd idx and mask (clustered
            // stages), importance, reserve, merged pos; out pos; logits.
            assert!(compared >= 20, "{what}: only {compared} tensors compared");
            assert!(
                got.tensors().keys().any(|k| k.ends_with("nbhd.mask")),
                "{what}: a padded cluster"
            );
            assert_close(
                &format!("{what} logits"),
                logits.data(),
                want.f32("logits").unwrap(),
            );
        }
    }
}

/// A NaN or an infinity in the image is refused, on the CPU and on every
/// device, naming the first offending index.
#[test]
fn non_finite_pixels_are_refused_on_every_path() {
    let Some(case) = Case::load("tiny-128") else {
        return;
    };
    let mut image = case.f32("input.image");
    let &[_, _, h, w] = image.shape() else {
        panic!("image shape")
    };
    image.data_mut()[((3 + 1) * h + 2) * w + 9] = f32::NAN;
    let check = |err: autofocus::Error, on: &str| match err {
        autofocus::Error::NonFinite {
            tensor,
            index,
            value,
        } => {
            assert_eq!(
                (tensor.as_str(), &index[..]),
                ("image", &[1, 1, 2, 9][..]),
                "{on}"
            );
            assert!(value.is_nan(), "{on}");
        }
        other => panic!("{on}: expected a non-finite error, got {other}"),
    };
    check(case.model.forward(&image).unwrap_err(), "cpu");
    for device in common::devices() {
        let model = DeviceModel::<f32>::new(&case.model, device.clone()).unwrap();
        check(model.forward(&image).unwrap_err(), &format!("{device:?}"));
        let streamed = model.forward_batches([Ok(&image)], |_| Ok(()));
        check(streamed.unwrap_err(), &format!("{device:?}, a stream"));
    }
}

/// Bad input is an error naming the tensor, not a panic.
#[test]
fn malformed_images_are_errors() {
    let Some(case) = Case::load("tiny-128") else {
        return;
    };
    let model = DeviceModel::<f32>::new(&case.model, Device::emulator()).unwrap();
    let bad = autofocus::Tensor::new(vec![1, 2, 8, 8], vec![0.0; 128]).unwrap();
    let err = model.forward(&bad).unwrap_err().to_string();
    assert!(err.contains("image"), "{err}");
    assert!(model.features(&case.f32("input.image")).is_err());
}

/// A larger batch of different images (so later stages cluster differently per
/// image), through the kernels and on the CPU, twice (the second run uses
/// the cached stage-0 layout).
#[test]
fn batches_match_the_cpu() {
    let Some(case) = Case::load("tiny-128") else {
        return;
    };
    let image = case.f32("input.image");
    let mut data = image.data().to_vec();
    data.extend(image.data().iter().rev().map(|v| 0.5 * v + 0.1));
    let mut shape = image.shape().to_vec();
    shape[0] *= 2;
    let batch = autofocus::Tensor::new(shape, data).unwrap();
    let want = case.model.forward(&batch).unwrap();
    for device in common::devices() {
        let model = DeviceModel::<f32>::new(&case.model, device.clone()).unwrap();
        for run in 0..2 {
            let got = model.forward(&batch).unwrap();
            assert_eq!(got.shape(), want.shape());
            let what = format!("batch of {} on {device:?}, run {run}", want.shape()[0]);
            assert_close(&what, got.data(), &want);
        }
    }
}

/// Every stage, block and op opens an NVTX range, nested as ncu's
/// `--nvtx-include "stage1/block0/attn.cluster_attention/"` names them, on
/// the device path and the CPU path alike, and every range is closed.
#[test]
fn every_stage_block_and_op_opens_a_nested_nvtx_range() {
    let Some(case) = Case::load("tiny-128") else {
        return;
    };
    let image = case.f32("input.image");
    let model = DeviceModel::<f32>::new(&case.model, Device::emulator()).unwrap();
    let (device_logits, device_ranges, device_open) =
        autofocus::nvtx::record(|| model.forward(&image));
    let (cpu_logits, cpu_ranges, cpu_open) = autofocus::nvtx::record(|| case.model.forward(&image));
    device_logits.unwrap();
    cpu_logits.unwrap();
    let depths = &case.model.config().depths;
    for (path, ranges, open) in [
        ("device", &device_ranges, device_open),
        ("cpu", &cpu_ranges, cpu_open),
    ] {
        assert_eq!(open, 0, "{path}: ranges left open");
        let has = |range: &str| ranges.iter().any(|r| r == range);
        for top in ["patch_embed", "head"] {
            assert!(has(top), "{path}: no `{top}` in {ranges:?}");
        }
        for (s, &depth) in depths.iter().enumerate() {
            for j in 0..depth {
                for op in ["attn.qkv", "attn.cluster_attention", "attn.proj"] {
                    let range = format!("stage{s}/block{j}/{op}");
                    assert!(has(&range), "{path}: no `{range}` in {ranges:?}");
                }
            }
            if s + 1 < depths.len() {
                let range = format!("stage{s}/merge.selection");
                assert!(has(&range), "{path}: no `{range}` in {ranges:?}");
            }
        }
        let beyond = format!("stage{}/block0", depths.len());
        assert!(!has(&beyond), "{path}: a stage too many");
    }
}

/// After its first forward at a size, a forward uploads only its images
/// and reads back only its logits and the selection check: every other
/// table (anchors, grid positions, the stage-0 layout) is on the device
/// already, and no buffer is zero-filled but those that must start at 0.
#[test]
fn a_repeated_forward_uploads_only_its_images() {
    use autofocus::{AffConfig, Tensor};
    let config = AffConfig::preset("aff_mini").unwrap();
    let model = AutoFocusFormer::random(config, ModelKind::Classifier, 0).unwrap();
    let device = Device::emulator();
    let gpu = DeviceModel::<f32>::new(&model, device.clone()).unwrap();
    let images = Tensor::new(vec![2, 3, 64, 64], vec![0.25; 2 * 3 * 64 * 64]).unwrap();
    let first = gpu.forward(&images).unwrap();
    let before = device.counts();
    let second = gpu.forward(&images).unwrap();
    let counts = device.counts() - before;
    assert_eq!(first.data(), second.data());
    assert_eq!((counts.uploads, counts.downloads), (1, 2), "{counts:?}");
    assert!(
        counts.kernel_launches > 0 && counts.zero_fills < 10,
        "{counts:?}"
    );
}

/// On a GPU the classifier's forward is replayed from one CUDA graph per
/// input shape after its first two forwards: the logits must be the plain
/// launches' bit for bit, for new images each time (the graph reads its
/// fixed input buffer, refilled per forward). The emulator has no graphs:
/// there every forward launches its kernels.
#[test]
fn graph_replays_give_the_plain_launches_logits_bit_for_bit() {
    use autofocus::{AffConfig, Tensor};
    let config = AffConfig::preset("aff_mini").unwrap();
    let model = AutoFocusFormer::random(config, ModelKind::Classifier, 0).unwrap();
    let image = |seed: usize| {
        let data = (0..2 * 3 * 64 * 64)
            .map(|i| (((i * 7 + seed * 13) % 101) as f32 / 50.0) - 1.0)
            .collect();
        Tensor::new(vec![2, 3, 64, 64], data).unwrap()
    };
    for device in common::devices() {
        let mut plain = DeviceModel::<f32>::new(&model, device.clone()).unwrap();
        plain.set_graphs(false);
        let mut graphs = DeviceModel::<f32>::new(&model, device.clone()).unwrap();
        graphs.set_graphs(true);
        // The emulator runs one forward: it only shows graphs stay off there.
        let forwards = if device.is_cuda() { 4 } else { 1 };
        for seed in 0..forwards {
            let want = plain.forward(&image(seed)).unwrap();
            let got = graphs.forward(&image(seed)).unwrap();
            assert_exact(
                &format!("forward {seed} on {device:?}"),
                got.data(),
                want.data(),
            );
        }
        // The first forward warms up; the second records, then replays,
        // as the third and fourth do.
        let replays = if device.is_cuda() { 3 } else { 0 };
        assert_eq!(graphs.graph_replays(), replays, "on {device:?}");
        assert_eq!(plain.graph_replays(), 0);
    }
}

/// A stream of batches through `forward_batches` (on a GPU: uploads and
/// read-backs on a second stream from page-locked memory, overlapping the
/// kernels; graphs on) gives each batch the logits a plain forward gives
/// it, bit for bit, in order, as the batches change size (each slot's
/// buffers are remade); once each size has been seen, a batch costs one
/// upload and two read-backs (logits and the selection flag), and the host
/// waits for each copy before it touches its buffer; `None` in
/// `forward_stream` hands over the batches in flight; an error stops the
/// stream after the batches before it were handed over.
#[test]
fn overlapped_batches_give_each_batch_its_own_logits_in_order() {
    use autofocus::{AffConfig, Error, Tensor};
    let config = AffConfig::preset("aff_mini").unwrap();
    let model = AutoFocusFormer::random(config, ModelKind::Classifier, 0).unwrap();
    let image = |seed: usize, b: usize, h: usize, w: usize| {
        let data = (0..b * 3 * h * w)
            .map(|i| (((i * 7 + seed * 13) % 101) as f32 / 50.0) - 1.0)
            .collect();
        Tensor::new(vec![b, 3, h, w], data).unwrap()
    };
    // Two of one shape (each slot once), a smaller batch, another size,
    // and back: slots remade, the oldest collected first.
    let batches = [
        image(0, 2, 32, 32),
        image(1, 2, 32, 32),
        image(2, 1, 32, 32),
        image(3, 1, 32, 48),
        image(4, 2, 32, 32),
    ];
    for device in common::devices() {
        let mut plain = DeviceModel::<f32>::new(&model, device.clone()).unwrap();
        plain.set_graphs(false);
        let want: Vec<Tensor> = batches.iter().map(|b| plain.forward(b).unwrap()).collect();
        let overlapped = DeviceModel::<f32>::new(&model, device.clone()).unwrap();
        let mut counts = None;
        for pass in 0..2 {
            let before = device.counts();
            let mut got = Vec::new();
            overlapped
                .forward_batches(batches.iter().cloned().map(Ok), |logits| {
                    got.push(logits);
                    Ok(())
                })
                .unwrap();
            assert_eq!(got.len(), want.len(), "on {device:?}");
            for (k, (got, want)) in got.iter().zip(&want).enumerate() {
                assert_eq!(got.shape(), want.shape(), "batch {k} on {device:?}");
                assert_exact(
                    &format!("pass {pass}, batch {k} on {device:?}"),
                    got.data(),
                    want.data(),
                );
            }
            counts = Some(device.counts() - before);
        }
        let counts = counts.unwrap();
        let n = batches.len() as u64;
        assert_eq!(
            (counts.uploads, counts.downloads),
            (n, 2 * n),
            "on {device:?}: {counts:?}"
        );
        // The host waits for both read-backs of every batch before reading
        // them (every slot above is new, so no input copy is pending)...
        assert_eq!(counts.host_waits, 2 * n, "on {device:?}: {counts:?}");
        // ...and, when a slot is reused, for the upload of the batch two
        // before before it overwrites that batch's images.
        let before = device.counts();
        let same = [&batches[0], &batches[1], &batches[4]];
        overlapped
            .forward_batches(same.map(Ok), |_| Ok(()))
            .unwrap();
        let waits = (device.counts() - before).host_waits;
        assert_eq!(waits, 3 * 2 + 1, "on {device:?}");

        // An item `None` hands over every batch in flight before the next
        // is taken (for a source about to wait); the slots are kept.
        let log = std::cell::RefCell::new(Vec::new());
        let mut got = Vec::new();
        let plan = [
            Some(0),
            Some(1),
            None,
            Some(2),
            None,
            None,
            Some(3),
            Some(4),
        ];
        let stream = plan.iter().map(|item| {
            log.borrow_mut()
                .push(item.map_or("drain".to_string(), |k| format!("take {k}")));
            Ok(item.map(|k| &batches[k]))
        });
        overlapped
            .forward_stream(stream, |logits| {
                log.borrow_mut().push("got".into());
                got.push(logits);
                Ok(())
            })
            .unwrap();
        let order = "take 0,take 1,drain,got,got,take 2,drain,got,drain,take 3,take 4,got,got";
        assert_eq!(log.borrow().join(","), order, "on {device:?}");
        for (k, (got, want)) in got.iter().zip(&want).enumerate() {
            assert_exact(
                &format!("drained, batch {k} on {device:?}"),
                got.data(),
                want.data(),
            );
        }
        assert_eq!(got.len(), want.len());

        // A malformed batch stops the stream: the ones before it arrive.
        let mut seen = 0;
        let stream = [
            Ok(batches[0].clone()),
            Ok(batches[1].clone()),
            Ok(Tensor::new(vec![1, 2, 8, 8], vec![0.0; 128]).unwrap()),
            Ok(batches[2].clone()),
        ];
        let err = overlapped.forward_batches(stream, |_| {
            seen += 1;
            Ok(())
        });
        assert!(err.is_err(), "on {device:?}");
        assert_eq!(seen, 0, "nothing is collected before the third batch");
        // The caller's error stops it too, after that batch.
        let mut seen = 0;
        let err = overlapped
            .forward_batches(batches.iter().cloned().map(Ok), |_| {
                seen += 1;
                if seen == 2 {
                    Err(Error::InvalidArgument("enough".into()))
                } else {
                    Ok(())
                }
            })
            .unwrap_err();
        assert!(err.to_string().contains("enough"), "{err}");
        assert_eq!(seen, 2);
    }
}
