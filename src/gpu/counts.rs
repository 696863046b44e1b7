//! What a device was asked to do, counted: kernel launches, library GEMMs,
//! zero fills, allocations and copies (host to device, device to host,
//! device to device). `bench --json` reports them per
//! forward (the same on the emulator as on a GPU, since both run the same
//! calls), which is how launches per forward are compared before and after
//! a change, and what a CUDA graph would replay.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Running totals of one device (shared by its clones).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    kernel_launches: AtomicU64,
    library_gemms: AtomicU64,
    zero_fills: AtomicU64,
    allocations: AtomicU64,
    uploads: AtomicU64,
    downloads: AtomicU64,
    device_copies: AtomicU64,
    graph_launches: AtomicU64,
    host_waits: AtomicU64,
}

/// A device's running totals at one moment; subtract two for what happened
/// between them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeviceCounts {
    /// This crate's kernels launched.
    pub kernel_launches: u64,
    /// cuBLASLt products (each a launch or a few, in the library).
    pub library_gemms: u64,
    /// Buffers zeroed (a memset each on a GPU).
    pub zero_fills: u64,
    /// Buffers allocated for kernels to fill (no memset).
    pub allocations: u64,
    /// Host-to-device copies.
    pub uploads: u64,
    /// Device-to-host copies (each one waits for the device).
    pub downloads: u64,
    /// Device-to-device copies.
    pub device_copies: u64,
    /// CUDA graphs replayed (each stands for the launches it recorded,
    /// which are not counted again).
    pub graph_launches: u64,
    /// Waits of the host for an asynchronous copy from or into a
    /// page-locked buffer before it touches the buffer.
    pub host_waits: u64,
}

/// One of the counted events.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Event {
    KernelLaunch,
    LibraryGemm,
    ZeroFill,
    Allocation,
    Upload,
    Download,
    DeviceCopy,
    GraphLaunch,
    HostWait,
}

impl Counters {
    pub fn count(&self, event: Event) {
        let counter = match event {
            Event::KernelLaunch => &self.kernel_launches,
            Event::LibraryGemm => &self.library_gemms,
            Event::ZeroFill => &self.zero_fills,
            Event::Allocation => &self.allocations,
            Event::Upload => &self.uploads,
            Event::Download => &self.downloads,
            Event::DeviceCopy => &self.device_copies,
            Event::GraphLaunch => &self.graph_launches,
            Event::HostWait => &self.host_waits,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> DeviceCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DeviceCounts {
            kernel_launches: get(&self.kernel_launches),
            library_gemms: get(&self.library_gemms),
            zero_fills: get(&self.zero_fills),
            allocations: get(&self.allocations),
            uploads: get(&self.uploads),
            downloads: get(&self.downloads),
            device_copies: get(&self.device_copies),
            graph_launches: get(&self.graph_launches),
            host_waits: get(&self.host_waits),
        }
    }
}

impl std::ops::Sub for DeviceCounts {
    type Output = Self;

    /// The events between two snapshots (`self` the later).
    fn sub(self, earlier: Self) -> Self {
        Self {
            kernel_launches: self.kernel_launches - earlier.kernel_launches,
            library_gemms: self.library_gemms - earlier.library_gemms,
            zero_fills: self.zero_fills - earlier.zero_fills,
            allocations: self.allocations - earlier.allocations,
            uploads: self.uploads - earlier.uploads,
            downloads: self.downloads - earlier.downloads,
            device_copies: self.device_copies - earlier.device_copies,
            graph_launches: self.graph_launches - earlier.graph_launches,
            host_waits: self.host_waits - earlier.host_waits,
        }
    }
}

impl DeviceCounts {
    /// Each count divided by `n` (rounded down): per forward over `n`.
    pub fn per(self, n: u64) -> Self {
        let n = n.max(1);
        Self {
            kernel_launches: self.kernel_launches / n,
            library_gemms: self.library_gemms / n,
            zero_fills: self.zero_fills / n,
            allocations: self.allocations / n,
            uploads: self.uploads / n,
            downloads: self.downloads / n,
            device_copies: self.device_copies / n,
            graph_launches: self.graph_launches / n,
            host_waits: self.host_waits / n,
        }
    }
}
