//! The candle model (feature `candle`) against the published model's
//! goldens: positions exact, features and logits within the spec's f32
//! tolerance, and every parameter's gradient of `Σ logits · grad.loss_coef`
//! within `1e-4 · max(1, max|ref|)`. On the CPU, and with feature
//! `candle-cuda` on candle's GPU too when there is one.
#![cfg(feature = "candle")]

use autofocus::candle::{AutoFocusFormer, load_varmap};
use autofocus::model::ModelKind;
use autofocus::tensor::Tensor as HostTensor;
use candle_core::{DType, Device, Tensor};

mod common;

use common::{Case, assert_close, assert_exact, for_each_golden_case};

/// The case's weights as a candle model on `dev` over a fresh `VarMap`.
fn candle_model(case: &Case, dev: &Device) -> (AutoFocusFormer, candle_nn::VarMap) {
    let dir = common::case_dir(&case.name).expect("the case was found once");
    let path = dir.join(format!("{}.weights.safetensors", case.name));
    let (config, kind, varmap) =
        load_varmap(&path, None, DType::F32, dev).unwrap_or_else(|e| panic!("{}: {e}", case.name));
    let model = AutoFocusFormer::from_varmap(&config, kind, &varmap, DType::F32, dev)
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    (model, varmap)
}

fn candle_tensor(t: &HostTensor<f32>, dev: &Device) -> Tensor {
    Tensor::from_vec(t.data().to_vec(), t.shape(), dev).unwrap()
}

/// Runs `check` on every golden case of `kind` on every candle device;
/// returns the cases run.
fn for_each_case_and_device(
    kind: ModelKind,
    check: impl Fn(&Case, &Device) + std::panic::RefUnwindSafe,
) -> Vec<String> {
    // A failing case is caught and named; the devices are only read.
    let devices = std::panic::AssertUnwindSafe(common::candle_devices());
    for_each_golden_case(kind, |case| {
        for dev in devices.iter() {
            eprintln!("  on {dev:?}");
            check(case, dev);
        }
    })
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn classifier_matches_every_golden_case() {
    for_each_case_and_device(ModelKind::Classifier, |case, dev| {
        let (model, _) = candle_model(case, dev);
        let images = candle_tensor(&case.f32("input.image"), dev);
        let (_, stages) = model.forward_stages(&images).unwrap();
        for (s, stage) in stages.iter().enumerate() {
            let what = |k: &str| format!("{}: stage{s}.{k}", case.name);
            let cluster_pos = if case.has(&format!("stage{s}.cluster.pos")) {
                format!("stage{s}.cluster.pos")
            } else {
                format!("stage{s}.in.pos")
            };
            assert_exact(
                &what("pos"),
                &stage.before_merge.pos,
                case.f32(&cluster_pos).data(),
            );
            let blocks_out = format!("stage{s}.block{}.out", model.config().depths[s] - 1);
            assert_close(
                &what("blocks out"),
                &values(&stage.before_merge.feat),
                &case.f32(&blocks_out),
            );
            if let Some(merged) = &stage.merged {
                assert_exact(
                    &what("merge.pos"),
                    &merged.pos,
                    case.f32(&format!("stage{s}.merge.pos")).data(),
                );
                assert_close(
                    &what("merge.feat"),
                    &values(&merged.feat),
                    &case.f32(&format!("stage{s}.merge.feat")),
                );
            }
        }
        let logits = model.forward(&images).unwrap();
        assert_close(
            &format!("{}: logits", case.name),
            &values(&logits),
            &case.f32("logits"),
        );
    });
}

#[test]
fn gradients_match_every_golden_case_with_gradients() {
    let checked = for_each_case_and_device(ModelKind::Classifier, |case, dev| {
        if !case.has("grad.loss_coef") {
            return;
        }
        let (model, varmap) = candle_model(case, dev);
        let images = candle_tensor(&case.f32("input.image"), dev);
        let coef = candle_tensor(&case.f32("grad.loss_coef"), dev);
        let logits = model.forward(&images).unwrap();
        let loss = logits.broadcast_mul(&coef).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let vars = varmap.data().lock().unwrap();
        let mut compared = 0;
        for key in case.golden_keys() {
            let Some(param) = key.strip_prefix("grad.") else {
                continue;
            };
            if param == "loss_coef" {
                continue;
            }
            let var = vars
                .get(param)
                .unwrap_or_else(|| panic!("{}: no parameter {param}", case.name));
            let grad = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{}: no gradient for {param}", case.name));
            assert_close(
                &format!("{}: {key}", case.name),
                &values(grad),
                &case.f32(&key),
            );
            compared += 1;
        }
        // Every trainable parameter has a reference (buffers have none).
        let trainable = vars.keys().filter(|k| !k.contains("running_")).count();
        assert_eq!(compared, trainable, "{}: gradients compared", case.name);
    });
    assert!(!checked.is_empty());
}

#[test]
fn backbone_matches_every_golden_case() {
    for_each_case_and_device(ModelKind::Backbone, |case, dev| {
        let (model, _) = candle_model(case, dev);
        let images = candle_tensor(&case.f32("input.image"), dev);
        let (grid, stages) = model.features(&images).unwrap();
        let hw = case.i32("spatial_shape");
        assert_eq!([grid.0 as i32, grid.1 as i32], hw.data(), "{}", case.name);
        for (s, stage) in stages.iter().enumerate() {
            let res = format!("res{}", s + 2);
            assert_exact(
                &format!("{}: {res}_pos", case.name),
                &stage.pos,
                case.f32(&format!("{res}_pos")).data(),
            );
            assert_close(
                &format!("{}: {res}", case.name),
                &values(&stage.feat),
                &case.f32(&res),
            );
        }
    });
}
