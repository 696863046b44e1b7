//! Model configurations (as stored in a checkpoint or given as --config):
//! parsed, validated, and sized as `bench` sizes them.
#![no_main]

use autofocus::model::ModelKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(json) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = autofocus::AffConfig::from_json(json) {
        for kind in [ModelKind::Classifier, ModelKind::Backbone] {
            let _ = autofocus::limits::forward_bytes(&config, kind, 1, (224, 224));
        }
    }
});
