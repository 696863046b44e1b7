//! Shared helpers of the integration tests: golden files and comparisons.
#![allow(dead_code)]

use std::path::PathBuf;

use autofocus::gpu::{Buffer, Device, Element};
use autofocus::io::SafetensorsFile;
use autofocus::{AutoFocusFormer, Tensor};

/// The repository root: `CARGO_MANIFEST_DIR` at run time when set (test
/// binaries copied to a GPU machine run from another checkout), else where
/// the tests were built.
pub fn repo_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The repo's bundled test data.
pub fn data_dir() -> PathBuf {
    repo_dir().join("tests/data")
}

/// `../shared/golden`, beside the repository.
pub fn shared_golden_dir() -> PathBuf {
    repo_dir().join("../shared/golden")
}

/// Set by `.ci/run`: cases read from `../shared/golden` must be present.
pub const REQUIRE_SHARED: &str = "AUTOFOCUS_REQUIRE_SHARED_GOLDEN";

/// Finds a golden case: bundled cases in `tests/data`, others in
/// `../shared/golden`. Returns `None` (the test is skipped, loudly) when a
/// shared case is absent, unless `AUTOFOCUS_REQUIRE_SHARED_GOLDEN=1`.
pub fn case_dir(case: &str) -> Option<PathBuf> {
    let bundled = data_dir();
    if bundled.join(format!("{case}.weights.safetensors")).exists() {
        return Some(bundled);
    }
    let shared = shared_golden_dir();
    if shared.join(format!("{case}.weights.safetensors")).exists() {
        return Some(shared);
    }
    if std::env::var(REQUIRE_SHARED).is_ok_and(|v| v == "1") {
        panic!(
            "golden case {case} not found in {} and {REQUIRE_SHARED}=1",
            shared.display()
        );
    }
    eprintln!("SKIPPED: golden case {case} not found (set {REQUIRE_SHARED}=1 to make this fail)");
    None
}

/// Every golden case there is: each `<name>.golden.safetensors` with its
/// `<name>.weights.safetensors`, bundled in `tests/data` or in
/// `../shared/golden` (a name in both is taken once), sorted by name. New
/// cases dropped into either folder are tested without naming them here.
/// With `AUTOFOCUS_REQUIRE_SHARED_GOLDEN=1` the shared folder must hold some.
pub fn golden_case_names() -> Vec<String> {
    let cases_in = |dir: &std::path::Path| -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                let case = name.strip_suffix(".golden.safetensors")?.to_string();
                dir.join(format!("{case}.weights.safetensors"))
                    .exists()
                    .then_some(case)
            })
            .collect()
    };
    let shared = cases_in(&shared_golden_dir());
    if shared.is_empty() {
        if std::env::var(REQUIRE_SHARED).is_ok_and(|v| v == "1") {
            panic!(
                "no golden case in {} and {REQUIRE_SHARED}=1",
                shared_golden_dir().display()
            );
        }
        eprintln!(
            "SKIPPED: no golden case in {}",
            shared_golden_dir().display()
        );
    }
    let mut names = cases_in(&data_dir());
    names.extend(shared);
    names.sort();
    names.dedup();
    names
}

/// Runs `check` on every golden case whose model is of `kind` (each case
/// to the end even when another fails), then fails naming every case that
/// failed. Returns the cases checked.
pub fn for_each_golden_case(
    kind: autofocus::model::ModelKind,
    check: impl Fn(&Case) + std::panic::RefUnwindSafe,
) -> Vec<String> {
    let mut checked = Vec::new();
    let mut failed = Vec::new();
    for name in golden_case_names() {
        let Some(case) = Case::load(&name) else {
            continue;
        };
        if case.model.kind() != kind {
            continue;
        }
        eprintln!("golden case {name}");
        if std::panic::catch_unwind(|| check(&case)).is_err() {
            failed.push(name.clone());
        }
        checked.push(name);
    }
    assert!(
        failed.is_empty(),
        "golden cases failed: {failed:?} (of {checked:?})"
    );
    assert!(!checked.is_empty(), "no golden case of kind {kind:?}");
    checked
}

