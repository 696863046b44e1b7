//! Copies that overlap the kernels (issue #12 item 3): host buffers a GPU
//! copies from and to asynchronously (page-locked), a second stream that
//! carries those copies, and markers (events) that order the two streams.
//!
//! On a GPU, [`Device::upload_async`] and [`Device::download_async`] run on
//! the transfer stream, the kernels on the device's own; a [`Marker`] from
//! one stream is waited for by the other ([`Device::wait_for`], or the
//! `after` of a download). A [`HostBuffer`] remembers the marker of its
//! last copy, and its host side waits for it before it is read or written
//! ([`Device::host_mut`], [`Device::host_ref`]): cudarc's own waits on
//! page-locked memory rely on its event tracking, which the kernels'
//! context turns off. On the emulator every call completes at once, in
//! program order, with the same buffers, copies and waits (counted as
//! `host_waits`): what a pipeline copies where, and when its host waits, is
//! tested there; only the overlap itself needs a GPU.

use std::sync::Arc;

use bytemuck::Pod;

use super::counts::Event;
use super::{Backend, Buffer, Device, Storage};
use crate::error::{Error, Result};

/// What a [`HostBuffer`] is for: on a GPU, upload buffers are
/// write-combined (fast to write and to copy, slow to read on the host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostUse {
    Upload,
    Download,
}

/// `len` elements of `T` in host memory that a device copies from or to
/// asynchronously.
pub struct HostBuffer<T: Pod> {
    storage: HostStorage<T>,
    len: usize,
    /// The end of the last copy from or to the buffer that the host has
    /// not yet waited for.
    pending: Option<Marker>,
}

enum HostStorage<T> {
    Host(Vec<T>),
    Pinned(cudarc::driver::PinnedHostSlice<u8>),
}

impl<T: Pod> HostBuffer<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T: Pod> Drop for HostBuffer<T> {
    /// Page-locked memory is not freed under a copy still reading or
    /// writing it (cudarc's own wait is on an event it never recorded).
    fn drop(&mut self) {
        if let Some(copy) = &self.pending {
            let _ = copy.wait_here();
        }
    }
}

impl<T: Pod> std::fmt::Debug for HostBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HostBuffer<{}>[{}]",
            std::any::type_name::<T>(),
            self.len
        )
    }
}

/// A point in one stream's work that another (or the host) waits for.
#[derive(Clone)]
pub struct Marker(MarkerKind);

#[derive(Clone)]
enum MarkerKind {
    /// The emulator's work is done when its call returns.
    Done,
    /// Shared by the stream that waits for it and the buffer it guards.
    Cuda(Arc<cudarc::driver::CudaEvent>),
}

impl Marker {
    /// Blocks this thread until the marked work has finished.
    fn wait_here(&self) -> std::result::Result<(), cudarc::driver::DriverError> {
        match &self.0 {
            MarkerKind::Done => Ok(()),
            MarkerKind::Cuda(event) => event.synchronize(),
        }
    }
}

/// Bytes of a device buffer of `len` elements of `T` (as `Device::alloc`
/// makes them: at least 4), which its host twin matches.
fn device_bytes<T>(len: usize) -> usize {
    (len * size_of::<T>()).max(4)
}

impl Device {
    /// A host buffer of `len` elements (zeroed) for `usage`.
    ///
    /// # Errors
    /// [`Error::Device`] when page-locked memory cannot be had.
    pub fn host_buffer<T: Pod>(&self, len: usize, usage: HostUse) -> Result<HostBuffer<T>> {
        let storage = match &self.backend {
            Backend::Emulator => HostStorage::Host(vec![T::zeroed(); len]),
            Backend::Cuda(cuda) => {
                HostStorage::Pinned(cuda.pinned(device_bytes::<T>(len), usage == HostUse::Upload)?)
            }
        };
        Ok(HostBuffer {
            storage,
            len,
            pending: None,
        })
    }

