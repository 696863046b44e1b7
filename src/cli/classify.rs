//! `autofocus classify`: image files, folders and manifests → top-k
//! classes, printed or as resumable JSON lines.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use serde_json::{Value, json};

use autofocus::dataset::{BatchWorker, Decoded, Input, JsonlOutput, OutputMode};
use autofocus::io::SafetensorsFile;
use autofocus::io::image::{Preprocess, load_image};
use autofocus::ops::clustering::KeyScope;
use autofocus::{Error, Result, Tensor, limits};

use super::dataset::{DatasetArgs, Plan, Progress, Remaining, run_models};
use super::device::Runner;

/// ImageNet-1k class names, one per line, in class-index order.
const IMAGENET_CLASSES: &str = include_str!("../../data/imagenet_classes.txt");

/// Arguments of `autofocus classify`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: super::ModelArgs,
    #[command(flatten)]
    dataset: DatasetArgs,
    /// Write one JSON line per input here (`path`, `id`, and `top` or
    /// `error`), appended as results come, instead of printing.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Classes to report per image.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Print one JSON document instead of text (without `--out`).
    #[arg(long, conflicts_with = "out")]
    json: bool,
    /// Resize straight to the model's size instead of resize + centre crop
    /// (default: crop, except for 384-pixel models, as published).
    #[arg(long)]
    no_crop: bool,
    /// Also draw where the model kept its tokens, one picture per image:
    /// `DIR/<file stem>.focus.png` (as `autofocus focus`). With `--force`,
    /// pictures already there are replaced.
    #[arg(long, value_name = "DIR")]
    focus: Option<PathBuf>,
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

/// Safetensors metadata key of a checkpoint's class names (a JSON array of
/// strings, one per class, in class-index order).
const CLASS_NAMES_KEY: &str = "class_names";

/// The names of the `classes` classes of the checkpoint at `weights`: its
/// `class_names` metadata when it has some, else ImageNet's for 1000
/// classes, else `class <i>`.
///
/// # Errors
/// Unreadable weights; `class_names` that is not a JSON array of `classes`
/// strings (naming the file).
fn class_names(weights: &Path, classes: usize) -> Result<Vec<String>> {
    let stored = if autofocus::io::pth::looks_like_zip(weights)? {
        None
    } else {
        SafetensorsFile::open(weights)?
            .metadata(CLASS_NAMES_KEY)
            .map(str::to_string)
    };
    if let Some(json) = stored {
        let names: Vec<String> = serde_json::from_str(&json).map_err(|e| Error::Format {
            path: weights.to_path_buf(),
            reason: format!("metadata `{CLASS_NAMES_KEY}` is not a JSON array of strings: {e}"),
        })?;
        if names.len() != classes {
            return Err(Error::Format {
                path: weights.to_path_buf(),
                reason: format!(
                    "metadata `{CLASS_NAMES_KEY}` names {} classes, the model has {classes}",
                    names.len()
                ),
            });
        }
        return Ok(names);
    }
    Ok(if classes == 1000 {
        IMAGENET_CLASSES.lines().map(str::to_string).collect()
    } else {
        (0..classes).map(|i| format!("class {i}")).collect()
    })
}

/// Top `k` of one row of logits, with softmax probabilities.
fn top_k(logits: &[f32], k: usize, names: &[String]) -> Vec<Prediction> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order
        .into_iter()
        .take(k)
        .map(|i| Prediction {
            class: i,
            label: names.get(i).cloned().unwrap_or_else(|| "?".into()),
            probability: (logits[i] - max).exp() / sum,
            logit: logits[i],
        })
        .collect()
}

/// One `--out` line: the input and its top classes.
fn success_line(input: &Input, logits: &[f32], k: usize, names: &[String]) -> Value {
    let top: Vec<Value> = top_k(logits, k, names)
        .into_iter()
        .map(|p| json!({"class": p.label, "index": p.class, "prob": p.probability}))
        .collect();
    let mut line = input.line_fields();
    line.insert("top".into(), Value::Array(top));
    Value::Object(line)
}

