//! What `classify` and `features` share when they run over a dataset: the
//! input list and its shard, the worker pool (one model per device), the
//! progress display and the final summary.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use autofocus::dataset::inputs::key_positions;
use autofocus::dataset::{
    BatchWorker, Decoded, Input, InputList, OutputMode, PipelineOptions, Shard, gather_inputs,
    run_pipeline,
};
use autofocus::{AutoFocusFormer, Error, Result};

use super::device::{Backend, DeviceArgs, Runner, open};

/// Inputs, sharding, resumption and pipeline sizes.
#[derive(Debug, clap::Args)]
pub struct DatasetArgs {
    /// Image files and folders (walked recursively, PNG and JPEG by
    /// extension, in sorted path order; other files are skipped).
    pub images: Vec<PathBuf>,
    /// Manifests: one path per line, or JSON lines `{"path": …, "id": …}`
    /// (repeatable; read after the images, in order).
    #[arg(long)]
    pub manifest: Vec<PathBuf>,
    /// Keep what `--out` holds, skip those inputs, retry the failures.
    #[arg(long)]
    pub resume: bool,
    /// Start `--out` again from nothing (classify: also replace `--focus`
    /// pictures).
    #[arg(long)]
    pub force: bool,
    /// Process shard I of N (0-based) of the input list and name the output
    /// `NAME.I-of-N…`; default: the Slurm array task, if any.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    /// Number of shards when the index comes from `JOB_COMPLETION_INDEX`
    /// (a Kubernetes Indexed Job).
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Decoder threads (0: a quarter of the cores on the CPU, leaving the
    /// rest to the model; every core with GPUs).
    #[arg(long, default_value_t = 0)]
    pub decoders: usize,
    /// Model workers (0: one per device named by `--device`; more than one
    /// on the CPU or emulator share its cores).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
}

/// The inputs this run processes.
pub struct Plan {
    /// Every input (sorted list, all shards).
    pub all: InputList,
    /// This shard's part of it.
    pub inputs: Vec<Input>,
    pub shard: Option<Shard>,
}

/// What a (resumed) run has left to do.
pub struct Remaining {
    /// The positions in [`Plan::inputs`] still to run, in order.
    pub positions: Vec<usize>,
    /// Their paths (the pipeline's inputs).
    pub paths: Vec<PathBuf>,
    /// The counts so far: those kept from the output, non-images skipped.
    pub tally: Tally,
}

impl Plan {
    /// Where each of this run's inputs sits, by key.
    pub fn positions(&self) -> HashMap<String, usize> {
        key_positions(&self.inputs)
    }

    /// The inputs not `done` (as [`JsonlOutput::open`] found them).
    ///
    /// [`JsonlOutput::open`]: autofocus::dataset::JsonlOutput::open
    pub fn remaining(&self, done: &[bool]) -> Remaining {
        let positions: Vec<usize> = (0..self.inputs.len()).filter(|&i| !done[i]).collect();
        let paths = positions
            .iter()
            .map(|&i| self.inputs[i].path.clone())
            .collect();
        let tally = Tally {
            kept: self.inputs.len() - positions.len(),
            skipped: self.all.skipped.len(),
            ..Tally::default()
        };
        Remaining {
            positions,
            paths,
            tally,
        }
    }
}

impl DatasetArgs {
    /// The input list and this run's shard of it.
    ///
    /// # Errors
    /// Input-list and shard errors; no input at all.
    pub fn plan(&self) -> Result<Plan> {
        if self.images.is_empty() && self.manifest.is_empty() {
            return Err(Error::InvalidArgument(
                "no inputs: give image files, folders or --manifest".into(),
            ));
        }
        let all = gather_inputs(&self.images, &self.manifest)?;
        let shard = Shard::resolve(self.shard.as_deref(), self.shards, &|name| {
            std::env::var(name).ok()
        })?;
        let range = shard.map_or(0..all.inputs.len(), |s| s.range(all.inputs.len()));
        let inputs = all.inputs[range].to_vec();
        Ok(Plan { all, inputs, shard })
    }

