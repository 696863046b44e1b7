//! Whether a launch fits on the GPUs the fatbins ship for: a block's
//! registers and shared memory, from ptxas's report of each kernel on each
//! architecture (`build.rs`, `--resource-usage`).
//!
//! A GPU refuses a block that needs more than its SM can hold
//! (`CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES`, or an invalid argument for shared
//! memory), which the emulator alone would never show: it has no register
//! file. So the emulator checks every launch against these limits, for every
//! architecture at once, and refuses one that some GPU would refuse.

use super::LaunchConfig;
use super::MAX_SHARED_BYTES;
use super::generated::RESOURCES;

/// 32-bit registers one block may hold, on every architecture from sm_75 to
/// sm_120.
const REGISTERS_PER_BLOCK: u32 = 64 * 1024;
/// Registers are given to a warp in units of this many (per warp).
const WARP_REGISTER_UNIT: u32 = 256;

/// What one block of a kernel takes on one architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockResources {
    /// The architecture, as in `sm_90`.
    pub sm: u32,
    /// Registers per thread.
    pub registers: u32,
    /// Static (`__shared__`) shared memory in bytes; the launch adds its
    /// dynamic shared memory.
    pub static_shared_bytes: u32,
}

/// Each architecture's report of kernel `name`; empty when the crate was
/// built without nvcc (or the kernel is not one of the crate's).
pub fn of(name: &str) -> impl Iterator<Item = BlockResources> + '_ {
    RESOURCES
        .iter()
        .filter(move |(kernel, ..)| *kernel == name)
        .map(|&(_, sm, registers, static_shared_bytes)| BlockResources {
            sm,
            registers,
            static_shared_bytes,
        })
}

/// Why a block of `config` does not fit on the architecture `used`
/// describes, or `None` when it fits.
pub fn misfit(used: BlockResources, config: &LaunchConfig) -> Option<String> {
    let threads = config.block.iter().product::<u32>();
    let warps = threads.div_ceil(32);
    let per_warp = (used.registers * 32).div_ceil(WARP_REGISTER_UNIT) * WARP_REGISTER_UNIT;
    let registers = warps * per_warp;
    if registers > REGISTERS_PER_BLOCK {
        return Some(format!(
            "a block of {threads} threads at {} registers each needs {registers} registers on sm_{}, \
             more than the {REGISTERS_PER_BLOCK} a block may hold",
            used.registers, used.sm
        ));
    }
    let shared = used.static_shared_bytes as usize + config.shared_bytes as usize;
    if shared > MAX_SHARED_BYTES {
        return Some(format!(
            "a block needs {} bytes of static and {} of dynamic shared memory on sm_{}, \
             more than the {MAX_SHARED_BYTES} a launch may use",
            used.static_shared_bytes, config.shared_bytes, used.sm
        ));
    }
    None
}

/// The first reason a GPU of a shipped architecture would refuse to launch
/// kernel `name` over `config`, or `None` when every one would run it.
pub fn refusal(name: &str, config: &LaunchConfig) -> Option<String> {
    of(name).find_map(|used| misfit(used, config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(threads: u32, shared_bytes: u32) -> LaunchConfig {
        LaunchConfig {
            grid: [1, 1, 1],
            block: [threads, 1, 1],
            shared_bytes,
        }
    }

    fn used(registers: u32, static_shared_bytes: u32) -> BlockResources {
        BlockResources {
            sm: 75,
            registers,
            static_shared_bytes,
        }
    }

    #[test]
    fn registers_are_counted_per_warp_in_units_of_256() {
        // 64 × 32 = 2048 per warp, 32 warps: exactly the 65536 of a block.
        assert_eq!(misfit(used(64, 0), &block(1024, 0)), None);
        // 65 rounds up to 72 per thread (2304 per warp): 73728.
        let refused = misfit(used(65, 0), &block(1024, 0)).unwrap();
        assert!(refused.contains("73728 registers on sm_75"), "{refused}");
        // Any count a thread may have fits a block of 256.
        assert_eq!(misfit(used(255, 0), &block(256, 0)), None);
        // 28 such warps fit (64512), 29 do not; a partial warp takes a
        // whole warp's registers, so 897 threads are 29 warps.
        assert_eq!(misfit(used(65, 0), &block(896, 0)), None);
        assert!(misfit(used(65, 0), &block(897, 0)).is_some());
        // Threads count over all three block dimensions.
        let cube = LaunchConfig {
            block: [16, 8, 8],
            ..block(1, 0)
        };
        assert!(misfit(used(128, 0), &cube).is_some());
    }

    #[test]
    fn static_and_dynamic_shared_memory_count_together() {
        assert_eq!(misfit(used(32, 8704), &block(256, 40_448)), None);
        let refused = misfit(used(32, 8704), &block(256, 40_449)).unwrap();
        assert!(
            refused.contains("8704 bytes of static and 40449 of dynamic"),
            "{refused}"
        );
    }

    /// Built with nvcc, every kernel has a report for every architecture
    /// with machine code, and every launch the model makes is checked
    /// against them on the emulator (`emulator::launch`).
    #[test]
    fn every_kernel_has_a_report_for_every_architecture() {
        if !super::super::built_with_cuda() {
            eprintln!("SKIPPED: built without nvcc, so no ptxas report");
            return;
        }
        let mut archs: Vec<u32> = RESOURCES.iter().map(|&(_, sm, ..)| sm).collect();
        archs.sort_unstable();
        archs.dedup();
        assert!(!archs.is_empty(), "fatbins but no ptxas report");
        for (kernel, _) in super::super::generated::KERNELS {
            let mut found: Vec<u32> = of(kernel).map(|r| r.sm).collect();
            found.sort_unstable();
            assert_eq!(found, archs, "{kernel}");
        }
    }

    /// A real kernel's report refuses what its static shared memory leaves
    /// no room for (linear's tile takes 8704 bytes).
    #[test]
    fn a_kernels_static_shared_memory_leaves_less_for_the_launch() {
        if !super::super::built_with_cuda() {
            eprintln!("SKIPPED: built without nvcc, so no ptxas report");
            return;
        }
        assert_eq!(refusal("linear_f32", &block(256, 0)), None);
        let refused = refusal("linear_f32", &block(256, MAX_SHARED_BYTES as u32)).unwrap();
        assert!(refused.contains("bytes of static"), "{refused}");
    }
}
