//! Weights files: any bytes must load or fail with an error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    std::fs::write(&path, data).unwrap();
    let _ = autofocus::AutoFocusFormer::load(&path, None);
});
