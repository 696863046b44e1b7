//! Trains a small AutoFocusFormer from scratch, in candle with this crate's
//! ops, on a task that hangs on small details (see `scenes.rs`): which kind
//! of small shape an image holds. Then reports held-out accuracy and where
//! the model focuses: the fraction of stage-2 and stage-3 tokens inside the
//! shapes' boxes against the fraction of the image those boxes cover.
//!
//! ```sh
//! cargo run --release --features candle --example train_small_objects -- \
//!     --out target/small-objects.safetensors --samples target/small-objects
//! ```
//!
//! A transformer from scratch does not find 6–12 px shapes on its own in a
//! few minutes: it stays at chance. So the shapes start at 16–24 px and
//! shrink to the task's size over the first half of the steps (a
//! curriculum), and the learning rate warms up, then follows a cosine.
//! Everything is counted in steps, with fixed seeds, so the same command
//! gives the same model; `--minutes` only caps the time.

mod scenes;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use autofocus::candle::{AutoFocusFormer, varmap_of};
use autofocus::io::{Overwrite, write_safetensors_with};
use autofocus::model::ModelWeights;
use autofocus::{AffConfig, AnyTensor, ModelKind, Tensor as HostTensor};
use candle_core::{D, DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use scenes::{KINDS, Rng, Scene, TASK_SIDES, box_area_fraction, in_boxes, normalise, scene};

/// Image side in pixels: a 16×16 stage-0 grid.
const SIZE: usize = 64;

#[derive(Debug, Parser)]
struct Args {
    /// Training steps: the length of the schedule.
    #[arg(long, default_value_t = 1200)]
    steps: usize,
    /// Stop after this many minutes even before the last step.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Fraction of the steps over which the shapes shrink to the task's size.
    #[arg(long, default_value_t = 0.5)]
    shrink: f64,
    /// Images per step.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Peak learning rate of AdamW.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Train on a fixed set of this many scenes, cycled (default: a fresh
    /// batch every step).
    #[arg(long)]
    train_images: Option<usize>,
    /// Held-out images.
    #[arg(long, default_value_t = 256)]
    held_out: usize,
    /// Where to write the trained weights (safetensors, with its config).
    #[arg(long, default_value = "target/small-objects.safetensors")]
    out: PathBuf,
    /// Also write the first held-out images of each kind into this folder,
    /// as `<kind>-<i>.png`.
    #[arg(long)]
    samples: Option<PathBuf>,
    /// Replace `--out` if it exists.
    #[arg(long)]
    force: bool,
}

/// A small AFF: four stages of 256 → 64 → 16 → 4 tokens.
fn config() -> AffConfig {
    AffConfig {
        num_classes: KINDS.len(),
        embed_dim: vec![32, 64, 96, 128],
        depths: vec![1, 1, 2, 1],
        num_heads: vec![2, 2, 4, 4],
        mlp_ratio: 2.0,
        cluster_size: 8,
        nbhd_size: vec![48, 48, 48, 49],
        alpha: 4.0,
        ds_rate: 0.25,
        layer_scale: 0.0,
        img_size: SIZE,
    }
}

/// Shape sizes and learning rate per step.
struct Schedule {
    steps: usize,
    shrink_steps: usize,
    warmup_steps: usize,
    peak_lr: f64,
}

impl Schedule {
    /// Shape sides at the start of training, pixels.
    const START_SIDES: (f32, f32) = (16.0, 24.0);

    /// Shape sides for `step`: from `START_SIDES` down to the task's,
    /// linearly over `shrink_steps`, then the task's.
    fn sides(&self, step: usize) -> (f32, f32) {
        let t = (step as f32 / self.shrink_steps.max(1) as f32).min(1.0);
        let lerp = |a: f32, b: f32| a + (b - a) * t;
        (
            lerp(Self::START_SIDES.0, TASK_SIDES.0),
            lerp(Self::START_SIDES.1, TASK_SIDES.1),
        )
    }

    /// Linear warm-up, then a cosine down to a tenth of the peak.
    fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let floor = 0.1 * self.peak_lr;
        floor + (self.peak_lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// A batch of scenes as normalised images (b×3×S×S) and labels.
fn batch_tensors<S: std::borrow::Borrow<Scene>>(
    scenes: &[S],
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let pixels: Vec<f32> = scenes
        .iter()
        .flat_map(|s| normalise(&s.borrow().image, SIZE))
        .collect();
    let images = Tensor::from_vec(pixels, (scenes.len(), 3, SIZE, SIZE), device)?;
    let labels: Vec<u32> = scenes.iter().map(|s| s.borrow().label as u32).collect();
    Ok((images, Tensor::new(labels, device)?))
}

fn correct(logits: &Tensor, labels: &Tensor) -> candle_core::Result<usize> {
    let hits = logits
        .argmax(D::Minus1)?
        .eq(labels)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok(hits as usize)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    autofocus::io::output::check_destination(&args.out, &[], Overwrite::when(args.force))?;
    if let Some(dir) = &args.samples {
        // Refused now rather than after the training.
        for name in KINDS {
            for i in 0..SAMPLES_PER_KIND {
                let path = sample_path(dir, name, i);
                if path.exists() && !args.force {
                    return Err(
                        format!("{} exists: pass --force to overwrite it", path.display()).into(),
                    );
                }
            }
        }
    }
    let device = Device::Cpu;
    let config = config();
    // Seeded initial parameters from the crate's reproducible generator
    // (linear layers fan-in uniform, as PyTorch's default; norms near 1):
    // candle's CPU generator takes no seed.
    let varmap = varmap_of(
        ModelWeights::random_tensors(&config, ModelKind::Classifier, 7),
        DType::F32,
        &device,
    )?;
    let model =
        AutoFocusFormer::from_varmap(&config, ModelKind::Classifier, &varmap, DType::F32, &device)?;
    let params = ParamsAdamW {
        lr: args.lr,
        weight_decay: 0.05,
        ..Default::default()
    };
    let mut opt = AdamW::new(varmap.all_vars(), params)?;

    let mut held_rng = Rng(0x5eed_0001);
    let held_out: Vec<Scene> = (0..args.held_out)
        .map(|_| scene(&mut held_rng, SIZE, TASK_SIDES))
        .collect();
    let mut train_rng = Rng(0x5eed_0002);
    let pool: Option<Vec<Scene>> = args.train_images.map(|n| {
        (0..n.max(1))
            .map(|_| scene(&mut train_rng, SIZE, TASK_SIDES))
            .collect()
    });
    let schedule = Schedule {
        steps: args.steps,
        shrink_steps: (args.shrink * args.steps as f64).round() as usize,
        warmup_steps: 30.min(args.steps / 10).max(1),
        peak_lr: args.lr,
    };

    let budget = Duration::from_secs_f64(args.minutes * 60.0);
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(ProgressStyle::with_template(
        "{elapsed_precise} [{bar:30}] {pos}/{len} steps {msg}",
    )?);
    let start = Instant::now();
    let (mut step, mut first_loss, mut recent) = (0usize, None, Vec::new());
    let (mut seen, mut hits) = (0usize, 0usize);
    while step < args.steps && start.elapsed() < budget {
        let (images, labels) = match &pool {
            None => {
                let sides = schedule.sides(step);
                let scenes: Vec<Scene> = (0..args.batch)
                    .map(|_| scene(&mut train_rng, SIZE, sides))
                    .collect();
                batch_tensors(&scenes, &device)?
            }
            Some(pool) => {
                let picks: Vec<&Scene> = (0..args.batch)
                    .map(|k| &pool[(step * args.batch + k) % pool.len()])
                    .collect();
                batch_tensors(&picks, &device)?
            }
        };
        opt.set_learning_rate(schedule.lr(step));
        let logits = model.forward(&images)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        opt.backward_step(&loss)?;
        let loss = loss.to_scalar::<f32>()?;
        first_loss.get_or_insert(loss);
        recent.push(loss);
        if recent.len() > 20 {
            recent.remove(0);
        }
        seen += args.batch;
        hits += correct(&logits, &labels)?;
        step += 1;
        if step.is_multiple_of(10) {
            let mean = recent.iter().sum::<f32>() / recent.len() as f32;
            let sides = schedule.sides(step);
            let status = format!(
                "loss {mean:.3} (last 20), train accuracy {:.1}% (last 10 steps), shapes {:.0}-{:.0} px",
                100.0 * hits as f32 / seen as f32,
                sides.0,
                sides.1
            );
            // A log line now and then, also where the bar is hidden (no terminal).
            if step.is_multiple_of(50) {
                bar.suspend(|| {
                    eprintln!(
                        "{:>6.1} s  step {step}: {status}",
                        start.elapsed().as_secs_f64()
                    )
                });
            }
            bar.set_message(status);
            (seen, hits) = (0, 0);
        }
        bar.set_position(step as u64);
    }
    bar.finish();
    let last_loss = recent.iter().sum::<f32>() / recent.len().max(1) as f32;
    println!(
        "trained {step} steps of {} images in {:.1} min: loss {:.3} → {last_loss:.3} (mean of the last {})",
        args.batch,
        start.elapsed().as_secs_f64() / 60.0,
        first_loss.unwrap_or(f32::NAN),
        recent.len()
    );

    // Held-out accuracy, and where the kept tokens are.
    let mut right = 0;
    let stages = config.num_stages();
    let mut token_in = vec![0usize; stages];
    let mut token_all = vec![0usize; stages];
    let mut area = 0.0f64;
    for chunk in held_out.chunks(32) {
        let (images, labels) = batch_tensors(chunk, &device)?;
        right += correct(&model.forward(&images)?, &labels)?;
        let (_, outputs) = model.forward_stages(&images)?;
        for (s, out) in outputs.iter().enumerate() {
            let n = out.before_merge.pos.len() / 2 / chunk.len();
            for (img, sc) in chunk.iter().enumerate() {
                for t in 0..n {
                    let p = &out.before_merge.pos[(img * n + t) * 2..];
                    // A stage-0 token covers 4×4 pixels; test its centre.
                    let (x, y) = (p[0] * 4.0 + 2.0, p[1] * 4.0 + 2.0);
                    token_in[s] += usize::from(in_boxes(&sc.boxes, x, y));
                }
                token_all[s] += n;
            }
        }
        area += chunk
            .iter()
            .map(|s| f64::from(box_area_fraction(&s.boxes, SIZE)))
            .sum::<f64>();
    }
    let area = area / held_out.len() as f64;
    println!(
        "held-out accuracy: {right}/{} = {:.1}% (chance {:.1}%)",
        held_out.len(),
        100.0 * right as f64 / held_out.len() as f64,
        100.0 / KINDS.len() as f64
    );
    println!("shape boxes cover {:.2}% of the image", 100.0 * area);
    for s in 0..stages {
        let frac = token_in[s] as f64 / token_all[s] as f64;
        println!(
            "stage {s}: {:.2}% of {} tokens inside the boxes: focus ratio {:.2}",
            100.0 * frac,
            token_all[s] / held_out.len(),
            frac / area
        );
    }

    save(&varmap, &config, &args)?;
    if let Some(dir) = &args.samples {
        std::fs::create_dir_all(dir)?;
        for (kind, name) in KINDS.iter().enumerate() {
            let firsts = held_out
                .iter()
                .filter(|sc| sc.label == kind)
                .take(SAMPLES_PER_KIND);
            for (i, sc) in firsts.enumerate() {
                write_png(&sample_path(dir, name, i), sc, args.force)?;
            }
        }
    }
    Ok(())
}

/// Held-out images written per kind with `--samples`.
const SAMPLES_PER_KIND: usize = 2;

/// Where `--samples` puts held-out image `i` of kind `name`.
fn sample_path(dir: &std::path::Path, name: &str, i: usize) -> PathBuf {
    dir.join(format!("{name}-{i}.png"))
}

/// Writes a scene's image as an 8-bit PNG, keeping an existing file unless
/// `force`.
fn write_png(
    path: &std::path::Path,
    sc: &Scene,
    force: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    autofocus::io::output::check_destination(path, &[], Overwrite::when(force))?;
    let rgb: Vec<u8> = (0..SIZE * SIZE)
        .flat_map(|p| (0..3).map(move |c| (c, p)))
        .map(|(c, p)| (sc.image[c * SIZE * SIZE + p] * 255.0).round() as u8)
        .collect();
    image::RgbImage::from_raw(SIZE as u32, SIZE as u32, rgb)
        .ok_or("image size")?
        .save(path)?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Writes the parameters under their state-dict names, with the config and
/// the class names (what `autofocus classify --weights` reads).
fn save(
    varmap: &VarMap,
    config: &AffConfig,
    args: &Args,
) -> Result<(), Box<dyn std::error::Error>> {
    let vars = varmap.data().lock().map_err(|_| "poisoned var map")?;
    let mut tensors: Vec<(String, AnyTensor)> = Vec::with_capacity(vars.len());
    for (name, var) in vars.iter() {
        let t = var.as_tensor();
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        tensors.push((
            name.clone(),
            HostTensor::new(t.dims().to_vec(), values)?.into(),
        ));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    // The config, and the class names `autofocus classify` prints.
    let names = serde_json::to_string(&KINDS)?;
    let metadata = HashMap::from([
        ("config".to_string(), config.to_json()),
        ("class_names".to_string(), names),
    ]);
    write_safetensors_with(&args.out, &tensors, metadata, Overwrite::when(args.force))?;
    println!("wrote {} tensors to {}", tensors.len(), args.out.display());
    Ok(())
}
