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

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError, channel, sync_channel};
use std::sync::{Arc, Condvar, Mutex, TryLockError};

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

/// A batch on its way to a worker (the images shared with the worker's
/// stream, so that a failed batch can be run again).
struct Batch {
    slots: Vec<usize>,
    images: Arc<Tensor>,
}

/// What a pipeline worker runs: batches of images in, one result per
/// image out. Any `FnMut(&Tensor) -> Result<Vec<R>>` is one.
pub trait BatchWorker<R> {
    /// The results of one batch, one per image, in order.
    ///
    /// # Errors
    /// Whatever the model returns; the pipeline then runs the batch's
    /// images one at a time.
    fn run(&mut self, images: &Tensor) -> Result<Vec<R>>;

    /// Runs every batch of `batches` in order, handing each one's results
    /// to `each` in order; an item `None` asks for every batch taken so
    /// far to be handed over before the next is waited for. A worker that
    /// overlaps batches (a device copying the next one in while it
    /// computes this one) overrides this; the default runs
    /// [`run`](Self::run) on each in turn.
    ///
    /// # Errors
    /// The first error of a batch or of `each`: the batches not handed to
    /// `each` by then are run again one by one with [`run`](Self::run).
    fn run_stream(
        &mut self,
        batches: &mut dyn Iterator<Item = Option<Arc<Tensor>>>,
        each: &mut dyn FnMut(Vec<R>) -> Result<()>,
    ) -> Result<()> {
        for images in batches.flatten() {
            each(self.run(&images)?)?;
        }
        Ok(())
    }
}

impl<R, F: FnMut(&Tensor) -> Result<Vec<R>>> BatchWorker<R> for F {
    fn run(&mut self, images: &Tensor) -> Result<Vec<R>> {
        self(images)
    }
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
/// (load weights, open a device) and returns what runs its batches (a
/// [`BatchWorker`]: a function from a batch to one result per image, or a
/// worker that streams batches); `sink(i, result)` receives every input's
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
    W: BatchWorker<R>,
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
            images: Arc::new(images),
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

/// Builds worker `index`, then streams batches through it until there are
/// none. When the stream stops at an error, the batches it had taken but
/// not finished are run again one by one, and a batch that fails again is
/// retried one image at a time, so one bad image costs only itself.
fn worker<R, W, F>(
    index: usize,
    make_worker: &F,
    work: &Mutex<Receiver<Batch>>,
    done: &Sender<Message<R>>,
) where
    W: BatchWorker<R>,
    F: Fn(usize) -> Result<W>,
{
    let mut run = match make_worker(index) {
        Ok(run) => run,
        Err(e) => {
            let _ = done.send(Message::Fatal(e));
            return;
        }
    };
    // Batches the stream has taken and not yet finished, oldest first.
    let taken: RefCell<VecDeque<Batch>> = RefCell::new(VecDeque::new());
    let writer_gone = Cell::new(false);
    let send = |slots: Vec<usize>, outcomes: Vec<Result<R>>| {
        for (slot, outcome) in slots.into_iter().zip(outcomes) {
            if done.send(Message::Done(slot, outcome)).is_err() {
                writer_gone.set(true);
                return Err(Error::Internal("pipeline writer gone".into()));
            }
        }
        Ok(())
    };
    loop {
        let mut next = std::iter::from_fn(|| {
            let batch = if taken.borrow().is_empty() {
                let work = work.lock().unwrap_or_else(|p| p.into_inner());
                work.recv().ok()?
            } else {
                // Never wait holding batches: until the writer has their
                // results the decoders may not run further ahead, so a
                // wait for the next batch (or for the worker that waits
                // for it) could last for ever. Hand them over first.
                let work = match work.try_lock() {
                    Ok(work) => work,
                    Err(TryLockError::Poisoned(p)) => p.into_inner(),
                    Err(TryLockError::WouldBlock) => return Some(None),
                };
                match work.try_recv() {
                    Ok(batch) => batch,
                    Err(TryRecvError::Empty) => return Some(None),
                    Err(TryRecvError::Disconnected) => return None,
                }
            };
            let images = Arc::clone(&batch.images);
            taken.borrow_mut().push_back(batch);
            Some(Some(images))
        });
        let mut each = |results: Vec<R>| {
            let batch = taken
                .borrow_mut()
                .pop_front()
                .ok_or_else(|| Error::Internal("pipeline worker: results of no batch".into()))?;
            let count = batch.slots.len();
            if results.len() != count {
                // Put it back: it is run again, alone.
                taken.borrow_mut().push_front(batch);
                return Err(wrong_count(results.len(), count));
            }
            send(batch.slots, results.into_iter().map(Ok).collect())
        };
        let streamed = run.run_stream(&mut next, &mut each);
        if streamed.is_ok() || writer_gone.get() {
            return;
        }
        let mut unfinished: Vec<Batch> = taken.borrow_mut().drain(..).collect();
        if unfinished.is_empty() {
            // The stream failed before it took a batch: run the next one
            // alone, so that every failure moves the run on.
            match work.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                Ok(batch) => unfinished.push(batch),
                Err(_) => return,
            }
        }
        for batch in unfinished {
            let outcomes = run_alone(&mut run, &batch.images);
            if send(batch.slots, outcomes).is_err() {
                return;
            }
        }
    }
}

fn wrong_count(results: usize, images: usize) -> Error {
    Error::Internal(format!(
        "pipeline worker returned {results} results for {images} images"
    ))
}