    /// `--resume` / `--force` as an [`OutputMode`].
    ///
    /// # Errors
    /// Both given.
    pub fn mode(&self) -> Result<OutputMode> {
        OutputMode::from_flags(self.resume, self.force)
    }

    /// Pipeline sizes for `backends`.
    fn options(&self, backends: &[Backend]) -> Result<PipelineOptions> {
        if self.batch == 0 {
            return Err(Error::InvalidArgument("--batch must be at least 1".into()));
        }
        autofocus::limits::at_most("--workers", self.workers as u64, 256)?;
        autofocus::limits::at_most("--decoders", self.decoders as u64, 1024)?;
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let on_gpu = backends.iter().any(|b| matches!(b, Backend::Cuda(_)));
        let decoders = match self.decoders {
            0 if on_gpu => cores,
            0 => (cores / 4).max(1),
            n => n,
        };
        let workers = match self.workers {
            0 => backends.len(),
            n => n,
        };
        Ok(PipelineOptions {
            batch: self.batch,
            decoders,
            workers,
        })
    }
}

/// Runs `paths` through a pool of models, one per worker (worker `i`
/// drives `--device`'s backend `i` mod their number); `worker` turns a
/// runner into what runs the batches (one result per image: a function of
/// the batch, or a [`BatchWorker`] that streams them); `sink` gets every
/// input's result in order.
pub fn run_models<'m, R: Send, W: BatchWorker<R>>(
    model: &'m AutoFocusFormer,
    device: &DeviceArgs,
    dataset: &DatasetArgs,
    paths: &[PathBuf],
    decode: impl Fn(&std::path::Path) -> Result<Decoded> + Sync,
    worker: impl Fn(Runner<'m>) -> W + Sync,
    sink: impl FnMut(usize, Result<R>) -> Result<()>,
) -> Result<()> {
    let backends = device.backends()?;
    let options = dataset.options(&backends)?;
    let make_worker = |i: usize| {
        let runner = device.runner_on(model, open(backends[i % backends.len()])?)?;
        Ok(worker(runner))
    };
    run_pipeline(paths, options, decode, make_worker, sink)
}

/// Progress on a terminal (a bar with images/s and ETA), or a plain line
/// every ten seconds otherwise (logs, batch jobs).
pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    done: u64,
    start: Instant,
    last_line: Instant,
    label: &'static str,
}

impl Progress {
    const PLAIN_EVERY: Duration = Duration::from_secs(10);

    pub fn new(label: &'static str, total: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            ProgressBar::new(total as u64).with_style(
                ProgressStyle::with_template("{bar:40} {pos}/{len} images, {per_sec}, eta {eta}")
                    .expect("a valid template"),
            )
        });
        Self {
            bar,
            total: total as u64,
            done: 0,
            start: Instant::now(),
            last_line: Instant::now(),
            label,
        }
    }

    pub fn inc(&mut self) {
        self.done += 1;
        if let Some(bar) = &self.bar {
            bar.inc(1);
        } else if self.last_line.elapsed() >= Self::PLAIN_EVERY {
            self.last_line = Instant::now();
            let rate = self.rate();
            let left = (self.total - self.done) as f64 / rate.max(1e-9);
            eprintln!(
                "{}: {}/{} images, {rate:.1} images/s, eta {:.0} s",
                self.label, self.done, self.total, left
            );
        }
    }

    /// Images per second so far.
    pub fn rate(&self) -> f64 {
        self.done as f64 / self.start.elapsed().as_secs_f64().max(1e-9)
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// What a dataset run did, for its summary line.
#[derive(Debug, Default)]
pub struct Tally {
    pub done: usize,
    pub failed: usize,
    /// Kept from the output being resumed.
    pub kept: usize,
    /// Non-image files passed over in folders.
    pub skipped: usize,
}

impl Tally {
    /// The final summary line, on stderr.
    pub fn report(&self, label: &str, rate: f64) {
        let mut line = format!(
            "{label}: {} image(s) done, {} failed, {} non-image file(s) skipped",
            self.done, self.failed, self.skipped
        );
        if self.kept > 0 {
            line.push_str(&format!(", {} kept from the previous run", self.kept));
        }
        line.push_str(&format!(", {rate:.1} images/s"));
        eprintln!("{line}");
    }
}