    /// The host side of `buffer`, once its pending copies have finished.
    ///
    /// # Errors
    /// [`Error::Device`] when a copy failed.
    pub fn host_mut<'a, T: Pod>(&self, buffer: &'a mut HostBuffer<T>) -> Result<&'a mut [T]> {
        if let Some(copy) = &buffer.pending {
            self.counters.count(Event::HostWait);
            copy.wait_here()
                .map_err(|e| Error::device("host buffer", e))?;
            // Only once waited for: after an error, the next access waits again.
            buffer.pending = None;
        }
        let len = buffer.len;
        match &mut buffer.storage {
            HostStorage::Host(data) => Ok(data),
            HostStorage::Pinned(pinned) => {
                let bytes = pinned
                    .as_mut_slice()
                    .map_err(|e| Error::device("host buffer", e))?;
                cast(bytes, len).map(|s| &mut s[..len])
            }
        }
    }

    /// The host side of `buffer`, once its pending copies have finished.
    ///
    /// # Errors
    /// As [`Device::host_mut`].
    pub fn host_ref<'a, T: Pod>(&self, buffer: &'a mut HostBuffer<T>) -> Result<&'a [T]> {
        self.host_mut(buffer).map(|s| &*s)
    }

    /// Copies `src` into `dst` (as long) on the transfer stream, without
    /// waiting; returns the marker of its end, for the kernels to wait for
    /// (the host side of `src` waits for it too).
    ///
    /// # Errors
    /// [`Error::Shape`] when the lengths differ; [`Error::InvalidArgument`]
    /// for buffers of another device; device errors.
    pub fn upload_async<T: Pod>(
        &self,
        src: &mut HostBuffer<T>,
        dst: &mut Buffer<T>,
    ) -> Result<Marker> {
        crate::error::check_len("upload_async", "src", &[dst.len], src.len)?;
        self.counters.count(Event::Upload);
        let copied = match (&self.backend, &src.storage, &mut dst.storage) {
            (Backend::Emulator, HostStorage::Host(host), Storage::Host(data)) => {
                data.copy_from_slice(host);
                Marker(MarkerKind::Done)
            }
            (Backend::Cuda(cuda), HostStorage::Pinned(pinned), Storage::Cuda(slice)) => Marker(
                MarkerKind::Cuda(Arc::new(cuda.upload_async(pinned, slice)?)),
            ),
            _ => return Err(self.not_mine("upload_async")),
        };
        src.pending = Some(copied.clone());
        Ok(copied)
    }

    /// Copies `src` into `dst` (as long) on the transfer stream once the
    /// work `after` marks has finished, without waiting; read the result
    /// with [`Device::host_ref`].
    ///
    /// # Errors
    /// As [`Device::upload_async`].
    pub fn download_async<T: Pod>(
        &self,
        src: &Buffer<T>,
        dst: &mut HostBuffer<T>,
        after: &Marker,
    ) -> Result<()> {
        crate::error::check_len("download_async", "dst", &[src.len], dst.len)?;
        self.counters.count(Event::Download);
        let copied = match (&self.backend, &src.storage, &mut dst.storage, &after.0) {
            (Backend::Emulator, Storage::Host(data), HostStorage::Host(host), _) => {
                host.copy_from_slice(data);
                Marker(MarkerKind::Done)
            }
            (
                Backend::Cuda(cuda),
                Storage::Cuda(slice),
                HostStorage::Pinned(pinned),
                MarkerKind::Cuda(event),
            ) => Marker(MarkerKind::Cuda(Arc::new(
                cuda.download_async(slice, pinned, event)?,
            ))),
            _ => return Err(self.not_mine("download_async")),
        };
        dst.pending = Some(copied);
        Ok(())
    }

    /// A marker of the work queued for the kernels so far.
    ///
    /// # Errors
    /// Device errors.
    pub fn mark(&self) -> Result<Marker> {
        match &self.backend {
            Backend::Emulator => Ok(Marker(MarkerKind::Done)),
            Backend::Cuda(cuda) => cuda.mark().map(|e| Marker(MarkerKind::Cuda(Arc::new(e)))),
        }
    }

    /// Makes the kernels launched from now on wait for `marker`'s work.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for another device's marker; device
    /// errors.
    pub fn wait_for(&self, marker: &Marker) -> Result<()> {
        match (&self.backend, &marker.0) {
            (Backend::Emulator, MarkerKind::Done) => Ok(()),
            (Backend::Cuda(cuda), MarkerKind::Cuda(event)) => cuda.wait_for(event),
            _ => Err(self.not_mine("wait_for")),
        }
    }

    /// Copies `src` into `dst` (as long) on the device, in order with the
    /// kernels.
    ///
    /// # Errors
    /// As [`Device::upload_async`].
    pub fn copy_into<T: Pod>(&self, dst: &mut Buffer<T>, src: &Buffer<T>) -> Result<()> {
        crate::error::check_len("copy_into", "src", &[dst.len], src.len)?;
        self.counters.count(Event::DeviceCopy);
        match (&self.backend, &mut dst.storage, &src.storage) {
            (Backend::Emulator, Storage::Host(dst), Storage::Host(src)) => {
                dst.copy_from_slice(src);
                Ok(())
            }
            (Backend::Cuda(cuda), Storage::Cuda(dst), Storage::Cuda(src)) => {
                cuda.copy_into(dst, src)
            }
            _ => Err(self.not_mine("copy_into")),
        }
    }

    /// Waits for every copy on the transfer stream (before freeing what
    /// they use).
    ///
    /// # Errors
    /// [`Error::Device`] when a copy failed.
    pub fn synchronize_transfers(&self) -> Result<()> {
        match &self.backend {
            Backend::Emulator => Ok(()),
            Backend::Cuda(cuda) => cuda.synchronize_transfers(),
        }
    }

    fn not_mine(&self, op: &str) -> Error {
        Error::InvalidArgument(format!(
            "{op}: a buffer or marker that is not an owned one of {}",
            self.name()
        ))
    }
}

