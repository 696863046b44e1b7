//! The `autofocus` command: each subcommand end to end, and its errors as one
//! readable line with a non-zero exit.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use autofocus::io::{SafetensorsFile, TensorSource, write_safetensors};
use autofocus::{AnyTensor, Tensor};

fn autofocus(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_autofocus"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a failure reported as a single `error: …` line containing `needle`.
fn assert_error_line(o: &Output, needle: &str) {
    assert!(!o.status.success(), "unexpected success: {}", stdout(o));
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "{err}"
    );
}

fn data(name: &str) -> String {
    common::data_dir().join(name).display().to_string()
}

fn images() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/images");
    ["chelsea.png", "coffee.png", "rocket.jpg"]
        .iter()
        .map(|f| dir.join(f).display().to_string())
        .collect()
}

fn tmp(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

#[test]
fn classify_prints_the_top_classes_of_each_image() {
    let weights = data("tiny-128.weights.safetensors");
    let mut args = vec!["classify", "--weights", &weights];
    let imgs = images();
    args.extend(imgs.iter().map(String::as_str));
    let out = autofocus(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for img in &imgs {
        assert!(text.contains(img.as_str()), "{text}");
    }
    assert_eq!(
        text.lines().filter(|l| l.contains('%')).count(),
        15,
        "{text}"
    );

    args.extend(["--json", "--top", "3"]);
    let out = autofocus(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let results = json.as_array().unwrap();
    assert_eq!(results.len(), 3);
    let top = results[0]["top"].as_array().unwrap();
    assert_eq!(top.len(), 3);
    let p: Vec<f64> = top
        .iter()
        .map(|t| t["probability"].as_f64().unwrap())
        .collect();
    assert!(p[0] >= p[1] && p[1] >= p[2] && p[0] <= 1.0);
}

#[test]
fn classify_focus_draws_each_image_and_keeps_existing_pictures() {
    let dir = tempfile::tempdir().unwrap();
    let focus = tmp(&dir, "focus");
    let weights = data("tiny-128.weights.safetensors");
    let imgs = images();
    let run = |extra: &[&str]| {
        let mut args = vec!["classify", "--weights", &weights, "--focus"];
        args.push(focus.to_str().unwrap());
        args.extend(imgs.iter().map(String::as_str));
        args.extend(extra);
        autofocus(&args)
    };
    let first = run(&[]);
    assert!(first.status.success(), "{}", stderr(&first));
    let mut names: Vec<String> = std::fs::read_dir(&focus)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["chelsea.focus.png", "coffee.focus.png", "rocket.focus.png"]
    );
    // Three 128-pixel panels with two separators, enlarged 2× to be seen.
    let picture = image::open(focus.join("chelsea.focus.png"))
        .unwrap()
        .to_rgb8();
    let separator = autofocus::focus::SEPARATOR;
    assert_eq!(picture.dimensions(), (2 * (3 * 128 + 2 * separator), 256));

    // Pictures already there are kept, and refused before any work.
    std::fs::write(focus.join("coffee.focus.png"), b"mine").unwrap();
    let second = run(&[]);
    assert_error_line(&second, "--force");
    assert!(stdout(&second).is_empty(), "refused before classifying");
    assert_eq!(
        std::fs::read(focus.join("coffee.focus.png")).unwrap(),
        b"mine"
    );
    let third = run(&["--force"]);
    assert!(third.status.success(), "{}", stderr(&third));
    assert!(image::open(focus.join("coffee.focus.png")).is_ok());

    // Two inputs of one file name would share a picture.
    let twin = tmp(&dir, "twin");
    std::fs::create_dir(&twin).unwrap();
    std::fs::copy(&imgs[0], twin.join("chelsea.png")).unwrap();
    let clash = run(&["--force", twin.to_str().unwrap()]);
    assert_error_line(&clash, "would both be drawn");

    // --force means nothing without --out or --focus.
    let lone = autofocus(&["classify", "--weights", &weights, &imgs[0], "--force"]);
    assert_error_line(&lone, "--force");
}

#[test]
fn the_bundled_small_objects_model_names_its_bundled_images() {
    // Trained by examples/train_small_objects (README); the images are
    // held-out scenes named `<kind>-<i>.png`.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets");
    let weights = root.join("small-objects.safetensors");
    let images = root.join("small-objects");
    let out = autofocus(&[
        "classify",
        "--no-crop",
        "--json",
        "--top",
        "1",
        "--weights",
        weights.to_str().unwrap(),
        images.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let results = json.as_array().unwrap();
    assert_eq!(results.len(), 8, "two images of each of four kinds");
    for r in results {
        let image = r["image"].as_str().unwrap();
        let stem = Path::new(image).file_stem().unwrap().to_str().unwrap();
        let kind = stem.split('-').next().unwrap();
        assert_eq!(r["top"][0]["label"], kind, "{image}: {r}");
    }
}

#[test]
fn classify_through_the_kernels_agrees_with_the_cpu() {
    let weights = data("tiny-128.weights.safetensors");
    let imgs = images();
    let run = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["classify", "--weights", &weights, "--json", "--top", "3"];
        args.extend(imgs.iter().map(String::as_str));
        args.extend(extra);
        let out = autofocus(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str(&stdout(&out)).unwrap()
    };
    let cpu = run(&[]);
    // One image per batch: the device worker streams three batches, with
    // two in flight (DeviceModel::forward_stream).
    let emulated = run(&["--device", "emulator", "--batch", "1"]);
    let probabilities = |v: &serde_json::Value| -> Vec<f64> {
        v["top"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["probability"].as_f64().unwrap())
            .collect()
    };
    for (i, img) in imgs.iter().enumerate() {
        let (cpu, emulated) = (&cpu[i], &emulated[i]);
        assert_eq!(emulated["image"].as_str(), Some(img.as_str()));
        assert_eq!(cpu["top"][0]["class"], emulated["top"][0]["class"], "{img}");
        for (a, b) in probabilities(cpu).iter().zip(probabilities(emulated)) {
            assert!((a - b).abs() < 1e-4, "{img}: {a} vs {b}");
        }
    }
    let img = imgs[0].clone();
    // The CPU backend is f32 only; unknown names are named.
    let out = autofocus(&["classify", "--weights", &weights, &img, "--dtype", "bf16"]);
    assert_error_line(&out, "--dtype bf16");
    let out = autofocus(&["classify", "--weights", &weights, &img, "--device", "tpu"]);
    assert_error_line(&out, "tpu");
}

#[test]
fn classify_reports_unreadable_images() {
    let dir = tempfile::tempdir().unwrap();
    let fake = tmp(&dir, "not-an-image.png");
    std::fs::write(&fake, b"hello").unwrap();
    let weights = data("tiny-128.weights.safetensors");
    let out = autofocus(&["classify", "--weights", &weights, fake.to_str().unwrap()]);
    assert_error_line(&out, "not-an-image.png");
}

#[test]
fn infer_writes_logits_and_stage_outputs_matching_the_golden() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = tmp(&dir, "out.safetensors");
    let (weights, input) = (
        data("tiny-128.weights.safetensors"),
        data("tiny-128.golden.safetensors"),
    );
    let out_str = out_path.to_str().unwrap();
    let args = [
        "infer",
        "--weights",
        &weights,
        "--input",
        &input,
        "--out",
        out_str,
        "--stages",
    ];
    let out = autofocus(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let case = common::Case::load("tiny-128").unwrap();
    let written = SafetensorsFile::open(&out_path).unwrap();
    common::assert_close(
        "logits",
        written.tensor_f32("logits").unwrap().data(),
        &case.f32("logits"),
    );
    for s in 0..4 {
        let key = format!("stage{s}.out.feat");
        common::assert_close(
            &key,
            written.tensor_f32(&key).unwrap().data(),
            &case.f32(&key),
        );
        let key = format!("stage{s}.out.pos");
        assert_eq!(written.tensor_f32(&key).unwrap(), case.f32(&key), "{key}");
    }
    // An existing output is not overwritten without --force, an input never.
    let before = std::fs::read(&out_path).unwrap();
    assert_error_line(&autofocus(&args), "--force");
    assert_eq!(std::fs::read(&out_path).unwrap(), before);
    let clobber = [
        "infer",
        "--weights",
        &weights,
        "--input",
        &input,
        "--out",
        &input,
        "--force",
    ];
    assert_error_line(&autofocus(&clobber), "input");
}

#[test]
fn infer_names_a_bad_input_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let weights = data("tiny-128.weights.safetensors");
    let out_path = tmp(&dir, "o.safetensors");
    // A 3-d image, and a file without `input.image`.
    let cases = [
        (
            "wrong.safetensors",
            "input.image",
            Tensor::new(vec![2, 64, 64], vec![0.0; 2 * 64 * 64]),
        ),
        ("other.safetensors", "x", Tensor::new(vec![1], vec![0.0])),
    ];
    for (file, name, tensor) in cases {
        let input = tmp(&dir, file);
        let tensors = [(name.to_string(), AnyTensor::F32(tensor.unwrap()))];
        write_safetensors(&input, &tensors, Default::default()).unwrap();
        let args = [
            "infer",
            "--weights",
            &weights,
            "--input",
            input.to_str().unwrap(),
            "--out",
            out_path.to_str().unwrap(),
        ];
        assert_error_line(&autofocus(&args), "input.image");
        assert!(!out_path.exists());
    }
}

#[test]
fn infer_refuses_non_finite_pixels_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let weights = data("tiny-128.weights.safetensors");
    let out_path = tmp(&dir, "o.safetensors");
    for (value, shown) in [(f32::NAN, "NaN"), (f32::NEG_INFINITY, "-inf")] {
        let mut pixels = vec![0.1f32; 2 * 3 * 32 * 32];
        // Image 1, channel 2, row 5, column 7.
        pixels[((3 + 2) * 32 + 5) * 32 + 7] = value;
        let input = tmp(&dir, "nan.safetensors");
        let image = Tensor::new(vec![2, 3, 32, 32], pixels).unwrap();
        write_safetensors(
            &input,
            &[("input.image".to_string(), AnyTensor::F32(image))],
            Default::default(),
        )
        .unwrap();
        let args = [
            "infer",
            "--weights",
            &weights,
            "--input",
            input.to_str().unwrap(),
            "--out",
            out_path.to_str().unwrap(),
        ];
        let out = autofocus(&args);
        assert_error_line(&out, "input.image");
        let err = stderr(&out);
        assert!(err.contains(shown) && err.contains("[1, 2, 5, 7]"), "{err}");
        assert!(!out_path.exists());
    }
}

/// A symlink at the output counts as an existing file (dangling or not):
/// it is neither followed nor replaced without --force; with --force the
/// link itself is replaced, never its target.
#[test]
fn outputs_never_follow_a_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let weights = data("tiny-128.weights.safetensors");
    let input = data("tiny-128.golden.safetensors");
    let nowhere = tmp(&dir, "nowhere.safetensors");
    let dangling = tmp(&dir, "dangling.safetensors");
    std::os::unix::fs::symlink(&nowhere, &dangling).unwrap();
    let precious = tmp(&dir, "precious.txt");
    std::fs::write(&precious, "keep me").unwrap();
    let link = tmp(&dir, "link.safetensors");
    std::os::unix::fs::symlink(&precious, &link).unwrap();
    for out in [&dangling, &link] {
        let args = [
            "infer",
            "--weights",
            &weights,
            "--input",
            &input,
            "--out",
            out.to_str().unwrap(),
        ];
        assert_error_line(&autofocus(&args), "exists");
    }
    assert!(!nowhere.exists(), "the dangling link was followed");
    let forced = [
        "infer",
        "--weights",
        &weights,
        "--input",
        &input,
        "--out",
        link.to_str().unwrap(),
        "--force",
    ];
    let out = autofocus(&forced);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");
    assert!(SafetensorsFile::open(&link).is_ok());
    assert!(
        !std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

/// A checkpoint whose configuration has no classes is refused at load, in
/// one line (it used to make `classify` panic).
#[test]
fn a_checkpoint_with_zero_classes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let source =
        SafetensorsFile::open(common::data_dir().join("tiny-128.weights.safetensors")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(source.metadata("config").unwrap()).unwrap();
    config["num_classes"] = 0.into();
    let tensors: Vec<(String, AnyTensor)> = source
        .names()
        .into_iter()
        .map(|n| {
            let t = source.tensor_f32(&n).unwrap();
            let t = match n.as_str() {
                "head.weight" => Tensor::new(vec![0, 96], vec![]).unwrap(),
                "head.bias" => Tensor::new(vec![0], vec![]).unwrap(),
                _ => t,
            };
            (n, AnyTensor::F32(t))
        })
        .collect();
    let path = tmp(&dir, "zero.safetensors");
    let meta = [("config".to_string(), config.to_string())]
        .into_iter()
        .collect();
    write_safetensors(&path, &tensors, meta).unwrap();
    let imgs = images();
    let out = autofocus(&["classify", "--weights", path.to_str().unwrap(), &imgs[0]]);
    assert_error_line(&out, "num_classes");
}

/// A checkpoint's `class_names` metadata names the classes `classify`
/// prints; names that do not fit the classes are refused, naming the key.
#[test]
fn classify_prints_the_checkpoint_class_names() {
    let dir = tempfile::tempdir().unwrap();
    let source =
        SafetensorsFile::open(common::data_dir().join("tiny-128.weights.safetensors")).unwrap();
    let tensors: Vec<(String, AnyTensor)> = source
        .names()
        .into_iter()
        .map(|n| {
            let t = source.tensor_f32(&n).unwrap();
            (n, AnyTensor::F32(t))
        })
        .collect();
    let write = |file: &str, names: &serde_json::Value| {
        let path = tmp(&dir, file);
        let meta = [
            (
                "config".to_string(),
                source.metadata("config").unwrap().to_string(),
            ),
            ("class_names".to_string(), names.to_string()),
        ]
        .into_iter()
        .collect();
        write_safetensors(&path, &tensors, meta).unwrap();
        path
    };
    let names: Vec<String> = (0..10).map(|i| format!("kind-{i}")).collect();
    let named = write("named.safetensors", &serde_json::json!(names));
    let imgs = images();
    let out = autofocus(&["classify", "--weights", named.to_str().unwrap(), &imgs[0]]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let ranked: Vec<&str> = text.lines().filter(|l| l.contains('%')).collect();
    assert_eq!(ranked.len(), 5, "{text}");
    assert!(ranked.iter().all(|l| l.contains("kind-")), "{text}");

    let short = write("short.safetensors", &serde_json::json!(["a", "b"]));
    let out = autofocus(&["classify", "--weights", short.to_str().unwrap(), &imgs[0]]);
    assert_error_line(&out, "class_names");
}

#[test]
fn convert_reads_the_pth_and_stores_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = tmp(&dir, "tiny.json");
    let golden =
        SafetensorsFile::open(common::data_dir().join("tiny-128.weights.safetensors")).unwrap();
    std::fs::write(&config_path, golden.metadata("config").unwrap()).unwrap();
    let converted = tmp(&dir, "tiny.safetensors");
    let pth = data("tiny-128.pth");
    let out = autofocus(&[
        "convert",
        &pth,
        converted.to_str().unwrap(),
        "--config",
        config_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("optimizer"),
        "skipped entries reported: {}",
        stderr(&out)
    );
    // No --config needed afterwards; results are the golden ones.
    let result = tmp(&dir, "logits.safetensors");
    let input = data("tiny-128.golden.safetensors");
    let out = autofocus(&[
        "infer",
        "--weights",
        converted.to_str().unwrap(),
        "--input",
        &input,
        "--out",
        result.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let case = common::Case::load("tiny-128").unwrap();
    let logits = SafetensorsFile::open(&result)
        .unwrap()
        .tensor_f32("logits")
        .unwrap();
    common::assert_close("logits after convert", logits.data(), &case.f32("logits"));

    // A config the tensors do not fit is refused before anything is written.
    let refused = tmp(&dir, "refused.safetensors");
    let out = autofocus(&[
        "convert",
        &pth,
        refused.to_str().unwrap(),
        "--config",
        "aff_mini",
    ]);
    assert_error_line(&out, "patch_embed.proj1.weight");
    assert!(!refused.exists());
}

#[test]
fn bench_ends_with_one_json_line() {
    let config = r#"{"num_classes": 10, "embed_dim": [16, 32, 64, 96], "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8], "mlp_ratio": 2.0, "cluster_size": 8, "nbhd_size": [48, 48, 48, 49], "ds_rate": 0.25, "img_size": 96}"#;
    let out = autofocus(&[
        "bench", "--config", config, "--batch", "2", "--iters", "2", "--warmup", "0", "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let last = text.lines().last().unwrap();
    let json: serde_json::Value = serde_json::from_str(last).unwrap();
    for key in [
        "config",
        "batch",
        "size",
        "device",
        "dtype",
        "ms_per_batch",
        "images_per_s",
    ] {
        assert!(json.get(key).is_some(), "{key} missing: {last}");
    }
    assert_eq!(json["batch"], 2);
    assert_eq!(json["size"], 96);
    assert_eq!(json["gemm"], "cpu");
    assert_eq!(json["cuda_graph"], false);
    let out = autofocus(&["bench", "--config", "aff_mini", "--device", "cuda"]);
    assert_error_line(&out, "cuda");
}

#[test]
fn bad_arguments_give_one_line_errors() {
    let img = images().remove(0);
    let out = autofocus(&["classify", "--weights", "/nonexistent/w.safetensors", &img]);
    assert_error_line(&out, "/nonexistent/w.safetensors");
    let out = autofocus(&[
        "classify",
        "--weights",
        "/nonexistent/w.safetensors",
        "x.png",
    ]);
    assert_error_line(&out, "x.png");
    let weights = data("tiny-128.weights.safetensors");
    for (device, needle) in [
        ("cuda:0,0", "named twice"),
        ("cuda:x", "cuda:x"),
        ("cuda:all", "cuda"),
    ] {
        let out = autofocus(&["classify", "--weights", &weights, &img, "--device", device]);
        assert_error_line(&out, needle);
    }
    let out = autofocus(&["classify", "--weights", &weights, &img, "--resume"]);
    assert_error_line(&out, "--out");
    let out = autofocus(&["classify", "--weights", &weights, &img, "--shard", "3/3"]);
    assert_error_line(&out, "3/3");
    let out = autofocus(&["bench", "--config", "aff_gigantic"]);
    assert_error_line(&out, "aff_gigantic");
    for sub in ["infer", "classify", "bench", "convert"] {
        let out = autofocus(&[sub, "--help"]);
        assert!(
            out.status.success() && stdout(&out).contains("Usage"),
            "{sub} --help"
        );
    }
}

/// `grads` writes the golden case's logits and every parameter's gradient
/// (the published model's, within the spec's tolerance), and names a
/// `grad.loss_coef` of the wrong shape.
#[cfg(feature = "candle")]
#[test]
fn grads_writes_every_parameter_gradient_matching_the_golden() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = tmp(&dir, "grads.safetensors");
    let (weights, input) = (
        data("tiny-128.weights.safetensors"),
        data("tiny-128.golden.safetensors"),
    );
    let args = [
        "grads",
        "--weights",
        &weights,
        "--input",
        &input,
        "--out",
        out_path.to_str().unwrap(),
    ];
    let out = autofocus(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let case = common::Case::load("tiny-128").unwrap();
    let written = SafetensorsFile::open(&out_path).unwrap();
    let want: Vec<String> = case
        .golden_keys()
        .into_iter()
        .filter(|k| k.starts_with("grad.") && k != "grad.loss_coef")
        .chain(["logits".to_string()])
        .collect();
    let mut got = written.names();
    got.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(got, want_sorted);
    for key in &want {
        common::assert_close(key, written.tensor_f32(key).unwrap().data(), &case.f32(key));
    }

    let bad = tmp(&dir, "bad.safetensors");
    let image = case.f32("input.image");
    let tensors = [
        ("input.image".to_string(), AnyTensor::F32(image)),
        (
            "grad.loss_coef".to_string(),
            AnyTensor::F32(Tensor::new(vec![3], vec![1.0; 3]).unwrap()),
        ),
    ];
    write_safetensors(&bad, &tensors, Default::default()).unwrap();
    let bad_out = tmp(&dir, "bad-out.safetensors");
    let args = [
        "grads",
        "--weights",
        &weights,
        "--input",
        bad.to_str().unwrap(),
        "--out",
        bad_out.to_str().unwrap(),
    ];
    assert_error_line(&autofocus(&args), "grad.loss_coef");
    assert!(!bad_out.exists());
}