/// The outcome of every image of `images`: the batch's results, or, if the
/// batch fails, each image's own.
fn run_alone<R>(run: &mut impl BatchWorker<R>, images: &Tensor) -> Vec<Result<R>> {
    let mut run_checked = |images: &Tensor| -> Result<Vec<R>> {
        let results = run.run(images)?;
        let count = images.shape()[0];
        if results.len() != count {
            return Err(wrong_count(results.len(), count));
        }
        Ok(results)
    };
    let shape = images.shape();
    match run_checked(images) {
        Ok(results) => results.into_iter().map(Ok).collect(),
        Err(e) if shape[0] == 1 => vec![Err(e)],
        Err(_) => {
            let one = shape[1] * shape[2] * shape[3];
            images
                .data()
                .chunks_exact(one)
                .map(|pixels| {
                    let single =
                        Tensor::new(vec![1, shape[1], shape[2], shape[3]], pixels.to_vec())?;
                    run_checked(&single).map(|mut r| r.remove(0))
                })
                .collect()
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
    // Every input is written, perhaps by the other workers before one
    // could even start: that one still fails the run. (The channel closes
    // when every worker has ended, which the caller waits for anyway.)
    for message in done {
        if let Message::Fatal(e) = message {
            return Err(e);
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

    /// The fake model as a device would stream it: up to two batches held
    /// before the oldest one's results are handed over (a batch's error
    /// shows when its results would be), everything held handed over on
    /// `None` and at the end.
    type FakeModel = Box<dyn FnMut(&Tensor) -> Result<Vec<f32>> + Send>;

    struct Streaming {
        model: FakeModel,
        streamed: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl BatchWorker<f32> for Streaming {
        fn run(&mut self, images: &Tensor) -> Result<Vec<f32>> {
            (self.model)(images)
        }

        fn run_stream(
            &mut self,
            batches: &mut dyn Iterator<Item = Option<Arc<Tensor>>>,
            each: &mut dyn FnMut(Vec<f32>) -> Result<()>,
        ) -> Result<()> {
            let mut held: VecDeque<Arc<Tensor>> = VecDeque::new();
            let mut hand_over = |images: Arc<Tensor>, model: &mut Self| {
                model
                    .streamed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                each((model.model)(&images)?)
            };
            for next in batches {
                match next {
                    None => {
                        while let Some(images) = held.pop_front() {
                            hand_over(images, self)?;
                        }
                    }
                    Some(images) => {
                        if held.len() == 2 {
                            let oldest = held.pop_front().unwrap();
                            hand_over(oldest, self)?;
                        }
                        held.push_back(images);
                    }
                }
            }
            while let Some(images) = held.pop_front() {
                hand_over(images, self)?;
            }
            Ok(())
        }
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
        // Streaming workers give the same, in order, the batches held at
        // a failure run again; and never wait for a batch while holding
        // results (that can deadlock: a watchdog turns it into a failure).
        let reference = reference.unwrap();
        let (finished_tx, finished) = channel();
        std::thread::spawn(move || {
            for (batch, decoders, workers) in [(1, 1, 1), (3, 2, 1), (7, 3, 2), (2, 1, 3)] {
                let streamed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                let make = |i| {
                    Ok(Streaming {
                        model: Box::new(fake_worker(i)?),
                        streamed: Arc::clone(&streamed),
                    })
                };
                let options = PipelineOptions {
                    batch,
                    decoders,
                    workers,
                };
                let mut seen = Vec::new();
                run_pipeline(&paths, options, decode_name, make, |i, r| {
                    seen.push((i, r.map_err(|e| e.to_string())));
                    Ok(())
                })
                .unwrap();
                assert_eq!(
                    reference, seen,
                    "streaming, batch {batch}, workers {workers}"
                );
                assert!(streamed.load(std::sync::atomic::Ordering::Relaxed) > 0);
            }
            finished_tx.send(()).unwrap();
        });
        finished
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("the streaming runs finish (no deadlock, no failure)");
    }

    /// A worker whose stream always fails at once still gets every batch
    /// run, one at a time.
    #[test]
    fn a_stream_that_fails_before_taking_a_batch_still_moves_on() {
        struct NeverStreams(FakeModel);
        impl BatchWorker<f32> for NeverStreams {
            fn run(&mut self, images: &Tensor) -> Result<Vec<f32>> {
                (self.0)(images)
            }
            fn run_stream(
                &mut self,
                _: &mut dyn Iterator<Item = Option<Arc<Tensor>>>,
                _: &mut dyn FnMut(Vec<f32>) -> Result<()>,
            ) -> Result<()> {
                Err(Error::Unsupported("no stream here".into()))
            }
        }
        let paths: Vec<PathBuf> = (0..30).map(|i| PathBuf::from(i.to_string())).collect();
        let options = PipelineOptions {
            batch: 4,
            decoders: 2,
            workers: 2,
        };
        let make = |i| Ok(NeverStreams(Box::new(fake_worker(i)?)));
        let mut seen = Vec::new();
        run_pipeline(&paths, options, decode_name, make, |i, r| {
            seen.push((i, r.unwrap()));
            Ok(())
        })
        .unwrap();
        let want: Vec<(usize, f32)> = (0..30).map(|i| (i, 3.0 * i as f32)).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn a_worker_that_cannot_start_stops_the_run() {
        let paths: Vec<PathBuf> = (0..50).map(|i| PathBuf::from(i.to_string())).collect();
        let options = PipelineOptions {
            batch: 4,
            decoders: 2,
            workers: 2,
        };
        // Also when the other worker has done everything before it fails.
        for delay_ms in [0, 300] {
            let result = run_pipeline(
                &paths,
                options,
                decode_name,
                |i| {
                    if i == 1 {
                        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
                        Err(Error::Unsupported("no such GPU".into()))
                    } else {
                        fake_worker(i)
                    }
                },
                |_, _| Ok(()),
            );
            assert!(result.unwrap_err().to_string().contains("no such GPU"));
        }
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
