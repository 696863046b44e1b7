//! A flat wall-clock profile of the forward pass, by op.
//!
//! Off by default: a [`scope`] then costs one atomic load (and the check of
//! its NVTX range: every scope is one, [`crate::nvtx`]). `autofocus bench
//! --profile` turns it on and prints where the time went.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<&'static str, (Duration, u64)>> = Mutex::new(BTreeMap::new());

/// Starts (or stops) collecting op timings.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// True while op timings are collected.
pub fn is_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Times the enclosing block under `name` until the guard drops.
#[must_use = "the scope ends when the guard drops"]
pub fn scope(name: &'static str) -> Scope {
    Scope {
        name,
        start: ENABLED.load(Ordering::Relaxed).then(Instant::now),
        _range: crate::nvtx::range(name),
    }
}

/// Runs `f` inside a [`scope`] called `name`.
pub fn timed<T>(name: &'static str, f: impl FnOnce() -> T) -> T {
    let _scope = scope(name);
    f()
}

/// Guard returned by [`scope`].
pub struct Scope {
    name: &'static str,
    start: Option<Instant>,
    _range: crate::nvtx::Range,
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some(start) = self.start {
            let elapsed = start.elapsed();
            let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
            let entry = totals.entry(self.name).or_default();
            entry.0 += elapsed;
            entry.1 += 1;
        }
    }
}

/// One op's share of the profile.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OpTime {
    pub op: &'static str,
    pub ms: f64,
    pub calls: u64,
}

/// Returns the timings collected so far, largest first, and clears them.
pub fn take() -> Vec<OpTime> {
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let mut ops: Vec<OpTime> = std::mem::take(&mut *totals)
        .into_iter()
        .map(|(op, (d, calls))| OpTime {
            op,
            ms: d.as_secs_f64() * 1e3,
            calls,
        })
        .collect();
    ops.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    ops
}
