//! The NVRTC path (src/gpu/nvrtc.rs) without a GPU: every embedded kernel
//! source compiles with the installed NVRTC into a cubin that defines every
//! kernel of its file, for the oldest and a current architecture, and the
//! disk cache returns the same bytes without compiling.
//!
//! NVRTC is looked for as the GPU path looks for it (`AUTOFOCUS_NVRTC`, then
//! `libnvrtc.so.N`); without one these tests say so and pass, unless
//! `AUTOFOCUS_REQUIRE_NVRTC=1` (CI, with CUDA 12's NVRTC from PyPI: the
//! compiler users with drivers older than 580 have).

use autofocus::gpu::nvrtc::{Arch, Nvrtc, kernel_files};

fn nvrtc() -> Option<Nvrtc> {
    match Nvrtc::open(None) {
        Ok(nvrtc) => Some(nvrtc),
        Err(e) if std::env::var("AUTOFOCUS_REQUIRE_NVRTC").is_ok_and(|v| v == "1") => {
            panic!("AUTOFOCUS_REQUIRE_NVRTC=1 but: {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// True when `cubin` has `name` as a whole NUL-terminated symbol string.
fn defines(cubin: &[u8], name: &str) -> bool {
    let needle: Vec<u8> = [&[0u8][..], name.as_bytes(), &[0u8]].concat();
    cubin.windows(needle.len()).any(|w| w == needle)
}

fn compiles_every_kernel_file(arch: Arch) {
    let Some(nvrtc) = nvrtc() else { return };
    let files = kernel_files();
    assert!(files.len() >= 10, "{} kernel files", files.len());
    for (stem, kernels) in files {
        let cubin = nvrtc
            .kernel_file(stem, arch, None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!cubin.from_cache);
        assert!(cubin.bytes.starts_with(b"\x7fELF"), "{stem}: not an ELF");
        assert!(!kernels.is_empty(), "{stem} defines no kernel");
        assert!(!defines(&cubin.bytes, "no_such_kernel"));
        for kernel in kernels {
            assert!(
                defines(&cubin.bytes, kernel),
                "{stem}.cu for {arch}: cubin lacks kernel {kernel}"
            );
        }
    }
}

#[test]
fn every_kernel_file_compiles_for_sm_75() {
    compiles_every_kernel_file(Arch { major: 7, minor: 5 });
}

#[test]
fn every_kernel_file_compiles_for_sm_90() {
    compiles_every_kernel_file(Arch { major: 9, minor: 0 });
}

#[test]
fn the_cache_returns_the_compiled_bytes_and_survives_a_damaged_file() {
    let Some(nvrtc) = nvrtc() else { return };
    let dir = tempfile::tempdir().unwrap();
    let arch = Arch { major: 8, minor: 6 };
    let first = nvrtc.kernel_file("sort", arch, Some(dir.path())).unwrap();
    assert!(!first.from_cache);
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "one cubin, no temporary left: {files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    let (major, minor) = nvrtc.version();
    assert!(
        name.starts_with(&format!("sort-sm_86-nvrtc{major}.{minor}-")) && name.ends_with(".cubin"),
        "{name}"
    );

    let second = nvrtc.kernel_file("sort", arch, Some(dir.path())).unwrap();
    assert!(second.from_cache);
    assert_eq!(second.bytes, first.bytes);

    // Another architecture is another entry.
    let other = nvrtc
        .kernel_file("sort", Arch { major: 7, minor: 5 }, Some(dir.path()))
        .unwrap();
    assert!(!other.from_cache);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);

    // A damaged entry is compiled again and replaced.
    std::fs::write(&files[0], b"not a cubin").unwrap();
    let third = nvrtc.kernel_file("sort", arch, Some(dir.path())).unwrap();
    assert!(!third.from_cache);
    assert_eq!(third.bytes, first.bytes);
    assert_eq!(std::fs::read(&files[0]).unwrap(), first.bytes);
}

#[test]
fn a_file_that_does_not_compile_reports_nvrtc_s_log() {
    let Some(nvrtc) = nvrtc() else { return };
    let error = nvrtc
        .compile(
            "broken.cu",
            "#include \"common.cuh\"\nextern \"C\" __global__ void k() { undeclared = 1; }\n",
            &[("common.cuh", "#pragma once\n")],
            Arch { major: 8, minor: 0 },
        )
        .unwrap_err()
        .to_string();
    assert!(error.contains("broken.cu for sm_80"), "{error}");
    assert!(error.contains("undeclared"), "{error}");
}

#[test]
fn an_unknown_kernel_file_is_an_error() {
    let Some(nvrtc) = nvrtc() else { return };
    let error = nvrtc
        .kernel_file("no_such_file", Arch { major: 8, minor: 0 }, None)
        .err()
        .expect("no such file")
        .to_string();
    assert!(error.contains("kernels/no_such_file.cu"), "{error}");
}

#[test]
fn an_nvrtc_newer_than_the_driver_is_refused() {
    // With AUTOFOCUS_NVRTC the search holds that one library alone, so
    // capping the version below it must refuse it (CI sets it).
    if std::env::var_os("AUTOFOCUS_NVRTC").is_none() {
        return;
    }
    let Some(nvrtc) = nvrtc() else { return };
    let (major, _) = nvrtc.version();
    let error = Nvrtc::open(Some(major - 1))
        .err()
        .expect("a newer NVRTC than the driver must be refused")
        .to_string();
    assert!(
        error.contains(&format!("newer than the driver's CUDA {}", major - 1)),
        "{error}"
    );
}
