//! The dataset pipeline: images decoded in parallel, batched in input
//! order, run by a pool of workers (one per device), results handed to one
//! writer in input order.
//!
//! ```text
//!  decoders (N threads) ──► batcher ──► workers (one per device) ──► writer (caller's thread)
//!        ▲                                                              │
//!        └──────────── window: at most `window` inputs past the last one written
//! ```
//!
//! Memory is bounded by the window: a decoder claims input `i` only once
//! `i < written + window`, so however slow one image or one worker is, no
//! more than `window` decoded images and results are held. Batches are
//! consecutive runs of the inputs that decoded (cut where the image size
//! changes), so they depend on the input list alone, never on timing. The
//! pool does not care what a worker drives: a CPU model, the emulator or a
//! GPU.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, Condvar, Mutex};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// One decoded, preprocessed image: `3 × h × w` normalised pixels.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub height: usize,
    pub width: usize,
    pub pixels: Vec<f32>,
}

/// How the pipeline is sized.
#[derive(Debug, Clone, Copy)]
pub struct PipelineOptions {
    /// Images per forward pass (at most).
    pub batch: usize,
    /// Decoder threads.
    pub decoders: usize,
    /// Workers (each gets its own model copy from the factory).
    pub workers: usize,
}

impl PipelineOptions {
    /// Inputs in flight past the last one written: enough for every worker
    /// to hold a batch, one more queued for each, and the next filling.
    fn window(&self) -> usize {
        self.batch * (2 * self.workers + 2) + 2 * self.decoders
    }

    fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("batch", self.batch),
            ("decoders", self.decoders),
            ("workers", self.workers),
        ] {
            if v == 0 {
                return Err(Error::InvalidArgument(format!(
                    "pipeline: {name} must be at least 1"
                )));
            }
        }
        Ok(())
    }
}

/// Which inputs decoders may claim: the next unclaimed one, while it lies
/// within the window past the last written.
struct Gate {
    state: Mutex<GateState>,
    moved: Condvar,
    len: usize,
    window: usize,
}

struct GateState {
    next: usize,
    written: usize,
    aborted: bool,
}

