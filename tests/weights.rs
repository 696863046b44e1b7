//! Loading weights: safetensors and `.pth`, configs, and every error path
//! (missing, unexpected, misshapen, non-float tensors; corrupt files).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use autofocus::error::TensorProblem;
use autofocus::io::pth::{EntryChoice, PthCheckpoint, PthTensor};
use autofocus::io::{SafetensorsFile, TensorSource, write_safetensors};
use autofocus::model::{ModelKind, ModelWeights, expected_tensors};
use autofocus::{AffConfig, AnyTensor, AutoFocusFormer, Error, Tensor};

fn tiny_weights() -> PathBuf {
    common::data_dir().join("tiny-128.weights.safetensors")
}

fn tiny_config() -> AffConfig {
    let file = SafetensorsFile::open(tiny_weights()).unwrap();
    AffConfig::from_json(file.metadata("config").unwrap()).unwrap()
}

/// Every tensor of a safetensors file, to be edited and written back.
fn read_all(path: &Path) -> Vec<(String, AnyTensor)> {
    let file = SafetensorsFile::open(path).unwrap();
    file.names()
        .into_iter()
        .map(|n| {
            let t = file.tensor_f32(&n).unwrap();
            (n, AnyTensor::F32(t))
        })
        .collect()
}

fn write(
    dir: &Path,
    name: &str,
    tensors: &[(String, AnyTensor)],
    config: Option<&AffConfig>,
) -> PathBuf {
    let path = dir.join(name);
    let meta: HashMap<String, String> = config
        .map(|c| ("config".to_string(), c.to_json()))
        .into_iter()
        .collect();
    write_safetensors(&path, tensors, meta).unwrap();
    path
}

fn weight_problems(err: Error) -> (Vec<TensorProblem>, Vec<String>) {
    match err {
        Error::Weights {
            problems,
            fitting_presets,
            ..
        } => (problems, fitting_presets),
        other => panic!("expected a weights error, got {other}"),
    }
}

#[test]
fn missing_unexpected_and_misshapen_tensors_are_all_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = read_all(&tiny_weights());
    tensors.retain(|(n, _)| n != "layers.1.blocks.0.attn.q.bias");
    for (name, t) in &mut tensors {
        if name == "head.weight" {
            *t = AnyTensor::F32(Tensor::new(vec![10, 95], vec![0.0; 950]).unwrap());
        }
    }
    tensors.push((
        "layers.3.prob_net.weight".into(),
        AnyTensor::F32(Tensor::new(vec![1, 96], vec![0.0; 96]).unwrap()),
    ));
    tensors.push((
        "layers.0.blocks.0.norm1.weight_int".into(),
        AnyTensor::I32(Tensor::new(vec![2], vec![1, 2]).unwrap()),
    ));
    let path = write(
        dir.path(),
        "broken.safetensors",
        &tensors,
        Some(&tiny_config()),
    );
    let err = AutoFocusFormer::load(&path, None).unwrap_err();
    let message = err.to_string();
    let (problems, _) = weight_problems(err);
    assert!(problems.contains(&TensorProblem::Missing {
        name: "layers.1.blocks.0.attn.q.bias".into(),
        expected: vec![32],
    }));
    assert!(problems.contains(&TensorProblem::WrongShape {
        name: "head.weight".into(),
        expected: vec![10, 96],
        found: vec![10, 95],
    }));
    assert!(problems.contains(&TensorProblem::Unexpected {
        name: "layers.3.prob_net.weight".into(),
        found: vec![1, 96],
    }));
    assert_eq!(problems.len(), 4, "{problems:?}");
    assert!(
        message.contains("broken.safetensors") && message.contains("head.weight"),
        "{message}"
    );
    assert!(!message.contains('\n'), "one line: {message}");
}

#[test]
fn integer_tensors_where_floats_belong_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = read_all(&tiny_weights());
    for (name, t) in &mut tensors {
        if name == "norm.bias" {
            *t = AnyTensor::I32(Tensor::new(vec![96], vec![0; 96]).unwrap());
        }
    }
    let path = write(
        dir.path(),
        "ints.safetensors",
        &tensors,
        Some(&tiny_config()),
    );
    let (problems, _) = weight_problems(AutoFocusFormer::load(&path, None).unwrap_err());
    assert!(
        matches!(&problems[..], [TensorProblem::WrongDtype { name, .. }] if name == "norm.bias")
    );
}

#[test]
fn non_finite_weights_are_refused_with_the_first_index() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = read_all(&tiny_weights());
    for (name, t) in &mut tensors {
        let AnyTensor::F32(t) = t else { continue };
        match name.as_str() {
            // Shape [32, 32]: element (3, 4).
            "layers.1.blocks.0.attn.q.weight" => t.data_mut()[3 * 32 + 4] = f32::NAN,
            "norm.bias" => t.data_mut()[95] = f32::INFINITY,
            _ => {}
        }
    }
    let path = write(
        dir.path(),
        "nan.safetensors",
        &tensors,
        Some(&tiny_config()),
    );
    let err = AutoFocusFormer::load(&path, None).unwrap_err();
    let message = err.to_string();
    let (problems, _) = weight_problems(err);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        matches!(&problems[0], TensorProblem::NonFinite { name, index, value }
        if name == "layers.1.blocks.0.attn.q.weight" && index == &[3, 4] && value.is_nan())
    );
    assert!(
        matches!(&problems[1], TensorProblem::NonFinite { name, index, value }
        if name == "norm.bias" && index == &[95] && *value == f32::INFINITY)
    );
    assert!(
        message.contains("nan.safetensors") && message.contains("[3, 4]"),
        "{message}"
    );
}

