//! `autofocus features`: a segmentation backbone's multi-scale features,
//! for a prepared batch (`--input`, one safetensors file out) or for
//! images, folders and manifests (a folder of safetensors shards and an
//! index, resumable).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use autofocus::dataset::jsonl::line_key;
use autofocus::dataset::{Decoded, Input, JsonlOutput, OutputMode};
use autofocus::io::image::{decode, normalise};
use autofocus::io::{Overwrite, write_safetensors_with};
use autofocus::ops::clustering::KeyScope;
use autofocus::{AffConfig, AnyTensor, BackboneFeatures, Error, Result, Tensor};

use super::dataset::{DatasetArgs, Plan, Progress, Remaining, Tally, run_models};
use super::device::Runner;

/// Arguments of `autofocus features`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: super::ModelArgs,
    #[command(flatten)]
    dataset: DatasetArgs,
    /// Instead of images: a safetensors file holding `input.image`
    /// (b×3×H×W f32, already normalised); `--out` is then one file.
    #[arg(long, conflicts_with_all = ["images", "manifest"])]
    input: Option<PathBuf>,
    /// With `--input`: the file to write `res2..res5`, `res2_pos..res5_pos`
    /// and `spatial_shape` to. With images: a folder for the shards
    /// (`features-NNNNN.safetensors`, tensors `ID/res2`, …) and
    /// `index.jsonl` (each input's shard, or its error).
    #[arg(long)]
    out: PathBuf,
    /// Images per shard file, at most (a killed run redoes the shard it
    /// was filling).
    #[arg(long, default_value_t = 64)]
    shard_size: usize,
}

/// One image's features, as named tensors (`res2`, …, `spatial_shape`).
type ImageFeatures = Vec<(String, AnyTensor)>;

/// Splits a batch's features into one list of tensors per image.
fn per_image(features: &BackboneFeatures) -> Result<Vec<ImageFeatures>> {
    let batch = features.stages.first().map_or(0, |t| t.batch);
    let (h, w) = features.grid;
    (0..batch)
        .map(|img| {
            let mut tensors: ImageFeatures = Vec::new();
            for (s, t) in features.stages.iter().enumerate() {
                let (n, c) = (t.tokens, t.channels);
                let feat = t.feat[img * n * c..(img + 1) * n * c].to_vec();
                let pos = t.pos[img * n * 2..(img + 1) * n * 2].to_vec();
                tensors.push((
                    format!("res{}", s + 2),
                    Tensor::new(vec![n, c], feat)?.into(),
                ));
                tensors.push((
                    format!("res{}_pos", s + 2),
                    Tensor::new(vec![n, 2], pos)?.into(),
                ));
            }
            tensors.push((
                "spatial_shape".into(),
                Tensor::new(vec![2], vec![h as i32, w as i32])?.into(),
            ));
            Ok(tensors)
        })
        .collect()
}

pub fn run(args: Args) -> Result<()> {
    match &args.input {
        Some(input) => run_prepared(&args, input),
        None => run_dataset(&args),
    }
}

/// `--input`: one prepared batch, clustered as the published model does.
fn run_prepared(args: &Args, input: &Path) -> Result<()> {
    let force = args.dataset.force;
    super::check_output(&args.out, &[&args.model.weights, input], force)?;
    let model = args.model.load(KeyScope::Batch)?;
    let images = super::read_input_image(input)?;
    let features = args.model.backend.runner(&model)?.features(&images)?;
    let mut tensors: Vec<(String, AnyTensor)> = Vec::new();
    for (s, t) in features.stages.iter().enumerate() {
        let (b, n, c) = (t.batch, t.tokens, t.channels);
        tensors.push((
            format!("res{}", s + 2),
            Tensor::new(vec![b, n, c], t.feat.clone())?.into(),
        ));
        tensors.push((
            format!("res{}_pos", s + 2),
            Tensor::new(vec![b, n, 2], t.pos.clone())?.into(),
        ));
    }
    let (h, w) = features.grid;
    tensors.push((
        "spatial_shape".into(),
        Tensor::new(vec![2], vec![h as i32, w as i32])?.into(),
    ));
    super::write_tensors(&args.out, &tensors, model.config(), force)
}

/// The shard files and index of one run (or one `--shard`) in `--out`.
struct ShardFiles {
    dir: PathBuf,
    /// `features-` or `features.I-of-N-`.
    prefix: String,
    index: PathBuf,
}

impl ShardFiles {
    fn new(dir: &Path, plan: &Plan) -> Self {
        let (prefix, index) = match plan.shard {
            Some(s) => (
                format!("features.{}-", s.tag()),
                format!("index.{}.jsonl", s.tag()),
            ),
            None => ("features-".to_string(), "index.jsonl".to_string()),
        };
        Self {
            dir: dir.to_path_buf(),
            prefix,
            index: dir.join(index),
        }
    }

    fn name(&self, number: usize) -> String {
        format!("{}{number:05}.safetensors", self.prefix)
    }

