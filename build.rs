//! Build script: compiles `kernels/*.cu` twice, and embeds their sources;
//! compiles the NVTX shim (`src/nvtx_shim.c`, headers in `third_party/nvtx3`).
//!
//! 1. As C++ with the CPU emulator (`kernels/emulator/`), always, so that
//!    `cargo test` runs every kernel without a GPU. With
//!    `AUTOFOCUS_EMU_RACECHECK=1` the kernels' C++ is instrumented by
//!    ThreadSanitizer (`-fsanitize=thread`, linked into every target) and
//!    `cfg(emu_racecheck)` is set: the emulator then fails a launch whose
//!    threads race (`kernels/emulator/emulator.h`).
//! 2. With nvcc, when one is found (`NVCC`, then `CUDA_HOME`/`CUDA_PATH`,
//!    then `PATH`), into fatbins with machine code for sm_75, sm_80, sm_90,
//!    sm_100 and sm_120 plus compute_120 PTX (`CUDA_COMPUTE_CAP=90` narrows
//!    it to one target), never with fast math. Without nvcc the crate builds
//!    with a warning and its GPU path compiles the embedded sources with
//!    NVRTC at run time; `AUTOFOCUS_REQUIRE_CUDA=1` makes that an error.
//!
//! Both are described to the crate by `$OUT_DIR/kernels.rs`: every kernel's
//! name and source file, the embedded fatbins and the CUDA version of the
//! nvcc that built them, ptxas's registers and static shared memory of each
//! kernel on each target (the emulator refuses a launch that would not fit),
//! the sources and headers (for NVRTC), and the emulator's entry points.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernel_dir = Path::new("kernels");
    println!("cargo::rerun-if-changed=build.rs");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "CUDA_COMPUTE_CAP",
        "NVCC_CCBIN",
        // Read by nvcc itself, so they change what it builds.
        "NVCC_PREPEND_FLAGS",
        "NVCC_APPEND_FLAGS",
        "AUTOFOCUS_REQUIRE_CUDA",
        "AUTOFOCUS_EMU_RACECHECK",
        "PATH",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    watch(kernel_dir);

    let sources = cu_sources(kernel_dir);
    let kernels: Vec<(String, String)> = sources
        .iter()
        .flat_map(|path| {
            let stem = file_stem(path);
            let text = fs::read_to_string(path).expect("read kernel source");
            kernel_names(&text)
                .into_iter()
                .map(move |name| (name, stem.clone()))
        })
        .collect();

    let racecheck = env::var("AUTOFOCUS_EMU_RACECHECK").is_ok_and(|v| v == "1");
    println!("cargo::rustc-check-cfg=cfg(emu_racecheck)");
    if racecheck {
        println!("cargo::rustc-cfg=emu_racecheck");
        println!("cargo::rustc-link-arg=-fsanitize=thread");
        // GCC's runtime, named too: on rustc's link line (lld, as-needed)
        // the flag alone left the instrumented objects' symbols undefined.
        println!("cargo::rustc-link-lib=dylib=tsan");
    }
    build_emulator(&sources, &out_dir, racecheck);
    build_nvtx_shim();
    let fatbins = build_fatbins(&sources, &out_dir);
    let headers = header_files(kernel_dir);
    fs::write(
        out_dir.join("kernels.rs"),
        generated_rust(&kernels, &fatbins, &sources, &headers),
    )
    .expect("write kernels.rs");
}

/// Every file under `dir`, so an edited header rebuilds the kernels.
fn watch(dir: &Path) {
    for entry in fs::read_dir(dir).expect("kernels/ exists").flatten() {
        let path = entry.path();
        if path.is_dir() {
            watch(&path);
        } else {
            println!("cargo::rerun-if-changed={}", path.display());
        }
    }
}

fn cu_sources(dir: &Path) -> Vec<PathBuf> {
    let mut sources: Vec<PathBuf> = fs::read_dir(dir)
        .expect("kernels/ exists")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    sources
}

/// The headers the `.cu` files include (`kernels/*.cuh`, `kernels/*.h`);
/// the emulator's own header is only included outside CUDA.
fn header_files(dir: &Path) -> Vec<PathBuf> {
    let mut headers: Vec<PathBuf> = fs::read_dir(dir)
        .expect("kernels/ exists")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cuh" || e == "h"))
        .collect();
    headers.sort();
    headers
}

fn file_stem(path: &Path) -> String {
    path.file_stem().unwrap().to_string_lossy().into_owned()
}

