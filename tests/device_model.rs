//! The whole model through the kernels ([`DeviceModel`]) against the golden
//! logits: on the CPU emulator always, on GPU 0 when present; f32 within
//! 1e-4 of the published model, f16/bf16 within the agreement measured here.

mod common;

use autofocus::gpu::{Device, Element};
use autofocus::io::SafetensorsFile;
use autofocus::{AutoFocusFormer, DeviceModel};
use common::{Case, assert_close, assert_exact};

fn logits_on<T: Element>(case: &Case, device: &Device) -> Vec<f32> {
    let model = DeviceModel::<T>::new(&case.model, device.clone()).unwrap();
    let image = case.f32("input.image");
    model.forward(&image).unwrap().data().to_vec()
}

fn golden_case_on_every_device(case_name: &str) {
    let Some(case) = Case::load(case_name) else {
        return;
    };
    let want = case.f32("logits");
    for device in common::devices() {
        let got = logits_on::<f32>(&case, &device);
        assert_close(
            &format!("{case_name} f32 logits on {device:?}"),
            &got,
            &want,
        );
    }
}

#[test]
fn tiny_128_f32_matches_the_golden_logits() {
    golden_case_on_every_device("tiny-128");
}

#[test]
fn tiny_160x192_fifth_f32_matches_the_golden_logits() {
    golden_case_on_every_device("tiny-160x192-fifth");
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

/// The segmentation golden (130×190, padded to 132×192; offsets clamped):
/// every stage's features within 1e-4, positions exact.
#[test]
fn the_backbone_features_match_the_golden() {
    let dir = common::data_dir();
    let model =
        AutoFocusFormer::load(dir.join("seg-tiny-130x190.weights.safetensors"), None).unwrap();
    let golden = SafetensorsFile::open(dir.join("seg-tiny-130x190.golden.safetensors")).unwrap();
    let image = golden.tensor_f32("input.image").unwrap();
    for device in common::devices() {
        let on_device = DeviceModel::<f32>::new(&model, device.clone()).unwrap();
        let features = on_device.features(&image).unwrap();
        assert_eq!(features.grid, (33, 48));
        assert_eq!(features.stages.len(), 4);
        for (s, stage) in features.stages.iter().enumerate() {
            let key = format!("res{}", s + 2);
            let want = golden.tensor_f32(&key).unwrap();
            assert_close(&format!("{key} on {device:?}"), &stage.feat, &want);
            let pos = golden.tensor_f32(&format!("{key}_pos")).unwrap();
            assert_exact(&format!("{key}_pos on {device:?}"), &stage.pos, pos.data());
        }
        // A backbone has no classification head, on a device as on the CPU.
        assert!(on_device.forward(&image).is_err());
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
