//! `autofocus classify`: image files → top-k classes.

use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use autofocus::io::image::{Preprocess, load_image};
use autofocus::{Error, Result, Tensor, limits};

/// ImageNet-1k class names, one per line, in class-index order.
const IMAGENET_CLASSES: &str = include_str!("../../data/imagenet_classes.txt");

/// Arguments of `autofocus classify`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: super::ModelArgs,
    /// PNG or JPEG files.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Classes to report per image.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
    /// Resize straight to the model's size instead of resize + centre crop
    /// (default: crop, except for 384-pixel models, as published).
    #[arg(long)]
    no_crop: bool,
}

#[derive(Debug, Serialize)]
struct Prediction {
    class: usize,
    label: String,
    probability: f32,
    logit: f32,
}

#[derive(Debug, Serialize)]
struct ImageResult {
    image: String,
    top: Vec<Prediction>,
}

fn label(classes: usize, index: usize) -> String {
    if classes == 1000 {
        IMAGENET_CLASSES
            .lines()
            .nth(index)
            .unwrap_or("?")
            .to_string()
    } else {
        format!("class {index}")
    }
}

/// Top `k` of one row of logits, with softmax probabilities.
fn top_k(logits: &[f32], k: usize) -> Vec<Prediction> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order
        .into_iter()
        .take(k)
        .map(|i| Prediction {
            class: i,
            label: label(logits.len(), i),
            probability: (logits[i] - max).exp() / sum,
            logit: logits[i],
        })
        .collect()
}

pub fn run(args: Args) -> Result<()> {
    if args.batch == 0 {
        return Err(Error::InvalidArgument("--batch must be at least 1".into()));
    }
    let model = args.model.load()?;
    let runner = args.model.backend.runner(&model)?;
    let mut pre = Preprocess::for_config(model.config());
    if args.no_crop {
        pre.crop = false;
    }
    let side = pre.size;
    // The largest batch, estimated before any image is read.
    let batch = args.batch.min(args.images.len());
    let what = format!("classify --batch {}", args.batch);
    limits::check_forward_memory(&what, model.config(), model.kind(), batch, (side, side))?;
    let progress = if args.images.len() > args.batch {
        ProgressBar::new(args.images.len() as u64).with_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} images, {per_sec}, eta {eta}")
                .expect("a valid template"),
        )
    } else {
        ProgressBar::hidden()
    };
    let mut results = Vec::with_capacity(args.images.len());
    for chunk in args.images.chunks(args.batch) {
        let mut pixels = Vec::with_capacity(chunk.len() * 3 * side * side);
        for path in chunk {
            pixels.extend(load_image(path, pre)?);
        }
        let batch = Tensor::new(vec![chunk.len(), 3, side, side], pixels)?;
        let logits = runner.forward(&batch)?;
        let classes = logits.shape()[1];
        for (path, row) in chunk.iter().zip(logits.data().chunks_exact(classes)) {
            results.push(ImageResult {
                image: path.display().to_string(),
                top: top_k(row, args.top),
            });
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&results).expect("serialisable")
        );
    } else {
        for r in &results {
            println!("{}", r.image);
            for (rank, p) in r.top.iter().enumerate() {
                println!(
                    "  {}. {:6.2}%  {} ({})",
                    rank + 1,
                    100.0 * p.probability,
                    p.label,
                    p.class
                );
            }
        }
    }
    Ok(())
}