/// Kernel names defined by `AF_KERNEL(name, ...)` and
/// `AF_KERNEL_ALL_TYPES(name, ...)` (which stamps `name_{f32,f16,bf16}`),
/// and their `_BOUNDED` forms.
fn kernel_names(source: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in source.lines() {
        let line = line.trim_start();
        let all_types = ["AF_KERNEL_ALL_TYPES(", "AF_KERNEL_ALL_TYPES_BOUNDED("]
            .iter()
            .find_map(|macro_| line.strip_prefix(macro_));
        let single = ["AF_KERNEL(", "AF_KERNEL_BOUNDED("]
            .iter()
            .find_map(|macro_| line.strip_prefix(macro_));
        let (all_types, rest) = match (all_types, single) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            (None, None) => continue,
        };
        let name = rest.split(',').next().unwrap().trim().to_string();
        if all_types {
            names.extend(["f32", "f16", "bf16"].map(|t| format!("{name}_{t}")));
        } else {
            names.push(name);
        }
    }
    names
}

/// The kernels as C++ on the CPU: two static libraries, the kernels (every
/// `.cu`, included from a generated `.cpp`, as the C++ compiler will not
/// take a `.cu` file by name, and the emulator's self-test kernels), then
/// the fiber scheduler they call. Only the kernels are instrumented for the
/// race check: the scheduler's own memory traffic is not the kernels'.
fn build_emulator(sources: &[PathBuf], out_dir: &Path, racecheck: bool) {
    let kernel_dir = fs::canonicalize("kernels").expect("kernels/ exists");
    let builder = || {
        let mut build = cc::Build::new();
        build
            .cpp(true)
            .std("c++17")
            .opt_level(2)
            .include(&kernel_dir)
            // Each f32 operation rounds on its own, as `__f*_rn` on the GPU.
            .flag_if_supported("-ffp-contract=off")
            .flag_if_supported("-Wno-unused-parameter")
            .warnings(true)
            .define("AF_EMU_RACECHECK", if racecheck { "1" } else { "0" });
        build
    };
    let mut kernels = builder();
    if racecheck {
        kernels.flag("-fsanitize=thread");
    }
    kernels.file(kernel_dir.join("emulator/selftest.cpp"));
    for source in sources {
        let wrapper = out_dir.join(format!("emulated_{}.cpp", file_stem(source)));
        let absolute = fs::canonicalize(source).expect("kernel source exists");
        fs::write(&wrapper, format!("#include \"{}\"\n", absolute.display()))
            .expect("write emulator wrapper");
        kernels.file(wrapper);
    }
    // Linked in this order: the kernels call into the scheduler.
    kernels.compile("autofocus_emulated_kernels");
    builder()
        .file(kernel_dir.join("emulator/context.cpp"))
        .file(kernel_dir.join("emulator/emulator.cpp"))
        .file(kernel_dir.join("emulator/layout.cpp"))
        .compile("autofocus_kernel_emulator");
}

/// `src/nvtx_shim.c` over the vendored NVTX3 headers (`src/nvtx.rs`).
fn build_nvtx_shim() {
    println!("cargo::rerun-if-changed=src/nvtx_shim.c");
    watch(Path::new("third_party/nvtx3"));
    cc::Build::new()
        .file("src/nvtx_shim.c")
        .include("third_party")
        .warnings(false) // the NVTX headers are not ours to lint
        .compile("autofocus_nvtx");
    // NVTX loads a profiler's library with dlopen (in libc since glibc 2.34).
    if env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux") {
        println!("cargo::rustc-link-lib=dl");
    }
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(nvcc) = env::var_os("NVCC") {
        return Some(PathBuf::from(nvcc));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            let candidate = Path::new(&home).join("bin").join("nvcc");
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join("nvcc"))
        .find(|p| p.is_file())
}

/// The fatbins nvcc built: (stem, path) of each, and nvcc's CUDA version
/// as the driver API writes it (13000 for 13.0).
struct Fatbins {
    images: Vec<(String, PathBuf)>,
    resources: Vec<KernelResources>,
    cuda_version: u32,
}

/// What ptxas reports for one kernel on one architecture: what a block of
/// it takes from the SM, which decides whether a launch fits at all.
struct KernelResources {
    kernel: String,
    sm: u32,
    registers: u32,
    static_shared_bytes: u32,
}

