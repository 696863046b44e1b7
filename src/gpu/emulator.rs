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
    // The CPU has room for any block; a GPU may not.
    if let Some(reason) = super::resources::refusal(name, &config) {
        return Err(Error::device(
            name,
            format!("emulator: a GPU would refuse this launch: {reason}"),
        ));
    }
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

/// The emulator catches what the GPU does not promise: each test runs a
/// kernel of `kernels/emulator/selftest.cpp` that breaks one rule.
#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C)]
    #[derive(Clone, Copy)]
    struct EmuSelfTestParams {
        out: *mut f32,
        sync: c_int,
        tag: c_int,
    }
    // SAFETY: a #[repr(C)] mirror of the struct in selftest.cpp.
    unsafe impl cudarc::driver::DeviceRepr for EmuSelfTestParams {}
    // SAFETY: as above.
    unsafe impl KernelParams for EmuSelfTestParams {}

    /// Declares the self-test kernels' entry points (an [`EmulatedKernel`]
    /// each).
    macro_rules! selftest_kernels {
        ($($name:ident),* $(,)?) => {
            unsafe extern "C" {
                $(fn $name(
                    launch: *const EmulatedLaunch,
                    params: *const c_void,
                    error: *mut c_char,
                    error_len: usize,
                ) -> c_int;)*
            }
        };
    }
    selftest_kernels!(
        af_emu_emu_selftest_neighbour,
        af_emu_emu_selftest_previous_block,
        af_emu_emu_selftest_unwritten,
        af_emu_emu_selftest_overrun,
        af_emu_emu_selftest_bounded,
        af_emu_emu_selftest_warp_sum,
        af_emu_emu_selftest_static_shared,
        af_emu_emu_selftest_shuffle_then_read,
        af_emu_emu_selftest_votes,
        af_emu_emu_selftest_misaligned,
    );

    /// `blocks` blocks of `threads`, one float of output per thread (NaN
    /// before the kernel), and a float of dynamic shared memory per thread.
    fn run(kernel: EmulatedKernel, blocks: u32, threads: u32, sync: bool) -> Result<Vec<f32>> {
        run_tagged(kernel, blocks, threads, sync, 0)
    }

    /// As [`run`], with the launch's `tag`.
    fn run_tagged(
        kernel: EmulatedKernel,
        blocks: u32,
        threads: u32,
        sync: bool,
        tag: i32,
    ) -> Result<Vec<f32>> {
        let mut out = vec![f32::NAN; (blocks * threads) as usize];
        let config = LaunchConfig {
            grid: [blocks, 1, 1],
            block: [threads, 1, 1],
            shared_bytes: threads * 4,
        };
        let params = EmuSelfTestParams {
            out: out.as_mut_ptr(),
            sync: c_int::from(sync),
            tag,
        };
        // SAFETY: `out` holds a float for every thread of the launch, the
        // kernels' only write, and lives past the call.
        unsafe { launch("selftest", kernel, config, &params) }?;
        Ok(out)
    }

    #[test]
    fn warp_votes_give_the_lanes_bits() {
        let out = run(af_emu_emu_selftest_votes, 2, 64, true).unwrap();
        for (thread, &got) in out.iter().enumerate() {
            let lane = thread % 32;
            // 11 lanes of 32 are multiples of 3, each with its bit; lanes
            // 4g..4g+3 share t / 4, the lowest of them (1-based) is 4g + 1.
            let own_bit = if lane % 3 == 0 { 1.0e5 } else { 0.0 };
            let want = 11.0e6 + own_bit + 15.0 * 100.0 + (lane / 4 * 4 + 1) as f32;
            assert_eq!(got, want, "thread {thread}");
        }
    }

    #[test]
    fn a_missing_barrier_changes_the_result_in_some_block() {
        let threads = 64;
        let expected = |t: u32| t.saturating_sub(1) as f32;
        let synced = run(af_emu_emu_selftest_neighbour, 3, threads, true).unwrap();
        for (i, &v) in synced.iter().enumerate() {
            assert_eq!(
                v,
                expected(i as u32 % threads),
                "thread {i} with the barrier"
            );
        }
        // Ascending order alone would give every block the right answer;
        // the other orders leave some thread reading before its neighbour
        // has written. (The race check fails the launch outright.)
        let racy = run(af_emu_emu_selftest_neighbour, 3, threads, false);
        if cfg!(emu_racecheck) {
            let error = racy.unwrap_err().to_string();
            assert!(error.contains("data race"), "{error}");
            return;
        }
        let racy = racy.unwrap();
        let wrong_blocks = racy
            .chunks(threads as usize)
            .filter(|block| {
                block
                    .iter()
                    .enumerate()
                    .any(|(t, &v)| v != expected(t as u32))
            })
            .count();
        assert!(
            wrong_blocks >= 2,
            "{wrong_blocks} of 3 blocks show the race"
        );
    }

    #[test]
    fn a_missing_barrier_next_to_a_shuffle_takes_the_race_check() {
        let threads = 64;
        let expected: Vec<f32> = (0..2 * threads)
            .map(|i| ((i % threads) ^ 1) as f32 + 32.0)
            .collect();
        assert_eq!(
            run(af_emu_emu_selftest_shuffle_then_read, 2, threads, true).unwrap(),
            expected
        );
        let racy = run(af_emu_emu_selftest_shuffle_then_read, 2, threads, false);
        if cfg!(emu_racecheck) {
            let error = racy.unwrap_err().to_string();
            assert!(error.contains("data race"), "{error}");
        } else {
            // The blind spot the race check covers: whatever the thread
            // order, every lane has written before any passes the shuffle.
            assert_eq!(racy.unwrap(), expected);
        }
    }

    #[test]
    fn blocks_do_not_run_in_ascending_order() {
        let out = run(af_emu_emu_selftest_previous_block, 8, 1, false).unwrap();
        let chain: Vec<f32> = (0..8).map(|b| b as f32).collect();
        assert_eq!(out[0], 0.0);
        assert_ne!(out, chain, "block b saw block b - 1's write in every block");
    }

    #[test]
    fn unwritten_shared_memory_is_stale_or_poisoned_by_block() {
        let threads = 32;
        let out = run(af_emu_emu_selftest_unwritten, 9, threads, false).unwrap();
        let firsts: Vec<f32> = out.chunks(threads as usize).map(|block| block[0]).collect();
        assert!(
            firsts.iter().any(|v| v.is_nan()),
            "no poisoned block: {firsts:?}"
        );
        assert!(firsts.contains(&0.0), "no zeroed block: {firsts:?}");
        // Another block's index: left by the block that ran before.
        assert!(
            firsts.iter().any(|&v| v >= 1.0),
            "no stale block: {firsts:?}"
        );
    }

    #[test]
    fn a_misaligned_vector_load_is_reported() {
        let out = run(af_emu_emu_selftest_misaligned, 2, 64, true).unwrap();
        let want: Vec<f32> = (0..2 * 64).map(|t| ((t % 64) / 2) as f32).collect();
        assert_eq!(out, want);
        let error = run(af_emu_emu_selftest_misaligned, 2, 64, false).unwrap_err();
        assert!(
            error.to_string().contains("4-byte vector access")
                && error.to_string().contains("misaligned"),
            "{error}"
        );
    }

    #[test]
    fn a_write_past_the_shared_memory_is_reported() {
        let error = run(af_emu_emu_selftest_overrun, 1, 32, false).unwrap_err();
        assert!(
            error.to_string().contains("wrote past its 128 bytes"),
            "{error}"
        );
    }

    #[test]
    fn a_block_beyond_the_launch_bounds_is_refused() {
        assert_eq!(
            run(af_emu_emu_selftest_bounded, 2, 64, false).unwrap(),
            [1.0; 128]
        );
        let error = run(af_emu_emu_selftest_bounded, 2, 96, false).unwrap_err();
        assert!(error.to_string().contains("launch bounds"), "{error}");
    }

    /// The launch itself checks the ptxas report of the kernel it is named
    /// after: under linear_f32's name (8704 bytes of static shared memory),
    /// a launch asking for all 48 KiB as dynamic shared memory is refused
    /// before anything runs.
    #[test]
    fn a_launch_no_gpu_has_room_for_is_refused() {
        if !super::super::built_with_cuda() {
            eprintln!("SKIPPED: built without nvcc, so no ptxas report");
            return;
        }
        let mut out = vec![f32::NAN; 32];
        let mut config = LaunchConfig {
            grid: [1, 1, 1],
            block: [32, 1, 1],
            shared_bytes: 32 * 4,
        };
        let params = EmuSelfTestParams {
            out: out.as_mut_ptr(),
            sync: 1,
            tag: 0,
        };
        let kernel = af_emu_emu_selftest_warp_sum;
        // SAFETY: `out` holds a float for every thread, the kernel's only write.
        unsafe { launch("linear_f32", kernel, config, &params) }.unwrap();
        config.shared_bytes = super::super::MAX_SHARED_BYTES as u32;
        out.fill(f32::NAN);
        // SAFETY: as above.
        let error = unsafe { launch("linear_f32", kernel, config, &params) }.unwrap_err();
        assert!(error.to_string().contains("a GPU would refuse"), "{error}");
        assert!(out.iter().all(|v| v.is_nan()), "the kernel ran");
    }

    #[test]
    fn a_warp_intrinsic_in_a_partial_warp_is_refused() {
        assert_eq!(
            run(af_emu_emu_selftest_warp_sum, 1, 64, false).unwrap(),
            [32.0; 64]
        );
        let error = run(af_emu_emu_selftest_warp_sum, 1, 48, false).unwrap_err();
        assert!(error.to_string().contains("fewer than 32"), "{error}");
    }

    #[test]
    fn launches_on_several_threads_keep_their_own_static_shared_memory() {
        let (blocks, threads) = (24u32, 256u32);
        std::thread::scope(|scope| {
            for tag in 0..4 {
                scope.spawn(move || {
                    for _ in 0..5 {
                        let out = run_tagged(
                            af_emu_emu_selftest_static_shared,
                            blocks,
                            threads,
                            false,
                            tag,
                        )
                        .unwrap();
                        for (i, &v) in out.iter().enumerate() {
                            let want = (tag * 1000) as f32 + (i as u32 / threads) as f32;
                            assert_eq!(v, want, "launch {tag}, thread {i}");
                        }
                    }
                });
            }
        });
    }
}