/// Page-locked bytes as `len` elements of `T` (the allocation is page
/// aligned and a multiple of `T`'s size, [`device_bytes`]).
fn cast<T: Pod>(bytes: &mut [u8], len: usize) -> Result<&mut [T]> {
    bytemuck::try_cast_slice_mut(bytes)
        .ok()
        .filter(|s: &&mut [T]| s.len() >= len)
        .ok_or_else(|| Error::Internal("a page-locked buffer is not aligned for its type".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the emulator, a round trip host → device → device → host keeps
    /// every value, and lengths that disagree are errors.
    #[test]
    fn emulator_round_trip() {
        let device = Device::emulator();
        let mut up = device.host_buffer::<f32>(5, HostUse::Upload).unwrap();
        device
            .host_mut(&mut up)
            .unwrap()
            .copy_from_slice(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        let mut a = device.alloc::<f32>(5).unwrap();
        let uploaded = device.upload_async(&mut up, &mut a).unwrap();
        device.wait_for(&uploaded).unwrap();
        let mut b = device.alloc::<f32>(5).unwrap();
        device.copy_into(&mut b, &a).unwrap();
        let mut down = device.host_buffer::<f32>(5, HostUse::Download).unwrap();
        let done = device.mark().unwrap();
        device.download_async(&b, &mut down, &done).unwrap();
        assert_eq!(
            device.host_ref(&mut down).unwrap(),
            [1.0, 2.0, 3.0, 4.0, 5.0]
        );
        let mut short = device.alloc::<f32>(4).unwrap();
        assert!(device.upload_async(&mut up, &mut short).is_err());
        assert!(device.copy_into(&mut short, &a).is_err());
        assert!(device.download_async(&short, &mut down, &done).is_err());
    }
}