/// Compiles each `.cu` into `$OUT_DIR/<stem>.fatbin`; nothing without nvcc.
fn build_fatbins(sources: &[PathBuf], out_dir: &Path) -> Fatbins {
    let required = env::var("AUTOFOCUS_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    let Some(nvcc) = find_nvcc() else {
        if required {
            panic!(
                "AUTOFOCUS_REQUIRE_CUDA=1 but no nvcc was found (set NVCC or CUDA_HOME, or put nvcc on PATH)"
            );
        }
        println!(
            "cargo::warning=nvcc not found (NVCC, CUDA_HOME, CUDA_PATH, PATH): no fatbins; on a GPU the kernels will be compiled at run time by NVRTC"
        );
        return Fatbins {
            images: Vec::new(),
            resources: Vec::new(),
            cuda_version: 0,
        };
    };
    let cuda_version = nvcc_cuda_version(&nvcc);
    let targets: Vec<String> = match env::var("CUDA_COMPUTE_CAP") {
        Ok(cap) if !cap.trim().is_empty() => {
            let cap = cap.trim().replace('.', "");
            vec![
                format!("arch=compute_{cap},code=sm_{cap}"),
                format!("arch=compute_{cap},code=compute_{cap}"),
            ]
        }
        // Machine code runs on GPUs of its major version with an equal or
        // higher minor (sm_80 code on A10, L4, 4090; sm_120 on sm_121), and
        // the PTX is JIT-compiled by the driver for anything newer.
        _ => [75, 80, 90, 100, 120]
            .iter()
            .map(|cap| format!("arch=compute_{cap},code=sm_{cap}"))
            .chain(["arch=compute_120,code=compute_120".to_string()])
            .collect(),
    };
    type Compiled = Result<(String, PathBuf, Vec<KernelResources>), String>;
    let results: Vec<Compiled> = std::thread::scope(|scope| {
        let handles: Vec<_> = sources
            .iter()
            .map(|source| {
                let (nvcc, targets) = (&nvcc, &targets);
                scope.spawn(move || compile_fatbin(nvcc, targets, source, out_dir))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut images = Vec::new();
    let mut resources = Vec::new();
    for result in results {
        match result {
            Ok((stem, path, used)) => {
                images.push((stem, path));
                resources.extend(used);
            }
            Err(message) => panic!("{message}"),
        }
    }
    Fatbins {
        images,
        resources,
        cuda_version,
    }
}

/// `nvcc --version`'s "release 13.0" as 13000: a driver older than this
/// cannot load what this nvcc built.
fn nvcc_cuda_version(nvcc: &Path) -> u32 {
    let output = Command::new(nvcc)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} --version: {e}", nvcc.display()));
    let text = String::from_utf8_lossy(&output.stdout);
    let release = text
        .split("release ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| {
            panic!(
                "no \"release X.Y\" in {} --version:\n{text}",
                nvcc.display()
            )
        });
    let (major, minor) = release
        .trim()
        .split_once('.')
        .unwrap_or((release.trim(), "0"));
    let parse = |v: &str| -> u32 {
        v.parse().unwrap_or_else(|_| {
            panic!(
                "cannot read the CUDA release {release:?} of {}",
                nvcc.display()
            )
        })
    };
    parse(major) * 1000 + parse(minor) * 10
}

fn compile_fatbin(
    nvcc: &Path,
    targets: &[String],
    source: &Path,
    out_dir: &Path,
) -> Result<(String, PathBuf, Vec<KernelResources>), String> {
    let stem = file_stem(source);
    let output = out_dir.join(format!("{stem}.fatbin"));
    let mut command = Command::new(nvcc);
    command
        .arg("--fatbin")
        .args(["-O3", "-std=c++17", "-Ikernels"])
        // ptxas's registers and static shared memory per kernel and target,
        // on stderr: the emulator refuses a launch that would not fit.
        .arg("--resource-usage")
        .arg("-o")
        .arg(&output);
    for target in targets {
        command.arg("-gencode").arg(target);
    }
    if let Some(ccbin) = env::var_os("NVCC_CCBIN") {
        command.arg("-ccbin").arg(ccbin);
    }
    command.arg(source);
    let result = command
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    if !result.status.success() {
        return Err(format!(
            "nvcc failed on {}:\n{}{}",
            source.display(),
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr)
        ));
    }
    let resources = parse_resource_usage(&String::from_utf8_lossy(&result.stderr))
        .map_err(|e| format!("nvcc --resource-usage on {}: {e}", source.display()))?;
    Ok((stem, output, resources))
}

/// Reads ptxas's report: "Compiling entry function 'NAME' for 'sm_XX'",
/// then (after other lines) "Used N registers, ..., S bytes smem, ...",
/// where the smem part is absent when the kernel has no static shared memory.
fn parse_resource_usage(report: &str) -> Result<Vec<KernelResources>, String> {
    let mut resources = Vec::new();
    let mut entry: Option<(String, u32)> = None;
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let (name, rest) = rest
                .split_once('\'')
                .ok_or_else(|| format!("cannot read {line:?}"))?;
            let sm = rest
                .split("'sm_")
                .nth(1)
                .and_then(|t| t.trim_end_matches('\'').parse().ok())
                .ok_or_else(|| format!("no target in {line:?}"))?;
            entry = Some((name.to_string(), sm));
        } else if let Some(rest) = line.split("Used ").nth(1) {
            let Some((kernel, sm)) = entry.take() else {
                continue;
            };
            let number_before = |unit: &str| -> Option<u32> {
                let (before, _) = rest.split_once(unit)?;
                before
                    .rsplit([' ', ','])
                    .find(|t| !t.is_empty())?
                    .parse()
                    .ok()
            };
            let registers =
                number_before(" registers").ok_or_else(|| format!("no registers in {line:?}"))?;
            let static_shared_bytes = number_before(" bytes smem").unwrap_or(0);
            resources.push(KernelResources {
                kernel,
                sm,
                registers,
                static_shared_bytes,
            });
        }
    }
    Ok(resources)
}

