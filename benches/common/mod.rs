//! What the benchmarks share: a ratio of two timings that the machine's
//! drift cannot skew, and a reproducible input image.
// Each bench compiles this module and uses part of it.
#![allow(dead_code)]

use autofocus::Tensor;

/// A batch of `side`×`side` images with values in [-1, 1), the same on
/// every run.
pub fn image(batch: usize, side: usize) -> Tensor {
    let data = (0..batch * 3 * side * side)
        .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 2.0)
        .collect();
    Tensor::new(vec![batch, 3, side, side], data).unwrap()
}

/// Runs of the ratio below.
pub const RATIO_RUNS: usize = 41;

/// Prints the median (and range) of `second`/`first` times over
/// [`RATIO_RUNS`] alternating runs, labelled `label` (such as
/// "backward/forward"): the ratio a target is about, each pair measured
/// close together so that the machine's drift cancels (criterion's two
/// separate estimates can be minutes apart). Skipped when a filter given
/// on the command line does not occur in `name` + "/ratio".
pub fn interleaved_ratio(name: &str, label: &str, first: impl Fn(), second: impl Fn()) {
    let id = format!("{name}/ratio");
    // Criterion's arguments: `--bench`, options (those below take a value),
    // and substring filters. Profiling runs (`--profile-time`) skip this.
    const WITH_VALUE: &[&str] = &[
        "--profile-time",
        "--sample-size",
        "--warm-up-time",
        "--measurement-time",
        "--save-baseline",
        "--baseline",
        "--load-baseline",
        "--noise-threshold",
        "--output-format",
        "--color",
    ];
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--profile-time") {
        return;
    }
    let filters: Vec<&String> = args
        .iter()
        .enumerate()
        .filter(|&(k, a)| {
            !a.starts_with('-') && (k == 0 || !WITH_VALUE.contains(&args[k - 1].as_str()))
        })
        .map(|(_, a)| a)
        .collect();
    if !filters.is_empty() && !filters.iter().any(|f| id.contains(f.as_str())) {
        return;
    }
    first();
    second();
    let mut ratios: Vec<f64> = (0..RATIO_RUNS)
        .map(|_| {
            let t = std::time::Instant::now();
            first();
            let f = t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            second();
            t.elapsed().as_secs_f64() / f
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    println!(
        "{id}: {label} median {:.2}x (range {:.2}-{:.2}, {RATIO_RUNS} alternating runs)",
        ratios[RATIO_RUNS / 2],
        ratios[0],
        ratios[RATIO_RUNS - 1]
    );
}
