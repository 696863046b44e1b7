//! PNG and JPEG files through decoding and the evaluation preprocessing.
#![no_main]

use autofocus::io::image::{Preprocess, load_image};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image");
    std::fs::write(&path, data).unwrap();
    let _ = load_image(
        &path,
        Preprocess {
            size: 224,
            crop: true,
        },
    );
});