#[test]
fn the_error_names_the_preset_the_file_fits() {
    let dir = tempfile::tempdir().unwrap();
    let mini = AffConfig::preset("aff_mini").unwrap();
    // Random aff_mini weights under their key names, without config.
    let tensors: Vec<(String, AnyTensor)> =
        ModelWeights::random_tensors(&mini, ModelKind::Classifier, 1)
            .into_iter()
            .map(|(name, t)| (name, AnyTensor::F32(t)))
            .collect();
    assert_eq!(
        tensors.len(),
        expected_tensors(&mini, ModelKind::Classifier).len()
    );
    let path = write(dir.path(), "mini.safetensors", &tensors, None);
    // No config anywhere: the error says which presets fit.
    let err = AutoFocusFormer::load(&path, None).unwrap_err().to_string();
    assert!(
        err.contains("stores no config") && err.contains("aff_mini"),
        "{err}"
    );
    // The wrong config: every mismatch, and the fitting presets.
    let (problems, fits) =
        weight_problems(AutoFocusFormer::load(&path, Some(tiny_config())).unwrap_err());
    assert!(!problems.is_empty());
    assert_eq!(fits, ["aff_mini", "aff_mini_1_5th"]);
    // The right one loads, and runs.
    let model = AutoFocusFormer::load(&path, Some(mini)).unwrap();
    let logits = model
        .forward(&Tensor::new(vec![1, 3, 64, 64], vec![0.1; 3 * 64 * 64]).unwrap())
        .unwrap();
    assert_eq!(logits.shape(), &[1, 1000]);
}

#[test]
fn aligned_f32_weights_are_read_in_place_from_the_mapped_file() {
    let file = SafetensorsFile::open(tiny_weights()).unwrap();
    for name in file.names() {
        let values = file.f32(&name).unwrap();
        assert!(values.is_mapped(), "{name} was copied");
    }
    let model = AutoFocusFormer::load(tiny_weights(), None).unwrap();
    assert!(model.weights().stages[2].blocks[1].fc1.weight.is_mapped());
}

#[test]
fn corrupt_and_truncated_files_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(tiny_weights()).unwrap();
    for (name, content) in [
        ("empty.safetensors", Vec::new()),
        ("short.safetensors", bytes[..5].to_vec()),
        ("header-cut.safetensors", bytes[..200].to_vec()),
        ("data-cut.safetensors", bytes[..bytes.len() - 100].to_vec()),
        (
            "garbage.safetensors",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
                .collect(),
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        let err = AutoFocusFormer::load(&path, Some(tiny_config())).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{name}: {err}");
        assert!(err.to_string().contains(name), "{err}");
    }
    let err = AutoFocusFormer::load(dir.path().join("absent.safetensors"), None).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
}

#[test]
fn the_pth_checkpoint_holds_the_golden_weights() {
    let pth =
        PthCheckpoint::open(common::data_dir().join("tiny-128.pth"), EntryChoice::Model).unwrap();
    let reference = SafetensorsFile::open(tiny_weights()).unwrap();
    for name in reference.names() {
        let PthTensor::Float(t) = &pth.tensors()[&name] else {
            panic!("{name} is not float")
        };
        let want = reference.tensor_f32(&name).unwrap();
        assert_eq!(t, &want, "{name}");
    }
    // Plus the BatchNorm counter, an integer; optimizer state and the rest are skipped.
    assert!(matches!(
        pth.tensors()["patch_embed.bn.num_batches_tracked"],
        PthTensor::Int(_)
    ));
    assert_eq!(pth.tensors().len(), reference.names().len() + 1);
    for entry in ["optimizer", "epoch", "max_accuracy", "config"] {
        assert!(
            pth.skipped().iter().any(|s| s == entry),
            "{entry} not skipped"
        );
    }
    // The model loads straight from the .pth, given its config.
    let model = AutoFocusFormer::load(common::data_dir().join("tiny-128.pth"), Some(tiny_config()))
        .unwrap();
    let case = common::Case::load("tiny-128").unwrap();
    let logits = model.forward(&case.f32("input.image")).unwrap();
    common::assert_close("logits from .pth", logits.data(), &case.f32("logits"));
}

#[test]
fn broken_pth_files_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(common::data_dir().join("tiny-128.pth")).unwrap();
    let mut cuts: Vec<usize> = (1..40).map(|k| bytes.len() * k / 40).collect();
    cuts.extend([4, 30, bytes.len() - 1]);
    for cut in cuts {
        let path = dir.path().join("cut.pth");
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let result = PthCheckpoint::open(&path, EntryChoice::Model);
        assert!(result.is_err(), "cut at {cut} of {} read fine", bytes.len());
    }
    let err = PthCheckpoint::open(
        common::data_dir().join("tiny-128.pth"),
        EntryChoice::ModelEma,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("model_ema"), "{err}");
}