/// One `--out` line for an input that could not be classified.
fn error_line(input: &Input, error: &Error) -> Value {
    let mut line = input.line_fields();
    line.insert("error".into(), Value::String(error.to_string()));
    Value::Object(line)
}

pub fn run(args: Args) -> Result<()> {
    let plan = args.dataset.plan()?;
    let mode = args.dataset.mode()?;
    let out = args
        .out
        .as_ref()
        .map(|o| plan.shard.map_or_else(|| o.clone(), |s| s.output_name(o)));
    if let Some(out) = &out {
        let mut inputs: Vec<&Path> = vec![&args.model.weights];
        // Only inputs of the same file name can be the output (a million
        // inputs need not each be resolved).
        inputs.extend(
            plan.inputs
                .iter()
                .map(|i| i.path.as_path())
                .filter(|p| p.file_name() == out.file_name()),
        );
        inputs.extend(args.dataset.manifest.iter().map(PathBuf::as_path));
        if mode == OutputMode::New && out.symlink_metadata().is_ok() {
            return Err(Error::InvalidArgument(format!(
                "{} exists: pass --resume to continue it or --force to start again",
                out.display()
            )));
        }
        // Resuming appends to it: only a fresh run needs it absent.
        let replace = mode != OutputMode::New;
        super::check_output(out, &inputs, replace)?;
    } else if mode == OutputMode::Resume || (mode == OutputMode::Force && args.focus.is_none()) {
        return Err(Error::InvalidArgument(
            "--resume applies to --out, --force to --out and --focus".into(),
        ));
    }
    let focus = args
        .focus
        .as_deref()
        .map(|dir| focus_destinations(dir, &plan, &args.model.weights, args.dataset.force))
        .transpose()?;
    let model = args.model.load(KeyScope::Image)?;
    let names = class_names(&args.model.weights, model.config().num_classes)?;
    let mut pre = Preprocess::for_config(model.config());
    if args.no_crop {
        pre.crop = false;
    }
    let side = pre.size;
    let what = format!("classify --batch {}", args.dataset.batch);
    let batch = args.dataset.batch.min(plan.inputs.len()).max(1);
    limits::check_forward_memory(&what, model.config(), model.kind(), batch, (side, side))?;
    let decode = |path: &Path| {
        load_image(path, pre).map(|pixels| Decoded {
            height: side,
            width: side,
            pixels,
        })
    };
    match out {
        Some(out) => run_to_file(&args, &plan, &out, mode, &model, &names, decode)?,
        None => run_to_terminal(&args, &plan, &model, &names, decode)?,
    }
    match focus {
        Some(pictures) => write_focus_pictures(&model, pre, &pictures, args.dataset.force),
        None => Ok(()),
    }
}

/// `--focus DIR`: (image, picture) pairs, checked before any work: one
/// picture per file stem, none already there unless `force`, none an input.
/// Creates `DIR` when missing.
fn focus_destinations(
    dir: &Path,
    plan: &Plan,
    weights: &Path,
    force: bool,
) -> Result<Vec<(PathBuf, PathBuf)>> {
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::InvalidArgument(format!("--focus {}: cannot create it: {e}", dir.display()))
    })?;
    let mut by_picture: std::collections::HashMap<PathBuf, &Path> = Default::default();
    let mut pairs = Vec::with_capacity(plan.inputs.len());
    for input in &plan.inputs {
        let stem = input.path.file_stem().unwrap_or_default().to_string_lossy();
        let picture = dir.join(format!("{stem}.focus.png"));
        if let Some(other) = by_picture.insert(picture.clone(), &input.path) {
            return Err(Error::InvalidArgument(format!(
                "--focus: {} and {} would both be drawn to {}",
                other.display(),
                input.path.display(),
                picture.display()
            )));
        }
        super::check_output(&picture, &[weights, &input.path], force)?;
        pairs.push((input.path.clone(), picture));
    }
    Ok(pairs)
}

