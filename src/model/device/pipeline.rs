//! A stream of batches with the copies overlapping the kernels (issue #12
//! item 3): two sets of buffers (slots) that batches alternate between.
//! For batch `k` in slot `k mod 2`:
//! 1. the host writes its images into the slot's page-locked input
//!    buffer (while the device computes batch `k − 1`);
//! 2. the transfer stream uploads them to the slot's device input;
//! 3. the kernels' stream waits for that upload, runs the forward (the
//!    shape's CUDA graph when it has one, [`super::graph::launch_from`]) into
//!    the slot's logits and selection flag, and marks its end;
//! 4. the transfer stream waits for that mark and reads the logits and
//!    the flag back into the slot's page-locked output buffers.
//!
//! Before batch `k` takes slot `k mod 2`, batch `k − 2`'s results are
//! collected from it (handed to the caller, in order): by then the device
//! has batch `k − 1` queued, so it never waits for the host, and no copy
//! reuses a buffer that a kernel or another copy still reads.

use std::borrow::Borrow;
use std::collections::VecDeque;

use rayon::prelude::*;

use super::{DeviceHead, DeviceModel, SelectionCheck, graph};
use crate::error::{Error, Result};
use crate::gpu::{Buffer, Element, HostBuffer, HostUse};
use crate::model::image_batch_shape;
use crate::tensor::Tensor;

/// (batch, height, width) of the images.
type Shape = (usize, usize, usize);

/// One set of buffers a batch goes through.
struct Slot<T: Element> {
    shape: Shape,
    classes: usize,
    /// The images, as the host writes them and as the device reads them.
    pixels_host: HostBuffer<T>,
    pixels: Buffer<T>,
    logits: Buffer<T>,
    check: SelectionCheck,
    /// The results, as read back.
    logits_host: HostBuffer<T>,
    flag_host: HostBuffer<i32>,
}

impl<T: Element> Slot<T> {
    fn new(model: &DeviceModel<'_, T>, shape: Shape, classes: usize) -> Result<Self> {
        let device = model.device();
        let (b, height, width) = shape;
        let pixels = b * 3 * height * width;
        let slot = Self {
            shape,
            classes,
            pixels_host: device.host_buffer(pixels, HostUse::Upload)?,
            pixels: device.alloc(pixels)?,
            logits: device.alloc(b * classes)?,
            check: SelectionCheck::new(device)?,
            logits_host: device.host_buffer(b * classes, HostUse::Download)?,
            flag_host: device.host_buffer(1, HostUse::Download)?,
        };
        // The device buffers are allocated in the kernels' stream order;
        // the transfer stream may use them only once that has happened.
        device.synchronize()?;
        Ok(slot)
    }

    /// Queues `images` (of the slot's shape) through the slot: upload,
    /// forward, read-back; nothing waits for the device.
    fn submit(&mut self, model: &DeviceModel<'_, T>, images: &Tensor) -> Result<()> {
        let device = model.device();
        let host = device.host_mut(&mut self.pixels_host)?;
        // In parallel: at batch 256 this is 38.5M values, a conversion that
        // would otherwise take longer than the device's forward.
        const CHUNK: usize = 1 << 16;
        host.par_chunks_mut(CHUNK)
            .zip(images.data().par_chunks(CHUNK))
            .for_each(|(dst, src)| {
                for (dst, &v) in dst.iter_mut().zip(src) {
                    *dst = T::from_f32(v);
                }
            });
        let uploaded = device.upload_async(&mut self.pixels_host, &mut self.pixels)?;
        device.wait_for(&uploaded)?;
        let replayed = graph::launch_from(
            model,
            &self.pixels,
            self.shape,
            &mut self.logits,
            &mut self.check,
        )?;
        if !replayed {
            self.check.reset(device)?;
            let (x, grid) = model.embed_pixels(&self.pixels, self.shape)?;
            model.classify(x, grid, &mut None, &mut self.check, &mut self.logits)?;
        }
        let computed = device.mark()?;
        device.download_async(&self.logits, &mut self.logits_host, &computed)?;
        device.download_async(&self.check.mismatch, &mut self.flag_host, &computed)
    }

