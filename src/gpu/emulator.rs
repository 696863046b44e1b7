//! The CPU emulator's side of the FFI: `kernels/emulator/emulator.cpp`
//! runs a kernel's blocks one after another, each block's threads as fibers.

use std::ffi::{c_char, c_int, c_void};

use super::LaunchConfig;
use super::params::KernelParams;
use crate::error::{Error, Result};

/// The launch geometry, as `af_emu_launch` in `emulator.cpp`.
#[repr(C)]
pub struct EmulatedLaunch {
    grid: [u32; 3],
    block: [u32; 3],
    shared_bytes: u32,
}

/// A kernel's emulator entry point, `af_emu_<name>`.
pub type EmulatedKernel =
    unsafe extern "C" fn(*const EmulatedLaunch, *const c_void, *mut c_char, usize) -> c_int;

/// Runs `kernel` over `config`'s grid with `params`.
///
/// # Safety
/// As [`super::Device::launch`]; `kernel` must take a `P`.
pub unsafe fn launch<P: KernelParams>(
    name: &str,
    kernel: EmulatedKernel,
    config: LaunchConfig,
    params: &P,
) -> Result<()> {
    let launch = EmulatedLaunch {
        grid: config.grid,
        block: config.block,
        shared_bytes: config.shared_bytes,
    };
    let mut message = [0u8; 256];
    // SAFETY: the caller's contract; `message` outlives the call and its
    // length is passed.
    let status = unsafe {
        kernel(
            &launch,
            (params as *const P).cast(),
            message.as_mut_ptr().cast(),
            message.len(),
        )
    };
    if status == 0 {
        return Ok(());
    }
    let end = message
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(message.len());
    Err(Error::device(
        name,
        format!("emulator: {}", String::from_utf8_lossy(&message[..end])),
    ))
}
