//! `autofocus bench`: time the model on random weights and inputs.

use std::time::Instant;

use serde::Serialize;

use autofocus::{AffConfig, AutoFocusFormer, Error, ModelKind, Result, Tensor, limits, profile};

/// Arguments of `autofocus bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Preset name, JSON, or JSON file.
    #[arg(long)]
    config: String,
    /// Images per forward pass.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Input side in pixels (default: the config's `img_size`).
    #[arg(long)]
    size: Option<usize>,
    /// Timed forward passes.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Untimed forward passes first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[command(flatten)]
    backend: super::device::DeviceArgs,
    /// Print only the JSON line.
    #[arg(long)]
    json: bool,
    /// Also report the time spent in each op (adds a little overhead).
    #[arg(long)]
    profile: bool,
    /// On a GPU, launch every kernel of every forward instead of replaying
    /// one CUDA graph per input shape (to compare).
    #[arg(long)]
    no_graph: bool,
    /// On a device, run the timed forwards as one stream of batches
    /// (`DeviceModel::forward_stream`): the next batch's upload and the
    /// last one's read-back overlap the kernels, from page-locked memory on
    /// a second stream. Times the whole stream, per batch.
    #[arg(long)]
    overlap: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    config: String,
    batch: usize,
    size: usize,
    device: String,
    dtype: String,
    /// Dense layers: `cpu` (the gemm crate), `simt` (this crate's CUDA
    /// GEMM) or `cublaslt` (tensor cores; `AUTOFOCUS_GEMM` chooses).
    gemm: &'static str,
    /// Whether the timed forwards replayed a CUDA graph.
    cuda_graph: bool,
    /// Whether the timed forwards ran as one overlapped stream (`--overlap`;
    /// then `ms_per_batch` is the stream's time per batch, and its min too).
    overlapped: bool,
    threads: usize,
    iters: usize,
    ms_per_batch: f64,
    ms_per_batch_min: f64,
    images_per_s: f64,
    peak_rss_mib: Option<f64>,
    /// On a device: kernel launches, library GEMMs, zero fills,
    /// allocations and copies per forward.
    #[serde(skip_serializing_if = "Option::is_none")]
    per_forward: Option<autofocus::gpu::counts::DeviceCounts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ops: Option<Vec<profile::OpTime>>,
}

/// Peak resident memory of this process (Linux), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub fn run(args: Args) -> Result<()> {
    if args.profile && args.backend.device()?.is_some() {
        // On a device each op synchronises at its end, so it times the op's
        // work rather than its launch; the total runs a little slower.
        eprintln!("profiling on a device: every op synchronises");
    }
    if args.batch == 0 || args.iters == 0 {
        return Err(Error::InvalidArgument(
            "--batch and --iters must be at least 1".into(),
        ));
    }
    super::set_threads(args.threads)?;
    let config = AffConfig::resolve(&args.config)?;
    let size = args.size.unwrap_or(config.img_size);
    if size == 0 {
        return Err(Error::InvalidArgument("--size must be at least 1".into()));
    }
    limits::at_most("--size", size as u64, limits::MAX_IMAGE_SIDE as u64)?;
    // Everything the run will hold, estimated before anything is allocated.
    let what = format!("bench --batch {} --size {size}", args.batch);
    limits::check_forward_memory(
        &what,
        &config,
        ModelKind::Classifier,
        args.batch,
        (size, size),
    )?;
    let model = AutoFocusFormer::random(config, ModelKind::Classifier, 0)?;
    // A smooth, deterministic pseudo-image: varied enough to exercise selection.
    let numel = args.batch * 3 * size * size;
    let pixels = (0..numel)
        .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 2.0 + ((i / size) as f32 * 0.01).sin())
        .collect();
    let images = Tensor::new(vec![args.batch, 3, size, size], pixels)?;
    let mut runner = args.backend.runner(&model)?;
    if args.overlap && runner.device().is_none() {
        return Err(Error::InvalidArgument(
            "--overlap overlaps a device's copies with its kernels: give --device emulator or cuda"
                .into(),
        ));
    }
    runner.set_graphs(!args.no_graph);
    for _ in 0..args.warmup {
        runner.forward(&images)?;
    }
    profile::set_enabled(args.profile);
    let counts_before = runner.device().map(|d| d.counts());
    let replays_before = runner.graph_replays();
    let mut times = Vec::with_capacity(args.iters);
    if args.overlap {
        let start = Instant::now();
        runner.forward_stream((0..args.iters).map(|_| Ok(Some(&images))), |_| Ok(()))?;
        let ms = start.elapsed().as_secs_f64() * 1e3 / args.iters as f64;
        if !args.json {
            eprintln!("stream of {} batches: {ms:.2} ms per batch", args.iters);
        }
        times.push(ms);
    } else {
        for i in 0..args.iters {
            let start = Instant::now();
            runner.forward(&images)?;
            let ms = start.elapsed().as_secs_f64() * 1e3;
            if !args.json {
                eprintln!("iter {i}: {ms:.2} ms");
            }
            times.push(ms);
        }
    }
    let per_forward = runner
        .device()
        .zip(counts_before)
        .map(|(d, before)| (d.counts() - before).per(args.iters as u64));
    let ops = args.profile.then(|| {
        let mut ops = profile::take();
        for op in &mut ops {
            op.ms /= args.iters as f64;
        }
        ops
    });
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let report = Report {
        config: args.config,
        batch: args.batch,
        size,
        gemm: runner.gemm()?,
        cuda_graph: runner.graph_replays() > replays_before,
        overlapped: args.overlap,
        device: runner.name(),
        dtype: args.backend.dtype.clone(),
        threads: rayon::current_num_threads(),
        iters: args.iters,
        ms_per_batch: median,
        ms_per_batch_min: times[0],
        images_per_s: args.batch as f64 * 1e3 / median,
        peak_rss_mib: peak_rss_mib(),
        per_forward,
        ops,
    };
    if let (Some(ops), false) = (&report.ops, args.json) {
        let total: f64 = ops.iter().map(|o| o.ms).sum();
        eprintln!("{:<26} {:>9} {:>7}", "op (per forward)", "ms", "share");
        for op in ops {
            eprintln!(
                "{:<26} {:>9.3} {:>6.1}%",
                op.op,
                op.ms,
                100.0 * op.ms / total
            );
        }
    }
    println!("{}", serde_json::to_string(&report).expect("serialisable"));
    Ok(())
}
