//! Files in and out: safetensors (read memory-mapped, write atomically),
//! PyTorch `.pth` checkpoints (read natively), and images.

pub mod image;
pub mod output;
mod pickle;
pub mod pth;
pub mod safetensors;

use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

use crate::error::Result;

pub use self::output::Overwrite;
pub use self::pth::PthCheckpoint;
pub use self::safetensors::{SafetensorsFile, write_safetensors, write_safetensors_with};

/// A read-only f32 buffer: borrowed from a memory-mapped file when its bytes
/// are aligned f32s, owned otherwise (converted dtypes, generated weights).
#[derive(Clone)]
pub struct F32Buffer(Repr);

#[derive(Clone)]
enum Repr {
    Mapped {
        map: Arc<memmap2::Mmap>,
        start: usize,
        len: usize,
    },
    Owned(Arc<Vec<f32>>),
}

impl F32Buffer {
    /// Wraps owned values.
    pub fn owned(values: Vec<f32>) -> Self {
        Self(Repr::Owned(Arc::new(values)))
    }

    /// Borrows `len` f32s at byte `start` of `map`, if that range is f32-aligned
    /// and in bounds; `None` otherwise (the caller then copies).
    fn mapped(map: &Arc<memmap2::Mmap>, start: usize, len: usize) -> Option<Self> {
        let bytes = map.get(start..start.checked_add(len.checked_mul(4)?)?)?;
        bytemuck::try_cast_slice::<u8, f32>(bytes).ok()?;
        Some(Self(Repr::Mapped {
            map: Arc::clone(map),
            start,
            len,
        }))
    }

    /// True when the values live in a memory-mapped file (zero-copy).
    pub fn is_mapped(&self) -> bool {
        matches!(self.0, Repr::Mapped { .. })
    }
}

impl Deref for F32Buffer {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &self.0 {
            Repr::Mapped { map, start, len } => {
                // Alignment and bounds were checked in `mapped`.
                bytemuck::cast_slice(&map[*start..*start + *len * 4])
            }
            Repr::Owned(values) => values,
        }
    }
}

impl std::fmt::Debug for F32Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "F32Buffer(len {}, mapped {})",
            self.len(),
            self.is_mapped()
        )
    }
}

/// A named collection of tensors the model can load its weights from.
pub trait TensorSource {
    /// The file the tensors come from (for error messages).
    fn path(&self) -> &Path;
    /// Every tensor name, sorted.
    fn names(&self) -> Vec<String>;
    /// The shape of tensor `name`, if present.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// True when tensor `name` holds floating-point values.
    fn is_float(&self, name: &str) -> bool;
    /// The values of float tensor `name`, as f32.
    ///
    /// # Errors
    /// A [`crate::Error::InputTensor`] when the tensor is absent or not float.
    fn f32(&self, name: &str) -> Result<F32Buffer>;
    /// The model configuration stored with the tensors (JSON), if any.
    fn config_json(&self) -> Option<String>;
}

/// Opens a weights file by its content: a `.pth` zip or safetensors.
///
/// # Errors
/// I/O and format errors naming the file.
pub fn open_weights(path: &Path) -> Result<Box<dyn TensorSource>> {
    if pth::looks_like_zip(path)? {
        Ok(Box::new(PthCheckpoint::open(
            path,
            pth::EntryChoice::Model,
        )?))
    } else {
        Ok(Box::new(SafetensorsFile::open(path)?))
    }
}