fn generated_rust(
    kernels: &[(String, String)],
    fatbins: &Fatbins,
    sources: &[PathBuf],
    headers: &[PathBuf],
) -> String {
    let mut rust = String::from("// Generated by build.rs.\n\n");
    rust += "/// Every kernel: (name, source file stem in `kernels/`).\n";
    rust += "pub const KERNELS: &[(&str, &str)] = &[\n";
    for (name, stem) in kernels {
        writeln!(rust, "    ({name:?}, {stem:?}),").unwrap();
    }
    rust += "];\n\n/// Fatbin per source file stem; empty when built without nvcc.\n";
    rust += "pub const IMAGES: &[(&str, &[u8])] = &[\n";
    for (stem, path) in &fatbins.images {
        writeln!(
            rust,
            "    ({stem:?}, include_bytes!({:?})),",
            path.display()
        )
        .unwrap();
    }
    rust += "];\n\n/// What each kernel takes per thread and per block on each architecture\n";
    rust += "/// [`IMAGES`] hold machine code for, as ptxas reported it: (kernel, sm,\n";
    rust += "/// registers per thread, static shared bytes). Empty without nvcc.\n";
    rust += "pub const RESOURCES: &[(&str, u32, u32, u32)] = &[\n";
    for r in &fatbins.resources {
        writeln!(
            rust,
            "    ({:?}, {}, {}, {}),",
            r.kernel, r.sm, r.registers, r.static_shared_bytes
        )
        .unwrap();
    }
    rust += "];\n\n/// CUDA version of the nvcc that built [`IMAGES`] (13000 = 13.0), 0 without.\n";
    writeln!(
        rust,
        "pub const FATBIN_CUDA_VERSION: u32 = {};",
        fatbins.cuda_version
    )
    .unwrap();
    rust += "\n/// Every `.cu` file: (stem, source text), for NVRTC.\n";
    rust += "pub const SOURCES: &[(&str, &str)] = &[\n";
    for source in sources {
        let absolute = fs::canonicalize(source).expect("kernel source exists");
        writeln!(
            rust,
            "    ({:?}, include_str!({:?})),",
            file_stem(source),
            absolute.display()
        )
        .unwrap();
    }
    rust += "];\n\n/// The headers they include: (name, text), for NVRTC.\n";
    rust += "pub const HEADERS: &[(&str, &str)] = &[\n";
    for header in headers {
        let absolute = fs::canonicalize(header).expect("kernel header exists");
        let name = header.file_name().unwrap().to_string_lossy();
        writeln!(
            rust,
            "    ({name:?}, include_str!({:?})),",
            absolute.display()
        )
        .unwrap();
    }
    rust += "];\n\nunsafe extern \"C\" {\n";
    for (name, _) in kernels {
        writeln!(rust, "    fn af_emu_{name}(launch: *const EmulatedLaunch, params: *const core::ffi::c_void, error: *mut core::ffi::c_char, error_len: usize) -> core::ffi::c_int;").unwrap();
    }
    rust += "}\n\n/// The emulator's entry point of kernel `name`.\n";
    rust += "pub fn emulated(name: &str) -> Option<EmulatedKernel> {\n    match name {\n";
    for (name, _) in kernels {
        writeln!(rust, "        {name:?} => Some(af_emu_{name}),").unwrap();
    }
    rust += "        _ => None,\n    }\n}\n";
    rust
}