/// Draws each image's focus picture (at the size it was classified) to its
/// destination. Images that cannot be read were already reported by the
/// classification and are skipped here.
fn write_focus_pictures(
    model: &autofocus::AutoFocusFormer,
    pre: Preprocess,
    pictures: &[(PathBuf, PathBuf)],
    force: bool,
) -> Result<()> {
    for (image, picture) in pictures {
        let Ok(pixels) = load_image(image, pre) else {
            continue;
        };
        let input = Tensor::new(vec![1, 3, pre.size, pre.size], pixels)?;
        let drawn = autofocus::focus::focus_picture(model, &input, false)?;
        super::focus::write_png(picture, &autofocus::focus::enlarged(drawn), force)?;
    }
    Ok(())
}

/// `--out`: lines appended as results come, resumable.
#[allow(clippy::too_many_arguments)] // the run's parts, each used once
fn run_to_file(
    args: &Args,
    plan: &Plan,
    out: &Path,
    mode: OutputMode,
    model: &autofocus::AutoFocusFormer,
    names: &[String],
    decode: impl Fn(&Path) -> Result<Decoded> + Sync,
) -> Result<()> {
    let positions = plan.positions();
    let (mut file, resumed) = JsonlOutput::open(out, &positions, mode, &|_| Ok(true))?;
    let Remaining {
        positions: todo,
        paths,
        mut tally,
    } = plan.remaining(&resumed.done);
    let mut progress = Progress::new("classify", paths.len());
    let result = run_models(
        model,
        &args.model.backend,
        &args.dataset,
        &paths,
        decode,
        Logits,
        |slot, result| {
            let position = todo[slot];
            let input = &plan.inputs[position];
            let line = match result {
                Ok(logits) => {
                    tally.done += 1;
                    success_line(input, &logits, args.top, names)
                }
                Err(e) => {
                    tally.failed += 1;
                    error_line(input, &e)
                }
            };
            progress.inc();
            file.append(position, &line)
        },
    );
    progress.finish();
    result?;
    file.finish(&positions)?;
    tally.report("classify", progress.rate());
    Ok(())
}

/// No `--out`: today's printout (text or one JSON document); an image that
/// fails makes the command fail, after the others are printed.
fn run_to_terminal(
    args: &Args,
    plan: &Plan,
    model: &autofocus::AutoFocusFormer,
    names: &[String],
    decode: impl Fn(&Path) -> Result<Decoded> + Sync,
) -> Result<()> {
    let paths: Vec<PathBuf> = plan.inputs.iter().map(|i| i.path.clone()).collect();
    let mut results = Vec::with_capacity(paths.len());
    let mut failures = Vec::new();
    let mut progress = Progress::new("classify", paths.len());
    run_models(
        model,
        &args.model.backend,
        &args.dataset,
        &paths,
        decode,
        Logits,
        |slot, result| {
            match result {
                Ok(logits) => results.push(ImageResult {
                    image: paths[slot].display().to_string(),
                    top: top_k(&logits, args.top, names),
                }),
                Err(e) => failures.push(e),
            }
            progress.inc();
            Ok(())
        },
    )?;
    progress.finish();
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
    match failures.len() {
        0 => Ok(()),
        1 => Err(failures.remove(0)),
        n => Err(Error::InvalidArgument(format!(
            "{n} of {} images failed; the first: {}",
            paths.len(),
            failures[0]
        ))),
    }
}

/// Each image's class logits, from a runner. On a device the batches
/// stream ([`Runner::forward_stream`]): the next batch is uploaded and the
/// last one's logits read back while the kernels run.
struct Logits<'m>(Runner<'m>);

impl BatchWorker<Vec<f32>> for Logits<'_> {
    fn run(&mut self, images: &Tensor) -> Result<Vec<Vec<f32>>> {
        Ok(rows(&self.0.forward(images)?))
    }

    fn run_stream(
        &mut self,
        batches: &mut dyn Iterator<Item = Option<Arc<Tensor>>>,
        each: &mut dyn FnMut(Vec<Vec<f32>>) -> Result<()>,
    ) -> Result<()> {
        self.0
            .forward_stream(batches.map(Ok), |logits| each(rows(&logits)))
    }
}

/// The rows of a batch × classes tensor.
fn rows(logits: &Tensor) -> Vec<Vec<f32>> {
    let classes = logits.shape()[1];
    logits
        .data()
        .chunks_exact(classes)
        .map(<[f32]>::to_vec)
        .collect()
}
