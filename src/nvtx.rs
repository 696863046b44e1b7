//! NVTX ranges, so that Nsight Systems and Nsight Compute attribute time to
//! stages, blocks and ops. Ranges nest: block 0's attention kernel in stage 1
//! runs inside `stage1`, `block0` and `attn.cluster_attention`, which ncu
//! selects with `--nvtx --nvtx-include "stage1/block0/attn.cluster_attention/"`.
//! Every [`crate::profile`] scope is a range; stages and blocks open theirs
//! with [`range_with`].
//!
//! The calls go through `src/nvtx_shim.c`, compiled with the vendored NVTX3
//! headers (`third_party/nvtx3`). A profiler attaches through the environment
//! variable `NVTX_INJECTION64_PATH`, read once here: without it a range costs
//! two thread-local reads and makes no call at all.

use std::cell::{Cell, RefCell};
use std::ffi::{CString, c_char, c_int};
use std::sync::OnceLock;

unsafe extern "C" {
    fn autofocus_nvtx_range_push(message: *const c_char) -> c_int;
    fn autofocus_nvtx_range_pop() -> c_int;
}

thread_local! {
    /// Calls NVTX on this thread even without a profiler (tests of the shim).
    static FORCED: Cell<bool> = const { Cell::new(false) };
    /// This thread's recorder, while [`record`] runs.
    static RECORDER: RefCell<Option<Recorder>> = const { RefCell::new(None) };
}

#[derive(Default)]
struct Recorder {
    /// The names of the ranges open now, outermost first.
    open: Vec<String>,
    /// The path of every range opened, in order.
    opened: Vec<String>,
}

/// True when a profiler can be attached: it sets `NVTX_INJECTION64_PATH`.
fn profiler_attached() -> bool {
    static ATTACHED: OnceLock<bool> = OnceLock::new();
    *ATTACHED.get_or_init(|| std::env::var_os("NVTX_INJECTION64_PATH").is_some())
}

fn native() -> bool {
    FORCED.get() || profiler_attached()
}

fn recording() -> bool {
    RECORDER.with(|r| r.borrow().is_some())
}

/// An open range: it ends when dropped, on the thread that opened it.
#[must_use = "the range ends when the guard drops"]
pub struct Range {
    native: bool,
    recorded: bool,
    /// Ranges nest per thread: the guard must not move to another thread.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Range {
    const NONE: Self = Self {
        native: false,
        recorded: false,
        _not_send: std::marker::PhantomData,
    };
}

/// Opens a range called `name`.
pub fn range(name: &str) -> Range {
    let (native, recording) = (native(), recording());
    if !native && !recording {
        return Range::NONE;
    }
    open(name, native, recording)
}

/// Opens a range whose name is built only when someone is listening.
pub fn range_with(name: impl FnOnce() -> String) -> Range {
    let (native, recording) = (native(), recording());
    if !native && !recording {
        return Range::NONE;
    }
    open(&name(), native, recording)
}

fn open(name: &str, native: bool, recording: bool) -> Range {
    if native {
        // A name with a NUL byte (never one of ours) is cut there.
        let message =
            CString::new(name.split('\0').next().unwrap_or_default()).expect("no NUL byte is left");
        // SAFETY: a live NUL-terminated string; NVTX copies what it keeps.
        unsafe { autofocus_nvtx_range_push(message.as_ptr()) };
    }
    if recording {
        RECORDER.with(|r| {
            if let Some(recorder) = r.borrow_mut().as_mut() {
                recorder.open.push(name.to_string());
                recorder.opened.push(recorder.open.join("/"));
            }
        });
    }
    Range {
        native,
        recorded: recording,
        _not_send: std::marker::PhantomData,
    }
}

impl Drop for Range {
    fn drop(&mut self) {
        if self.native {
            // SAFETY: pops the range this guard pushed on this thread.
            unsafe { autofocus_nvtx_range_pop() };
        }
        if self.recorded {
            RECORDER.with(|r| {
                if let Some(recorder) = r.borrow_mut().as_mut() {
                    recorder.open.pop();
                }
            });
        }
    }
}

/// Runs `f` and returns, with its result, the path of every range it
/// opened on this thread (`stage1/block0/mlp`), in order, and the ranges
/// left open at its end (none, when every guard dropped). For tests.
#[doc(hidden)]
pub fn record<T>(f: impl FnOnce() -> T) -> (T, Vec<String>, usize) {
    RECORDER.with(|r| *r.borrow_mut() = Some(Recorder::default()));
    let result = f();
    let recorder = RECORDER.with(|r| r.borrow_mut().take()).unwrap_or_default();
    (result, recorder.opened, recorder.open.len())
}

/// Makes every range on this thread call NVTX, profiler or not. For tests
/// of the shim.
#[doc(hidden)]
pub fn force_native(on: bool) {
    FORCED.set(on);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_nest_into_paths() {
        let ((), opened, left_open) = record(|| {
            let _stage = range_with(|| format!("stage{}", 1));
            {
                let _block = range("block0");
                let _op = range("attn.qkv");
            }
            let _merge = range("merge.selection");
        });
        assert_eq!(
            opened,
            [
                "stage1",
                "stage1/block0",
                "stage1/block0/attn.qkv",
                "stage1/merge.selection"
            ]
        );
        assert_eq!(left_open, 0);
    }

    #[test]
    fn without_a_listener_a_name_is_never_built() {
        let range = range_with(|| unreachable!("no profiler and no recorder"));
        assert!(!range.native && !range.recorded);
    }

    #[test]
    fn the_shim_takes_pushes_and_pops_without_a_profiler() {
        // No NVTX_INJECTION64_PATH here: NVTX finds no tool on the first
        // call and makes every call a no-op. This runs that path for real.
        force_native(true);
        for depth in 0..3 {
            let _outer = range_with(|| format!("outer{depth}"));
            let inner = range("inner");
            assert!(inner.native);
        }
        force_native(false);
    }
}