/// A golden case: the model and its recorded intermediates.
pub struct Case {
    pub name: String,
    pub model: AutoFocusFormer,
    pub golden: SafetensorsFile,
}

impl Case {
    pub fn load(name: &str) -> Option<Self> {
        let dir = case_dir(name)?;
        let model = AutoFocusFormer::load(dir.join(format!("{name}.weights.safetensors")), None)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let golden = SafetensorsFile::open(dir.join(format!("{name}.golden.safetensors"))).unwrap();
        Some(Self {
            name: name.to_string(),
            model,
            golden,
        })
    }

    pub fn f32(&self, key: &str) -> Tensor<f32> {
        self.golden
            .tensor_f32(key)
            .unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    pub fn i32(&self, key: &str) -> Tensor<i32> {
        self.golden
            .tensor_i32(key)
            .unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    /// Every tensor name of the golden file.
    pub fn golden_keys(&self) -> Vec<String> {
        use autofocus::io::TensorSource;
        self.golden.names()
    }

    pub fn has(&self, key: &str) -> bool {
        self.golden.contains(key)
    }

    /// The stage-0 token grid `(h, w)`.
    pub fn grid(&self) -> (usize, usize) {
        let hw = self.i32("patch.hw");
        (hw.data()[0] as usize, hw.data()[1] as usize)
    }
}

/// `max|got − want| ≤ 1e-4 · max(1, max|want|)`, the spec's f32 tolerance.
pub fn assert_close(what: &str, got: &[f32], want: &Tensor<f32>) {
    assert_within(what, got, want.data(), 1e-4);
}

/// `got` within `rel · max(1, max|want|)` of `want` everywhere.
pub fn assert_within(what: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let (worst, at) = got
        .iter()
        .zip(want)
        .enumerate()
        .map(|(i, (g, w))| ((g - w).abs(), i))
        .fold(
            (0.0f32, 0),
            |a, b| if b.0 > a.0 || b.0.is_nan() { b } else { a },
        );
    assert!(
        worst <= rel * scale,
        "{what}: max |diff| {worst:e} at {at} (got {}, want {}), tolerance {:e}",
        got[at],
        want[at],
        rel * scale
    );
}

/// Bit-for-bit equality, reporting the first difference.
pub fn assert_exact<T: PartialEq + std::fmt::Debug>(what: &str, got: &[T], want: &[T]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g != w) {
        panic!(
            "{what}: first difference at {i}: got {:?}, want {:?}",
            got[i], want[i]
        );
    }
}

/// The devices the kernel tests run on: the CPU emulator, and GPU 0 when
/// there is one.
pub fn devices() -> Vec<Device> {
    // With AUTOFOCUS_REQUIRE_GPU=1 (the device check) only the GPU runs:
    // CI has already run the emulator, and device time is scarce.
    if std::env::var("AUTOFOCUS_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        match Device::cuda(0) {
            Ok(gpu) => return vec![gpu],
            Err(e) => panic!("AUTOFOCUS_REQUIRE_GPU=1 but: {e}"),
        }
    }
    let mut devices = vec![Device::emulator()];
    devices.extend(Device::cuda(0).ok());
    devices
}

