//! Build script.
//!
//! The CUDA backend (a later milestone) compiles `kernels/*.cu` here into
//! embedded fatbins. Until it lands the crate is CPU-only, and this script
//! only tells cargo what to watch.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
}
