//! Focus pictures and the `features` and `focus` commands.

mod common;

use std::path::PathBuf;
use std::process::Command;

use autofocus::focus::{DOT, SEPARATOR, focus_picture};
use autofocus::io::SafetensorsFile;
use autofocus::io::image::{Preprocess, decode, normalise};
use autofocus::{AutoFocusFormer, Tensor, Trace, TraceLevel};
use image::RgbImage;

fn photo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/images/chelsea.png")
}

/// Connected groups (4-neighbours) of dot-coloured pixels in columns `x0..x1`.
fn count_dots(img: &RgbImage, x0: u32, x1: u32) -> usize {
    let (w, h) = (x1 - x0, img.height());
    let mut seen = vec![false; (w * h) as usize];
    let mut dots = 0;
    for y in 0..h {
        for x in 0..w {
            if seen[(y * w + x) as usize] || *img.get_pixel(x0 + x, y) != DOT {
                continue;
            }
            dots += 1;
            let mut stack = vec![(x, y)];
            seen[(y * w + x) as usize] = true;
            while let Some((px, py)) = stack.pop() {
                let around = [
                    (px.wrapping_sub(1), py),
                    (px + 1, py),
                    (px, py.wrapping_sub(1)),
                    (px, py + 1),
                ];
                for (nx, ny) in around {
                    if nx < w
                        && ny < h
                        && !seen[(ny * w + nx) as usize]
                        && *img.get_pixel(x0 + nx, ny) == DOT
                    {
                        seen[(ny * w + nx) as usize] = true;
                        stack.push((nx, ny));
                    }
                }
            }
        }
    }
    dots
}

/// Tokens entering each stage after the first, from a traced run.
fn token_counts(model: &AutoFocusFormer, image: &Tensor) -> Vec<usize> {
    let mut trace = Trace::new(TraceLevel::All);
    let (tokens, grid) = model.embed(image, Some(&mut trace)).unwrap();
    model.run_stages(tokens, grid, Some(&mut trace)).unwrap();
    (1..model.config().num_stages())
        .map(|s| trace.f32(&format!("stage{s}.in.pos")).unwrap().shape()[1])
        .collect()
}

#[test]
fn each_panel_shows_one_dot_per_surviving_token() {
    let model = AutoFocusFormer::load(
        common::data_dir().join("tiny-128.weights.safetensors"),
        None,
    )
    .unwrap();
    let img = Preprocess::for_config(model.config())
        .apply(&decode(&photo()).unwrap())
        .unwrap();
    let input = Tensor::new(vec![1, 3, 128, 128], normalise(&img)).unwrap();
    let counts = token_counts(&model, &input);
    assert_eq!(counts.len(), 3);
    for heatmap in [false, true] {
        let picture = focus_picture(&model, &input, heatmap).unwrap();
        assert_eq!(picture.dimensions(), (3 * 128 + 2 * SEPARATOR, 128));
        for (p, &want) in counts.iter().enumerate() {
            let x0 = p as u32 * (128 + SEPARATOR);
            assert_eq!(
                count_dots(&picture, x0, x0 + 128),
                want,
                "panel {p}, heat map {heatmap}"
            );
        }
    }
}

#[test]
fn the_focus_command_writes_a_png_and_keeps_existing_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("focus.png");
    let weights = common::data_dir().join("seg-tiny-130x190.weights.safetensors");
    let run = |extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_autofocus"));
        cmd.args(["focus", "--weights"])
            .arg(&weights)
            .arg(photo())
            .arg("--out")
            .arg(&out)
            .args(extra);
        cmd.output().unwrap()
    };
    let first = run(&["--heatmap"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let picture = image::open(&out).unwrap().to_rgb8();
    // A backbone sees the whole 451×300 photo, padded to 452×300.
    assert_eq!(picture.dimensions(), (3 * 452 + 2 * SEPARATOR, 300));
    let second = run(&[]);
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("--force"));
    // --force replaces the picture in one step, leaving nothing beside it.
    let third = run(&["--force"]);
    assert!(third.status.success());
    let replaced = image::open(&out).unwrap().to_rgb8();
    assert_ne!(replaced, picture, "no heat map now");
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1, "a temporary was left behind");
}

#[test]
fn the_features_command_writes_the_golden_names() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("feats.safetensors");
    let weights = common::data_dir().join("seg-tiny-130x190.weights.safetensors");
    let golden = common::data_dir().join("seg-tiny-130x190.golden.safetensors");
    let status = Command::new(env!("CARGO_BIN_EXE_autofocus"))
        .args(["features", "--weights"])
        .arg(&weights)
        .arg("--input")
        .arg(&golden)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let (got, want) = (
        SafetensorsFile::open(&out).unwrap(),
        SafetensorsFile::open(&golden).unwrap(),
    );
    for s in 2..6 {
        let key = format!("res{s}");
        common::assert_close(
            &key,
            got.tensor_f32(&key).unwrap().data(),
            &want.tensor_f32(&key).unwrap(),
        );
        let key = format!("res{s}_pos");
        assert_eq!(
            got.tensor_f32(&key).unwrap(),
            want.tensor_f32(&key).unwrap()
        );
    }
    assert_eq!(
        got.tensor_i32("spatial_shape").unwrap(),
        want.tensor_i32("spatial_shape").unwrap()
    );

    // From image files (two sizes, so two batches): a folder of shards and
    // an index; each image's features are what it gets alone.
    let images = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/images");
    let run = |out: &std::path::Path, files: &[&str], extra: &[&str]| {
        let status = Command::new(env!("CARGO_BIN_EXE_autofocus"))
            .args(["features", "--weights"])
            .arg(&weights)
            .args(files.iter().map(|f| images.join(f)))
            .arg("--out")
            .arg(out)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
    };
    let both = dir.path().join("both");
    run(
        &both,
        &["chelsea.png", "coffee.png"],
        &["--shard-size", "1"],
    );
    let index = std::fs::read_to_string(both.join("index.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = index
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{index}");
    assert_eq!(lines[0]["shard"], "features-00000.safetensors");
    assert_eq!(lines[1]["shard"], "features-00001.safetensors");
    let alone = dir.path().join("alone");
    run(&alone, &["chelsea.png"], &[]);
    let key = lines[0]["path"].as_str().unwrap();
    let (got, want) = (
        SafetensorsFile::open(both.join("features-00000.safetensors")).unwrap(),
        SafetensorsFile::open(alone.join("features-00000.safetensors")).unwrap(),
    );
    assert_eq!(
        want.tensor_i32(&format!("{key}/spatial_shape"))
            .unwrap()
            .data(),
        &[75, 113]
    );
    for name in ["res2", "res3_pos", "res5"] {
        let name = format!("{key}/{name}");
        assert_eq!(
            got.tensor_f32(&name).unwrap(),
            want.tensor_f32(&name).unwrap(),
            "{name}"
        );
    }
    // An existing output is kept unless --resume or --force says otherwise.
    let again = Command::new(env!("CARGO_BIN_EXE_autofocus"))
        .args(["features", "--weights"])
        .arg(&weights)
        .arg(images.join("chelsea.png"))
        .arg("--out")
        .arg(&alone)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
    run(&alone, &["chelsea.png"], &["--resume"]);
    assert_eq!(std::fs::read_dir(&alone).unwrap().count(), 2);
}