    /// The logits of the slot's last batch, once read back and checked.
    fn collect(&mut self, model: &DeviceModel<'_, T>) -> Result<Tensor> {
        let device = model.device();
        if device.host_ref(&mut self.flag_host)?.first() != Some(&0) {
            return Err(SelectionCheck::mismatch_error());
        }
        let logits = device.host_ref(&mut self.logits_host)?;
        Tensor::new(
            vec![self.shape.0, self.classes],
            logits.iter().map(|&v| v.to_f32()).collect(),
        )
    }
}

impl<T: Element> DeviceModel<'_, T> {
    /// The logits of every batch of `batches` (each b×3×H×W, normalised;
    /// sizes may differ; owned or borrowed), handed to `each` in order, as
    /// [`forward`](Self::forward) would give them: on a GPU, the next
    /// batch's images are uploaded and the last one's logits read back
    /// while the kernels run, from page-locked memory on a second stream.
    /// At most two batches are in flight; `each` runs while the device
    /// computes the next.
    ///
    /// # Errors
    /// The first error of `batches`, of a batch (as
    /// [`forward`](Self::forward)) or of `each`; the batches before it
    /// have been handed to `each`, none after.
    pub fn forward_batches<I, B>(
        &self,
        batches: I,
        each: impl FnMut(Tensor) -> Result<()>,
    ) -> Result<()>
    where
        I: IntoIterator<Item = Result<B>>,
        B: Borrow<Tensor>,
    {
        self.forward_stream(batches.into_iter().map(|b| b.map(Some)), each)
    }

    /// [`forward_batches`](Self::forward_batches) for a source that may
    /// have to wait for its next batch: an item `None` hands every batch in
    /// flight to `each` first (the buffers stay allocated), so that a
    /// caller about to wait holds no finished results back.
    ///
    /// # Errors
    /// As [`forward_batches`](Self::forward_batches).
    pub fn forward_stream<I, B>(
        &self,
        batches: I,
        mut each: impl FnMut(Tensor) -> Result<()>,
    ) -> Result<()>
    where
        I: IntoIterator<Item = Result<Option<B>>>,
        B: Borrow<Tensor>,
    {
        let DeviceHead::Classifier { head, .. } = &self.head else {
            return Err(Error::Unsupported(
                "this is a segmentation backbone: it has no classification head".into(),
            ));
        };
        let classes = head.out_dim;
        let mut slots: [Option<Slot<T>>; 2] = [None, None];
        // Slots holding a batch whose results are not collected, oldest first.
        let mut in_flight = VecDeque::with_capacity(2);
        // The slot the next batch takes.
        let mut next = 0;
        let run = || -> Result<()> {
            for images in batches {
                let Some(images) = images? else {
                    while let Some(oldest) = in_flight.pop_front() {
                        each(collect(&mut slots, oldest, self)?)?;
                    }
                    continue;
                };
                let images = images.borrow();
                let shape = image_batch_shape(images)?;
                let s = next;
                next = 1 - next;
                // With two batches in flight, the oldest is the one in slot `s`.
                if in_flight.len() == 2
                    && let Some(oldest) = in_flight.pop_front()
                {
                    each(collect(&mut slots, oldest, self)?)?;
                }
                let slot = match &mut slots[s] {
                    Some(slot) if slot.shape == shape => slot,
                    other => other.insert(Slot::new(self, shape, classes)?),
                };
                slot.submit(self, images)?;
                in_flight.push_back(s);
            }
            while let Some(oldest) = in_flight.pop_front() {
                each(collect(&mut slots, oldest, self)?)?;
            }
            Ok(())
        };
        let result = run();
        // Nothing may be freed while a copy or a kernel still uses it
        // (after an error, batches may still be in flight).
        let device = self.device();
        let synced = device
            .synchronize()
            .and_then(|()| device.synchronize_transfers());
        result.and(synced)
    }
}

/// The results of the batch in flight in `slots[s]`.
fn collect<T: Element>(
    slots: &mut [Option<Slot<T>>; 2],
    s: usize,
    model: &DeviceModel<'_, T>,
) -> Result<Tensor> {
    slots[s]
        .as_mut()
        .ok_or_else(|| Error::Internal("forward_batches: a batch in flight has no slot".into()))?
        .collect(model)
}
