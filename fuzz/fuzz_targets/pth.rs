//! `torch.save` checkpoints (zip + pickle): any bytes must load or fail
//! with an error, with the tiny test model's configuration.
#![no_main]

use autofocus::io::pth::{EntryChoice, PthCheckpoint};
use libfuzzer_sys::fuzz_target;

const CONFIG: &str = r#"{"num_classes": 10, "embed_dim": [16, 32, 64, 96], "depths": [1, 1, 2, 1],
    "num_heads": [1, 2, 4, 8], "mlp_ratio": 2.0, "cluster_size": 8, "nbhd_size": [48, 48, 48, 49],
    "alpha": 4.0, "ds_rate": 0.25, "layer_scale": 0.0, "img_size": 128}"#;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.pth");
    std::fs::write(&path, data).unwrap();
    if let Ok(checkpoint) = PthCheckpoint::open(&path, EntryChoice::Model) {
        let config = autofocus::AffConfig::from_json(CONFIG).unwrap();
        let _ = autofocus::AutoFocusFormer::from_source(&checkpoint, Some(config));
    }
});
