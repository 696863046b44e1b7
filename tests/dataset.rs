//! Batch inference over a dataset, end to end through the binary: every
//! input accounted for once, batch- and worker-invariant predictions, a
//! killed run resumed, shards collected.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use image::{Rgb, RgbImage};

fn weights() -> String {
    common::data_dir()
        .join("tiny-128.weights.safetensors")
        .display()
        .to_string()
}

fn autofocus(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_autofocus"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A small deterministic picture: smooth colour ramps plus a few blocks.
fn picture(seed: u32, w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let v = seed.wrapping_mul(2_654_435_761).rotate_left(7);
        let block = ((x / 9 + y / 7 + v) % 5) as u8 * 30;
        Rgb([
            ((x * 255 / w) as u8).wrapping_add(block),
            ((y * 255 / h) as u8).wrapping_add((v >> 8) as u8),
            (((x + y + v) % 256) as u8) ^ block,
        ])
    })
}

/// The dataset: `images` pictures of four sizes (PNG and JPEG) in nested
/// folders, plus corrupt images and non-image files.
struct Dataset {
    _dir: tempfile::TempDir,
    root: PathBuf,
    images: usize,
    corrupt: usize,
    other: usize,
}

fn dataset(images: usize) -> Dataset {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("photos");
    let sizes = [(40, 30), (64, 64), (100, 80), (150, 120)];
    for i in 0..images {
        let folder = root
            .join(format!("part{}", i % 3))
            .join(format!("g{}", i % 5));
        std::fs::create_dir_all(&folder).unwrap();
        let (w, h) = sizes[i % sizes.len()];
        let ext = if i % 2 == 0 { "png" } else { "jpg" };
        picture(i as u32, w, h)
            .save(folder.join(format!("img{i:04}.{ext}")))
            .unwrap();
    }
    let corrupt = [
        "part0/broken.png",
        "part1/g2/truncated.png",
        "part2/empty.jpeg",
    ];
    std::fs::write(root.join(corrupt[0]), b"not a png at all").unwrap();
    let png = std::fs::read(root.join("part0/g0/img0000.png")).unwrap();
    std::fs::write(root.join(corrupt[1]), &png[..png.len() / 3]).unwrap();
    std::fs::write(root.join(corrupt[2]), b"").unwrap();
    let other = ["part0/readme.txt", "part1/labels.csv"];
    for name in other {
        std::fs::write(root.join(name), b"x").unwrap();
    }
    Dataset {
        _dir: dir,
        root,
        images,
        corrupt: corrupt.len(),
        other: other.len(),
    }
}

