//! Generates the Rust mirrors of `kernels/params.h` with bindgen.
//!
//! `params-gen HEADER OUT` writes them; `params-gen HEADER OUT --check`
//! fails (exit 1) when `OUT` differs from what it would write, which is how
//! CI catches a header changed without regenerating. Run it through
//! `scripts/generate-params.sh`, which installs libclang from PyPI.
//!
//! The structs keep the header's doc comments (`///`, `///<`). Pointer
//! fields become [`Ptr`] device addresses (u64: the kernels take device
//! addresses, and the emulator host addresses, never Rust pointers).

use std::process::ExitCode;

use bindgen::callbacks::{DeriveInfo, ParseCallbacks};

/// Derives bindgen leaves out on structs with pointer fields, which are
/// plain integers once the pointers become `Ptr`.
#[derive(Debug)]
struct ExtraDerives;

impl ParseCallbacks for ExtraDerives {
    fn add_derives(&self, _info: &DeriveInfo<'_>) -> Vec<String> {
        vec!["Default".into()]
    }
}

fn generate(header: &str) -> Result<String, String> {
    let bindings = bindgen::Builder::default()
        .header(header)
        .clang_args(["-x", "c++", "-std=c++17", "-Wno-pragma-once-outside-header"])
        .allowlist_type(".*Params")
        .derive_debug(true)
        .derive_copy(true)
        .derive_default(false)
        .parse_callbacks(Box::new(ExtraDerives))
        .layout_tests(false)
        .use_core()
        .generate_comments(true)
        .formatter(bindgen::Formatter::Prettyplease)
        .generate()
        .map_err(|e| format!("bindgen failed on {header}: {e}"))?
        .to_string();
    let pointer = regex::Regex::new(r"\*(const|mut) [A-Za-z0-9_:]+").expect("valid regex");
    let body = pointer.replace_all(&bindings, "Ptr");
    // Trailing member comments (`///<`) document the member like `///`.
    let body = body.replace("///< ", "/// ");
    // A blank line between items.
    let body = regex::Regex::new(r"\}\n([/#])")
        .expect("valid regex")
        .replace_all(&body, "}\n\n$1");
    Ok(format!(
        "//! Generated from `kernels/params.h` by `scripts/generate-params.sh`\n\
         //! (bindgen): do not edit; CI fails when this is stale.\n\n\
         use super::Ptr;\n\n{body}"
    ))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (header, out, check) = match args.as_slice() {
        [h, o] => (h, o, false),
        [h, o, flag] if flag == "--check" => (h, o, true),
        _ => {
            eprintln!("usage: params-gen HEADER OUT [--check]");
            return ExitCode::from(2);
        }
    };
    let text = match generate(header) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("params-gen: {e}");
            return ExitCode::FAILURE;
        }
    };
    if check {
        let current = std::fs::read_to_string(out).unwrap_or_default();
        if current != text {
            eprintln!(
                "params-gen: {out} is stale: {header} changed; run scripts/generate-params.sh"
            );
            return ExitCode::FAILURE;
        }
        return ExitCode::SUCCESS;
    }
    if let Err(e) = std::fs::write(out, text) {
        eprintln!("params-gen: cannot write {out}: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