    /// The numbers of this run's shard files already in the folder.
    fn existing(&self) -> Result<Vec<usize>> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let mut numbers = Vec::new();
        for entry in entries {
            let name = entry.map_err(|e| Error::io(&self.dir, e))?.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name
                .strip_prefix(&self.prefix)
                .and_then(|rest| rest.strip_suffix(".safetensors"))
                .and_then(|n| n.parse().ok())
            {
                numbers.push(n);
            }
        }
        Ok(numbers)
    }
}

/// Images, folders and manifests: shards and an index in `--out`.
fn run_dataset(args: &Args) -> Result<()> {
    if args.shard_size == 0 {
        return Err(Error::InvalidArgument(
            "--shard-size must be at least 1".into(),
        ));
    }
    let plan = args.dataset.plan()?;
    let mode = args.dataset.mode()?;
    let out = &args.out;
    if out.is_file() {
        return Err(Error::InvalidArgument(format!(
            "{}: with images, --out is a folder (shards and index.jsonl); this is a file",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let files = ShardFiles::new(out, &plan);
    let existing = files.existing()?;
    match mode {
        OutputMode::New if !existing.is_empty() || files.index.exists() => {
            return Err(Error::InvalidArgument(format!(
                "{} holds the output of an earlier run: pass --resume to continue it or --force to start again",
                out.display()
            )));
        }
        OutputMode::Force => {
            for n in &existing {
                let path = out.join(files.name(*n));
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            }
        }
        _ => {}
    }
    let model = args.model.load(KeyScope::Image)?;
    let positions = plan.positions();
    // An index line counts only when its shard landed (shards are written
    // before their lines).
    let landed: HashSet<String> = existing.iter().map(|&n| files.name(n)).collect();
    let keep = |line: &Value| {
        Ok(line
            .get("shard")
            .and_then(Value::as_str)
            .is_some_and(|s| landed.contains(s)))
    };
    let (index, resumed) = JsonlOutput::open(&files.index, &positions, mode, &keep)?;
    let Remaining {
        positions: todo,
        paths,
        tally,
    } = plan.remaining(&resumed.done);
    let mut writer = ShardWriter {
        files,
        index,
        next_number: existing.iter().max().map_or(0, |n| n + 1),
        pending: Vec::new(),
        pending_images: 0,
        shard_size: args.shard_size,
        config: model.config().clone(),
        tally,
    };
    let decode = |path: &Path| {
        let img = decode(path)?;
        Ok(Decoded {
            height: img.height() as usize,
            width: img.width() as usize,
            pixels: normalise(&img),
        })
    };
    let worker = |runner| move |images: &Tensor| per_image(&Runner::features(&runner, images)?);
    let mut progress = Progress::new("features", paths.len());
    let result = run_models(
        &model,
        &args.model.backend,
        &args.dataset,
        &paths,
        decode,
        worker,
        |slot, result| {
            progress.inc();
            let position = todo[slot];
            writer.add(position, &plan.inputs[position], result)
        },
    );
    progress.finish();
    result?;
    writer.flush()?;
    writer.index.finish(&positions)?;
    writer.tally.report("features", progress.rate());
    Ok(())
}

/// Fills shard files of at most `shard_size` images; each shard lands
/// (atomically) before the index lines that point at it.
struct ShardWriter {
    files: ShardFiles,
    index: JsonlOutput,
    next_number: usize,
    /// Inputs since the last shard, in order, with their features (`None`:
    /// their error line is ready).
    pending: Vec<(usize, Value, Option<ImageFeatures>)>,
    pending_images: usize,
    shard_size: usize,
    config: AffConfig,
    tally: Tally,
}

impl ShardWriter {
    fn add(&mut self, position: usize, input: &Input, result: Result<ImageFeatures>) -> Result<()> {
        let mut line = input.line_fields();
        match result {
            Ok(features) => {
                self.tally.done += 1;
                self.pending_images += 1;
                self.pending
                    .push((position, Value::Object(line), Some(features)));
            }
            Err(e) => {
                self.tally.failed += 1;
                line.insert("error".into(), Value::String(e.to_string()));
                self.pending.push((position, Value::Object(line), None));
            }
        }
        if self.pending_images == self.shard_size {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the pending images' shard, then their index lines.
    fn flush(&mut self) -> Result<()> {
        let name = self.files.name(self.next_number);
        let mut tensors: Vec<(String, AnyTensor)> = Vec::new();
        for (_, line, features) in &mut self.pending {
            if let Some(features) = features.take() {
                let key = line_key(line).expect("every line names its input");
                tensors.extend(features.into_iter().map(|(n, t)| (format!("{key}/{n}"), t)));
                line["shard"] = Value::String(name.clone());
            }
        }
        if !tensors.is_empty() {
            let metadata = HashMap::from([("config".to_string(), self.config.to_json())]);
            let path = self.files.dir.join(&name);
            write_safetensors_with(&path, &tensors, metadata, Overwrite::Never)?;
            self.next_number += 1;
        }
        for (position, line, _) in std::mem::take(&mut self.pending) {
            self.index.append(position, &line)?;
        }
        self.pending_images = 0;
        Ok(())
    }
}