fn classify(data: &Dataset, out: &Path, extra: &[&str]) -> String {
    let (weights, root, out) = (
        weights(),
        data.root.display().to_string(),
        out.display().to_string(),
    );
    let mut args = vec![
        "classify",
        "--weights",
        &weights,
        &root,
        "--out",
        &out,
        "--top",
        "3",
    ];
    args.extend(extra);
    ok(&autofocus(&args))
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// One line's path and its top (class index, probability) pairs, `None`
/// for an error line.
type Prediction = (String, Option<Vec<(u64, f64)>>);

/// The predictions of every line.
fn predictions(path: &Path) -> Vec<Prediction> {
    lines(path)
        .iter()
        .map(|l| {
            let top = l.get("top").map(|top| {
                top.as_array()
                    .unwrap()
                    .iter()
                    .map(|t| (t["index"].as_u64().unwrap(), t["prob"].as_f64().unwrap()))
                    .collect()
            });
            (l["path"].as_str().unwrap().to_string(), top)
        })
        .collect()
}

fn assert_same_predictions(a: &Path, b: &Path) {
    let (a, b) = (predictions(a), predictions(b));
    assert_eq!(a.len(), b.len());
    for ((pa, ta), (pb, tb)) in a.iter().zip(&b) {
        assert_eq!(pa, pb);
        match (ta, tb) {
            (None, None) => {}
            (Some(ta), Some(tb)) => {
                for (x, y) in ta.iter().zip(tb) {
                    assert_eq!(x.0, y.0, "{pa}: classes differ");
                    assert!((x.1 - y.1).abs() <= 1e-6, "{pa}: {} vs {}", x.1, y.1);
                }
            }
            _ => panic!("{pa}: an error in one run only"),
        }
    }
}

#[test]
fn a_folder_is_classified_once_per_image_whatever_the_batch_or_workers() {
    let data = dataset(240);
    let out = data.root.parent().unwrap();
    let alone = out.join("alone.jsonl");
    let summary = classify(&data, &alone, &["--batch", "1"]);
    // Every image once, in sorted path order; corrupt files as errors;
    // other files skipped and counted.
    let got = lines(&alone);
    assert_eq!(got.len(), data.images + data.corrupt);
    let paths: Vec<&str> = got.iter().map(|l| l["path"].as_str().unwrap()).collect();
    let mut sorted = paths.clone();
    sorted.sort_unstable();
    assert_eq!(paths, sorted);
    sorted.dedup();
    assert_eq!(sorted.len(), got.len());
    let errors: Vec<&serde_json::Value> = got.iter().filter(|l| l.get("error").is_some()).collect();
    assert_eq!(errors.len(), data.corrupt);
    assert!(
        errors
            .iter()
            .all(|l| l["path"].as_str().unwrap().contains("broken")
                || l["path"].as_str().unwrap().contains("truncated")
                || l["path"].as_str().unwrap().contains("empty"))
    );
    let expected = format!(
        "{} image(s) done, {} failed, {} non-image file(s) skipped",
        data.images, data.corrupt, data.other
    );
    assert!(summary.contains(&expected), "{summary}");

    // One file at a time through the plain command agrees with its line.
    let first = got.iter().find(|l| l.get("top").is_some()).unwrap();
    let one = autofocus(&[
        "classify",
        "--weights",
        &weights(),
        first["path"].as_str().unwrap(),
        "--json",
        "--top",
        "3",
    ]);
    ok(&one);
    let printed: serde_json::Value = serde_json::from_slice(&one.stdout).unwrap();
    assert_eq!(printed[0]["top"][0]["class"], first["top"][0]["index"]);
    let p = printed[0]["top"][0]["probability"].as_f64().unwrap();
    assert!((p - first["top"][0]["prob"].as_f64().unwrap()).abs() <= 1e-6);

    for (name, extra) in [
        ("b7.jsonl", &["--batch", "7"][..]),
        ("b32.jsonl", &["--batch", "32"][..]),
        (
            "w2.jsonl",
            &["--batch", "7", "--workers", "2", "--decoders", "3"][..],
        ),
    ] {
        let path = out.join(name);
        classify(&data, &path, extra);
        assert_same_predictions(&alone, &path);
    }
    // Two workers write exactly what one writes.
    assert_eq!(
        std::fs::read(out.join("b7.jsonl")).unwrap(),
        std::fs::read(out.join("w2.jsonl")).unwrap()
    );
}

#[test]
fn a_killed_run_resumes_to_the_uninterrupted_result_and_shards_collect_to_it() {
    let data = dataset(150);
    let out = data.root.parent().unwrap();
    let whole = out.join("whole.jsonl");
    classify(&data, &whole, &["--batch", "4"]);

    // Kill a run (SIGKILL) once it has written part of its output.
    let killed = out.join("killed.jsonl");
    let mut child = Command::new(env!("CARGO_BIN_EXE_autofocus"))
        .args(["classify", "--weights", &weights()])
        .arg(&data.root)
        .arg("--out")
        .arg(&killed)
        .args(["--top", "3", "--batch", "4", "--threads", "1"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let written =
            std::fs::read(&killed).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count());
        if written >= 20 || start.elapsed() > Duration::from_secs(120) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = std::fs::read(&killed).unwrap();
    let partial_lines = partial.iter().filter(|&&c| c == b'\n').count();
    assert!(
        partial_lines >= 20 && partial_lines < data.images,
        "killed after {partial_lines} lines: too early or too late to test"
    );
    // A torn line, as a kill in the middle of a write leaves.
    let mut torn = partial.clone();
    torn.extend_from_slice(b"{\"path\":\"half");
    std::fs::write(&killed, &torn).unwrap();
    // Without --resume or --force the output is never touched.
    let refused = autofocus(&[
        "classify",
        "--weights",
        &weights(),
        data.root.to_str().unwrap(),
        "--out",
        killed.to_str().unwrap(),
    ]);
    assert!(!refused.status.success());
    assert_eq!(std::fs::read(&killed).unwrap(), torn);

    let summary = classify(&data, &killed, &["--batch", "4", "--resume"]);
    assert!(summary.contains("kept from the previous run"), "{summary}");
    assert_eq!(
        std::fs::read_to_string(&killed).unwrap(),
        std::fs::read_to_string(&whole).unwrap(),
        "resumed output differs from the uninterrupted run"
    );

    // Three shards side by side, then collect: the single run's output.
    let manifest = out.join("manifest.txt");
    let listed: Vec<String> = lines(&whole)
        .iter()
        .map(|l| l["path"].as_str().unwrap().to_string())
        .collect();
    std::fs::write(&manifest, listed.join("\n") + "\n").unwrap();
    let shard_out = out.join("preds.jsonl");
    let children: Vec<_> = (0..3)
        .map(|i| {
            Command::new(env!("CARGO_BIN_EXE_autofocus"))
                .args(["classify", "--weights", &weights(), "--manifest"])
                .arg(&manifest)
                .arg("--out")
                .arg(&shard_out)
                .args(["--top", "3", "--batch", "4", "--shard", &format!("{i}/3")])
                .output_async()
        })
        .collect();
    for child in children {
        ok(&child.wait_with_output().unwrap());
    }
    let shards: Vec<String> = (0..3)
        .map(|i| {
            out.join(format!("preds.{i}-of-3.jsonl"))
                .display()
                .to_string()
        })
        .collect();
    let merged = out.join("merged.jsonl");
    // A missing shard is named.
    let short = autofocus(&[
        "collect",
        "--manifest",
        manifest.to_str().unwrap(),
        &shards[0],
        &shards[2],
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(!short.status.success());
    assert!(String::from_utf8_lossy(&short.stderr).contains("missing"));
    assert!(!merged.exists());
    let mut args = vec!["collect", "--manifest", manifest.to_str().unwrap()];
    args.extend(shards.iter().map(String::as_str));
    args.extend(["--out", merged.to_str().unwrap()]);
    ok(&autofocus(&args));
    assert_eq!(
        std::fs::read_to_string(&merged).unwrap(),
        std::fs::read_to_string(&whole).unwrap()
    );
}

/// `spawn` with stdout and stderr captured.
trait SpawnCaptured {
    fn output_async(&mut self) -> std::process::Child;
}

impl SpawnCaptured for Command {
    fn output_async(&mut self) -> std::process::Child {
        self.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}
