//! The classifier's forward as one CUDA graph per input shape (issue #12):
//! the first forward at a shape runs its kernels one by one (loading them,
//! and building what is cached per shape: the stage-0 layout, the constant
//! tables, cuBLASLt's plans); the second records the same launches into a
//! graph, between an upload into a fixed input buffer and a read-back from
//! fixed output buffers; every later forward at that shape uploads its
//! images, replays the graph and reads its logits. A forward reads nothing
//! back before its results (the selection check is a flag read with them),
//! so nothing in it prevents the capture (a table a cache dropped since the
//! warm-up would be uploaded: refused while recording, and tried again
//! after one more forward as launches); if the capture fails twice or a
//! replay fails, that shape goes back to plain launches, said once. A
//! stream of batches ([`super::pipeline`]) replays the same graphs with its
//! images already on the device, copied in and out on the device.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{DeviceHead, DeviceModel, GridLayout, SelectionCheck};
use crate::error::{Error, Result};
use crate::gpu::{Buffer, Device, Element, Graph};
use crate::tensor::Tensor;

/// (batch, height, width) of the images.
type Shape = (usize, usize, usize);

/// The graphs of one [`DeviceModel`].
pub(super) struct Graphs<T: Element> {
    enabled: AtomicBool,
    replays: AtomicU64,
    /// Held through a capture or a replay: one forward at a time uses a
    /// shape's buffers, and the driver wants one graph used by one thread.
    by_shape: Mutex<HashMap<Shape, State<T>>>,
}

enum State<T: Element> {
    /// A forward ran as launches: the next one records (after one failed
    /// capture, a second try, since what the warm-up cached may have been
    /// evicted between the shape's forwards).
    WarmedUp {
        failed_captures: u8,
    },
    Ready(Box<Recorded<T>>),
    /// Capture or replay failed: plain launches for this shape.
    Failed,
}

/// A recorded forward and what its launches read and write.
struct Recorded<T: Element> {
    graph: Graph,
    pixels: Buffer<T>,
    logits: Buffer<T>,
    check: SelectionCheck,
    /// The stage-0 layouts and constant tables the graph reads, kept
    /// alive with it (the caches may drop their own references).
    _layouts: Vec<Arc<GridLayout>>,
    _constants: Vec<Arc<dyn Any + Send + Sync>>,
}

impl<T: Element> Graphs<T> {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled: AtomicBool::new(enabled),
            replays: AtomicU64::new(0),
            by_shape: Mutex::default(),
        }
    }

    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    pub fn replays(&self) -> u64 {
        self.replays.load(Ordering::Relaxed)
    }
}

/// The logits of `images` (of `shape`) through the shape's graph, or
/// `None` when this forward is to run as plain launches (graphs off, the
/// shape's first forward, or a shape whose graph failed).
///
/// # Errors
/// The selection check's, and device errors outside the graph (the upload
/// of the images, the read-back).
pub(super) fn forward<T: Element>(
    model: &DeviceModel<'_, T>,
    images: &Tensor,
    shape: Shape,
) -> Result<Option<Tensor>> {
    replay(
        model,
        shape,
        |device, input| device.upload_into(input, &DeviceModel::<T>::pixels(images)),
        |_, recorded| model.read_logits(&recorded.logits, &recorded.check, shape.0),
    )
}

/// As [`forward`] for images already on the device (`pixels`, of
/// `shape`), results left there: on a replay the images are copied into
/// the graph's input, and its logits and selection flag out into `logits`
/// and `check`, all in order on the device. Returns false when this
/// forward is to run as plain launches (as [`forward`]'s `None`).
///
/// # Errors
/// Device errors of the copies.
pub(super) fn launch_from<T: Element>(
    model: &DeviceModel<'_, T>,
    pixels: &Buffer<T>,
    shape: Shape,
    logits: &mut Buffer<T>,
    check: &mut SelectionCheck,
) -> Result<bool> {
    let replayed = replay(
        model,
        shape,
        |device, input| device.copy_into(input, pixels),
        |device, recorded| {
            device.copy_into(logits, &recorded.logits)?;
            device.copy_into(&mut check.mismatch, &recorded.check.mismatch)
        },
    )?;
    Ok(replayed.is_some())
}

/// Under the shape's lock: `fill`s the graph's input, replays the graph
/// and `finish`es with its outputs; records the graph at the shape's second
/// forward. `None` when this forward is to run as plain launches.
fn replay<T: Element, R>(
    model: &DeviceModel<'_, T>,
    shape: Shape,
    fill: impl FnOnce(&Device, &mut Buffer<T>) -> Result<()>,
    finish: impl FnOnce(&Device, &Recorded<T>) -> Result<R>,
) -> Result<Option<R>> {
    let graphs = &model.graphs;
    if !graphs.enabled.load(Ordering::Relaxed) {
        return Ok(None);
    }
    let mut by_shape = graphs.by_shape.lock().unwrap_or_else(|e| e.into_inner());
    // The shape's first forward runs as launches: the warm-up that loads
    // and caches what the graph will only read.
    let Some(state) = by_shape.get_mut(&shape) else {
        by_shape.insert(shape, State::WarmedUp { failed_captures: 0 });
        return Ok(None);
    };
    if let State::WarmedUp { failed_captures } = *state {
        *state = match record(model, shape) {
            Ok(recorded) => State::Ready(Box::new(recorded)),
            // This forward's launches cache what the capture missed.
            Err(_) if failed_captures == 0 => State::WarmedUp { failed_captures: 1 },
            Err(e) => {
                eprintln!(
                    "autofocus: no CUDA graph for images {shape:?} ({e}); their forwards run as \
                     launches"
                );
                State::Failed
            }
        };
    }
    let State::Ready(recorded) = state else {
        return Ok(None);
    };
    let device = model.device();
    fill(device, &mut recorded.pixels)?;
    if let Err(e) = device.launch_graph(&recorded.graph) {
        eprintln!("autofocus: the CUDA graph for images {shape:?} failed ({e}); launches instead");
        *state = State::Failed;
        return Ok(None);
    }
    graphs.replays.fetch_add(1, Ordering::Relaxed);
    finish(device, recorded).map(Some)
}

/// Records the forward of images of `shape` into a graph over fixed
/// buffers, which every replay uses (the input's is filled before each).
fn record<T: Element>(model: &DeviceModel<'_, T>, shape: Shape) -> Result<Recorded<T>> {
    let device = model.device();
    let DeviceHead::Classifier { head, .. } = &model.head else {
        return Err(Error::Unsupported(
            "a graph records the classifier's forward; this is a backbone".into(),
        ));
    };
    let (b, height, width) = shape;
    let pixels = device.alloc::<T>(b * 3 * height * width)?;
    let mut logits = device.alloc::<T>(b * head.out_dim)?;
    let mut check = SelectionCheck::new(device)?;
    let graph = device.capture(|| {
        check.reset(device)?;
        let (x, grid) = model.embed_pixels(&pixels, (b, height, width))?;
        model.classify(x, grid, &mut None, &mut check, &mut logits)
    })?;
    let layouts = model
        .grid_layouts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .cloned()
        .collect();
    Ok(Recorded {
        graph,
        pixels,
        logits,
        check,
        _layouts: layouts,
        _constants: device.constants_in_use(),
    })
}