/// The devices the candle tests run on: the CPU, and, in a build with
/// feature `candle-cuda`, candle's GPU 0 when there is one. With
/// AUTOFOCUS_REQUIRE_GPU=1 (the device check) only the GPU, which must be
/// there.
#[cfg(feature = "candle")]
pub fn candle_devices() -> Vec<candle_core::Device> {
    let require_gpu = std::env::var("AUTOFOCUS_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let mut devices = Vec::new();
    if !require_gpu {
        devices.push(candle_core::Device::Cpu);
    }
    #[cfg(feature = "candle-cuda")]
    match candle_core::Device::new_cuda(0) {
        Ok(gpu) => devices.push(gpu),
        Err(e) if require_gpu => panic!("AUTOFOCUS_REQUIRE_GPU=1 but: {e}"),
        Err(e) => eprintln!("SKIPPED on the GPU: {e}"),
    }
    assert!(
        !devices.is_empty(),
        "AUTOFOCUS_REQUIRE_GPU=1 but this build has no candle GPU (feature candle-cuda)"
    );
    devices
}

/// The crate's SplitMix64 with a fixed seed: the same inputs every run
/// (tests whose inputs must not change, such as mutations and finite
/// differences).
#[allow(unused_imports)] // not every test binary draws numbers
pub use autofocus::rng::SplitMix64 as SplitMix;

/// `max|got − want| ≤ tol · max(1, max|want|)`, element by element.
pub fn assert_slices_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * scale,
            "{what}: element {i}: got {g}, want {w} (tolerance {tol} × {scale})"
        );
    }
}

/// `v` stored on `device` as `T`.
pub fn upload_as<T: Element>(device: &Device, v: &[f32]) -> Buffer<T> {
    device
        .upload(&v.iter().map(|&x| T::from_f32(x)).collect::<Vec<T>>())
        .unwrap()
}

/// An index buffer read back as the CPU ops' `u32` indices.
pub fn download_indices(device: &Device, b: &Buffer<i32>) -> Vec<u32> {
    device
        .download(b)
        .unwrap()
        .into_iter()
        .map(|i| i as u32)
        .collect()
}

/// A `T` buffer read back as f32.
pub fn download_f32<T: Element>(device: &Device, b: &Buffer<T>) -> Vec<f32> {
    device
        .download(b)
        .unwrap()
        .into_iter()
        .map(T::to_f32)
        .collect()
}

/// Every preset's stages as `(preset, stage, m, cluster size, head dim)`:
/// the neighbourhood of `nbhd_size / cluster_size` clusters (rounded half to
/// even, as the model rounds it) and the stage's channels per head.
pub fn preset_stage_shapes() -> Vec<(&'static str, usize, usize, usize, usize)> {
    let mut shapes = Vec::new();
    for name in autofocus::config::PRESET_NAMES {
        let config = autofocus::config::AffConfig::preset(name).unwrap();
        let s = config.cluster_size;
        for stage in 0..4 {
            let nnc = (config.nbhd_size[stage] as f64 / s as f64).round_ties_even() as usize;
            let d = config.embed_dim[stage] / config.num_heads[stage];
            shapes.push((name, stage, nnc * s, s, d));
        }
    }
    shapes
}

/// The stage-0 layouts the model makes on a full grid, as
/// `(h, w, cluster size, nnc, clusters, nearest)`: aff_tiny at 224² (56×56,
/// clusters of 8) and aff_base_22kto1k_384 at 384² (96×96, clusters of 24),
/// each token's `nnc` = 6 nearest clusters by the crate's layout ops.
pub fn model_stage0_layouts() -> Vec<(usize, usize, usize, usize, usize, Vec<u32>)> {
    use autofocus::ops::clustering::{KeyScope, grid_positions, space_filling_cluster};
    use autofocus::ops::neighbourhood::nearest_clusters;
    [(56, 56, 8, 6), (96, 96, 24, 6)]
        .into_iter()
        .map(|(h, w, s, nnc)| {
            let n = h * w;
            let clusters =
                space_filling_cluster(&grid_positions(h, w), 1, n, s, (h, w), KeyScope::Batch)
                    .unwrap();
            let nearest =
                nearest_clusters(&clusters.pos, &clusters.means, 1, n, clusters.clusters, nnc)
                    .unwrap();
            (h, w, s, nnc, clusters.clusters, nearest)
        })
        .collect()
}