impl Gate {
    fn new(len: usize, window: usize) -> Self {
        Self {
            state: Mutex::new(GateState {
                next: 0,
                written: 0,
                aborted: false,
            }),
            moved: Condvar::new(),
            len,
            window,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        // A panicking thread poisons the lock; the state stays usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next input to decode; `None` when all are claimed or the run
    /// was aborted.
    fn claim(&self) -> Option<usize> {
        let mut s = self.lock();
        loop {
            if s.aborted || s.next >= self.len {
                return None;
            }
            if s.next < s.written + self.window {
                s.next += 1;
                return Some(s.next - 1);
            }
            s = self.moved.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn written(&self, written: usize) {
        self.lock().written = written;
        self.moved.notify_all();
    }

    fn abort(&self) {
        self.lock().aborted = true;
        self.moved.notify_all();
    }
}

/// A batch on its way to a worker.
struct Batch {
    slots: Vec<usize>,
    images: Tensor,
}

/// What reaches the writer.
enum Message<R> {
    /// Input `slot`'s result, or why it has none.
    Done(usize, Result<R>),
    /// A worker could not start: the run stops.
    Fatal(Error),
}

/// Runs `paths` through the pipeline. `decode` reads one image (on a
/// decoder thread); `make_worker(i)` builds worker `i` on its own thread
/// (load weights, open a device) and returns the function that runs a
/// batch, one result per image; `sink(i, result)` receives every input's
/// result **in input order**, on the calling thread.
///
/// An image that fails to decode, or whose batch fails and then fails
/// alone, reaches the sink as an `Err`: the run goes on. A worker that
/// cannot start, or an error from the sink, stops the run and is returned.
///
/// # Errors
/// [`Error::InvalidArgument`] for a zero size in `options`; the first
/// worker-start or sink error.
pub fn run_pipeline<R, W, D, F, S>(
    paths: &[PathBuf],
    options: PipelineOptions,
    decode: D,
    make_worker: F,
    mut sink: S,
) -> Result<()>
where
    R: Send,
    W: FnMut(&Tensor) -> Result<Vec<R>>,
    D: Fn(&Path) -> Result<Decoded> + Sync,
    F: Fn(usize) -> Result<W> + Sync,
    S: FnMut(usize, Result<R>) -> Result<()>,
{
    options.validate()?;
    if paths.is_empty() {
        return Ok(());
    }
    let gate = Gate::new(paths.len(), options.window());
    let (decoded_tx, decoded_rx) = channel::<(usize, Result<Decoded>)>();
    let (work_tx, work_rx) = sync_channel::<Batch>(options.workers);
    let work_rx = Arc::new(Mutex::new(work_rx));
    let (done_tx, done_rx) = channel::<Message<R>>();
    std::thread::scope(|scope| {
        for _ in 0..options.decoders {
            let (gate, decode, tx) = (&gate, &decode, decoded_tx.clone());
            scope.spawn(move || {
                lower_priority();
                while let Some(slot) = gate.claim() {
                    if tx.send((slot, decode(&paths[slot]))).is_err() {
                        return;
                    }
                }
            });
        }
        drop(decoded_tx);
        {
            let done_tx = done_tx.clone();
            scope
                .spawn(move || batcher(decoded_rx, paths.len(), options.batch, &work_tx, &done_tx));
        }
        for index in 0..options.workers {
            let (work_rx, done_tx, make_worker) =
                (Arc::clone(&work_rx), done_tx.clone(), &make_worker);
            scope.spawn(move || worker(index, make_worker, &work_rx, &done_tx));
        }
        drop(done_tx);
        drop(work_rx);
        let result = writer(done_rx, &gate, paths.len(), &mut sink);
        // Unblock every thread: decoders stop claiming; the channels the
        // writer held are gone, so workers and the batcher stop too.
        gate.abort();
        result
    })
}

/// Lowers the calling thread's scheduling priority (Linux: `nice` is per
/// thread). Decoders then run on the cores the model leaves idle (its
/// serial phases, waits at barriers, a GPU's launches) instead of
/// preempting the model's threads in the middle of a parallel region; the
/// window keeps them from falling behind for long, since an idle model
/// frees the cores they need.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain system calls on this thread's own id; a failure only
    // leaves the priority as it was.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}

/// Puts decoded images back in input order and cuts them into batches;
/// decode errors go straight to the writer.
fn batcher<R>(
    decoded: Receiver<(usize, Result<Decoded>)>,
    len: usize,
    batch: usize,
    work: &SyncSender<Batch>,
    done: &Sender<Message<R>>,
) {
    let mut waiting: BTreeMap<usize, Result<Decoded>> = BTreeMap::new();
    let mut next = 0;
    let mut slots = Vec::with_capacity(batch);
    let mut pixels: Vec<f32> = Vec::new();
    let mut size = (0, 0);
    let flush = |slots: &mut Vec<usize>, pixels: &mut Vec<f32>, size: (usize, usize)| {
        if slots.is_empty() {
            return true;
        }
        let shape = vec![slots.len(), 3, size.0, size.1];
        let images = Tensor::new(shape, std::mem::take(pixels)).expect("3×h×w per decoded image");
        work.send(Batch {
            slots: std::mem::take(slots),
            images,
        })
        .is_ok()
    };
    while next < len {
        let Ok((slot, result)) = decoded.recv() else {
            return; // aborted
        };
        waiting.insert(slot, result);
        while let Some(result) = waiting.remove(&next) {
            match result {
                Err(e) => {
                    if done.send(Message::Done(next, Err(e))).is_err() {
                        return;
                    }
                }
                Ok(image) => {
                    let this = (image.height, image.width);
                    if (!slots.is_empty() && this != size) && !flush(&mut slots, &mut pixels, size)
                    {
                        return;
                    }
                    size = this;
                    slots.push(next);
                    pixels.extend_from_slice(&image.pixels);
                    if slots.len() == batch && !flush(&mut slots, &mut pixels, size) {
                        return;
                    }
                }
            }
            next += 1;
        }
    }
    flush(&mut slots, &mut pixels, size);
}

/// Builds worker `index`, then runs batches until there are none; a batch
/// that fails is retried one image at a time, so one bad image costs only
/// itself.
fn worker<R, W, F>(
    index: usize,
    make_worker: &F,
    work: &Mutex<Receiver<Batch>>,
    done: &Sender<Message<R>>,
) where
    W: FnMut(&Tensor) -> Result<Vec<R>>,
    F: Fn(usize) -> Result<W>,
{
    let mut run = match make_worker(index) {
        Ok(run) => run,
        Err(e) => {
            let _ = done.send(Message::Fatal(e));
            return;
        }
    };
    let mut run_checked = |images: &Tensor| -> Result<Vec<R>> {
        let results = run(images)?;
        if results.len() != images.shape()[0] {
            return Err(Error::Internal(format!(
                "pipeline worker returned {} results for {} images",
                results.len(),
                images.shape()[0]
            )));
        }
        Ok(results)
    };
    loop {
        let batch = {
            let work = work.lock().unwrap_or_else(|p| p.into_inner());
            match work.recv() {
                Ok(batch) => batch,
                Err(_) => return,
            }
        };
        let outcomes: Vec<Result<R>> = match run_checked(&batch.images) {
            Ok(results) => results.into_iter().map(Ok).collect(),
            Err(e) if batch.slots.len() == 1 => vec![Err(e)],
            Err(_) => {
                let shape = batch.images.shape();
                let one = shape[1] * shape[2] * shape[3];
                batch
                    .images
                    .data()
                    .chunks_exact(one)
                    .map(|pixels| {
                        let single =
                            Tensor::new(vec![1, shape[1], shape[2], shape[3]], pixels.to_vec())?;
                        run_checked(&single).map(|mut r| r.remove(0))
                    })
                    .collect()
            }
        };
        for (slot, outcome) in batch.slots.into_iter().zip(outcomes) {
            if done.send(Message::Done(slot, outcome)).is_err() {
                return;
            }
        }
    }
}

/// Hands results to `sink` in input order and moves the gate on.
fn writer<R>(
    done: Receiver<Message<R>>,
    gate: &Gate,
    len: usize,
    sink: &mut dyn FnMut(usize, Result<R>) -> Result<()>,
) -> Result<()> {
    let mut waiting: BTreeMap<usize, Result<R>> = BTreeMap::new();
    let mut written = 0;
    while written < len {
        match done.recv() {
            Ok(Message::Done(slot, outcome)) => {
                waiting.insert(slot, outcome);
            }
            Ok(Message::Fatal(e)) => return Err(e),
            Err(_) => {
                return Err(Error::Internal(format!(
                    "pipeline stopped after {written} of {len} inputs (a worker thread ended early)"
                )));
            }
        }
        let before = written;
        while let Some(outcome) = waiting.remove(&written) {
            sink(written, outcome)?;
            written += 1;
        }
        if written != before {
            gate.written(written);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake "model": one number per image, the sum of its pixels, and an
    /// error for images whose first pixel is negative.
    fn fake_worker(_: usize) -> Result<impl FnMut(&Tensor) -> Result<Vec<f32>>> {
        Ok(|images: &Tensor| {
            let per = images.data().len() / images.shape()[0];
            let rows: Vec<&[f32]> = images.data().chunks_exact(per).collect();
            if rows.iter().any(|r| r[0] < 0.0) {
                return Err(Error::InvalidArgument("negative".into()));
            }
            Ok(rows.iter().map(|r| r.iter().sum()).collect())
        })
    }

    fn decode_name(path: &Path) -> Result<Decoded> {
        let name = path.to_str().unwrap();
        let v: f32 = name
            .parse()
            .map_err(|_| Error::InvalidArgument(format!("{name}: not a number")))?;
        // Two image sizes, so batches are cut where the size changes.
        let side = if v.abs() < 50.0 { 1 } else { 2 };
        Ok(Decoded {
            height: side,
            width: side,
            pixels: vec![v; 3 * side * side],
        })
    }

    #[test]
    fn every_input_arrives_once_in_order_whatever_the_sizes() {
        let paths: Vec<PathBuf> = (0..200)
            .map(|i| match i % 17 {
                3 => PathBuf::from(format!("bad{i}")),
                5 => PathBuf::from(format!("-{i}")),
                _ => PathBuf::from(i.to_string()),
            })
            .collect();
        let mut reference = None;
        for (batch, decoders, workers) in [(1, 1, 1), (7, 3, 2), (32, 2, 3)] {
            let mut seen = Vec::new();
            let options = PipelineOptions {
                batch,
                decoders,
                workers,
            };
            run_pipeline(&paths, options, decode_name, fake_worker, |i, r| {
                seen.push((i, r.map_err(|e| e.to_string())));
                Ok(())
            })
            .unwrap();
            assert_eq!(seen.len(), paths.len());
            assert!(seen.iter().enumerate().all(|(i, (slot, _))| i == *slot));
            assert!(seen[3].1.as_ref().unwrap_err().contains("not a number"));
            assert!(seen[5].1.as_ref().unwrap_err().contains("negative"));
            match &reference {
                None => reference = Some(seen),
                Some(r) => assert_eq!(r, &seen, "batch {batch}, workers {workers}"),
            }
        }
    }

    #[test]
    fn a_worker_that_cannot_start_stops_the_run() {
        let paths: Vec<PathBuf> = (0..50).map(|i| PathBuf::from(i.to_string())).collect();
        let options = PipelineOptions {
            batch: 4,
            decoders: 2,
            workers: 2,
        };
        let result = run_pipeline(
            &paths,
            options,
            decode_name,
            |i| {
                if i == 1 {
                    Err(Error::Unsupported("no such GPU".into()))
                } else {
                    fake_worker(i)
                }
            },
            |_, _| Ok(()),
        );
        assert!(result.unwrap_err().to_string().contains("no such GPU"));
        // A sink error stops it too.
        let result = run_pipeline(&paths, options, decode_name, fake_worker, |i, _| {
            if i == 20 {
                Err(Error::InvalidArgument("disk full".into()))
            } else {
                Ok(())
            }
        });
        assert!(result.unwrap_err().to_string().contains("disk full"));
    }
}
