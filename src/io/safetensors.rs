//! safetensors files: memory-mapped reading (zero-copy for aligned f32) and
//! atomic writing.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::tensor::{Dtype, TensorView};

use super::output::{Overwrite, write_file};
use super::{F32Buffer, TensorSource};
use crate::error::{Error, Result};
use crate::tensor::{AnyTensor, Tensor};

/// One tensor's place in the file.
#[derive(Debug, Clone)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range within the whole file.
    start: usize,
    end: usize,
}

/// A safetensors file, memory-mapped and validated on open.
pub struct SafetensorsFile {
    path: PathBuf,
    map: Arc<memmap2::Mmap>,
    entries: BTreeMap<String, Entry>,
    metadata: HashMap<String, String>,
}

impl SafetensorsFile {
    /// Maps `path` and parses its header; a truncated or corrupt file is an error.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read, [`Error::Format`] when it is
    /// not a complete safetensors file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 8 {
            return Err(Error::format(
                path,
                format!("not a safetensors file: only {len} bytes"),
            ));
        }
        // SAFETY: the map is read-only; like every mmap-based reader we rely on
        // the file not being truncated by another process while it is open.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(&map)
            .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
        let data_start = 8 + header_len;
        let entries = meta
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let entry = Entry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + info.data_offsets.0,
                    end: data_start + info.data_offsets.1,
                };
                (name, entry)
            })
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            metadata: meta.metadata().clone().unwrap_or_default(),
            map: Arc::new(map),
            entries,
        })
    }

    /// The value of metadata `key`.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// True when the file holds tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| Error::InputTensor {
            path: self.path.clone(),
            name: name.to_string(),
            reason: "not in the file".into(),
        })
    }

    fn bytes(&self, e: &Entry) -> &[u8] {
        // Offsets were validated against the file length by `read_metadata`.
        &self.map[e.start..e.end]
    }

    /// Tensor `name` as f32 (converted from f16, bf16 or f64), with its shape.
    ///
    /// # Errors
    /// [`Error::InputTensor`] when absent or not a float tensor.
    pub fn tensor_f32(&self, name: &str) -> Result<Tensor<f32>> {
        let shape = self.entry(name)?.shape.clone();
        Tensor::new(shape, self.f32(name)?.to_vec())
    }

    /// Tensor `name` as i32 (from i32 or i64 storage), with its shape.
    ///
    /// # Errors
    /// [`Error::InputTensor`] when absent, not an integer tensor, or out of i32 range.
    pub fn tensor_i32(&self, name: &str) -> Result<Tensor<i32>> {
        let e = self.entry(name)?;
        let bytes = self.bytes(e);
        let bad = |reason: String| Error::InputTensor {
            path: self.path.clone(),
            name: name.to_string(),
            reason,
        };
        let values = match e.dtype {
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|c| {
                    let v = i64::from_le_bytes(c.try_into().unwrap());
                    i32::try_from(v).map_err(|_| bad(format!("value {v} does not fit i32")))
                })
                .collect::<Result<Vec<_>>>()?,
            other => return Err(bad(format!("dtype {other:?}, expected I32 or I64"))),
        };
        Tensor::new(e.shape.clone(), values)
    }
}

impl TensorSource for SafetensorsFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.entries.get(name).map(|e| e.shape.clone())
    }

    fn is_float(&self, name: &str) -> bool {
        self.entries
            .get(name)
            .is_some_and(|e| matches!(e.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64))
    }

    fn f32(&self, name: &str) -> Result<F32Buffer> {
        let e = self.entry(name)?;
        let bytes = self.bytes(e);
        let values: Vec<f32> = match e.dtype {
            Dtype::F32 => {
                if let Some(buf) = F32Buffer::mapped(&self.map, e.start, bytes.len() / 4) {
                    return Ok(buf);
                }
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect()
            }
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F64 => bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            other => {
                return Err(Error::InputTensor {
                    path: self.path.clone(),
                    name: name.to_string(),
                    reason: format!("dtype {other:?}, expected a float type"),
                });
            }
        };
        Ok(F32Buffer::owned(values))
    }

    fn config_json(&self) -> Option<String> {
        self.metadata("config").map(str::to_string)
    }
}

fn view(t: &AnyTensor) -> (Dtype, &[usize], &[u8]) {
    match t {
        AnyTensor::F32(t) => (Dtype::F32, t.shape(), bytemuck::cast_slice(t.data())),
        AnyTensor::I32(t) => (Dtype::I32, t.shape(), bytemuck::cast_slice(t.data())),
        AnyTensor::I64(t) => (Dtype::I64, t.shape(), bytemuck::cast_slice(t.data())),
    }
}

/// Writes `tensors` with `metadata` to `path` atomically (see
/// [`super::output`]), replacing what is there.
///
/// # Errors
/// [`Error::Io`] naming `path`.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, AnyTensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    write_safetensors_with(path, tensors, metadata, Overwrite::Replace)
}

/// As [`write_safetensors`], with the choice of what to do when `path`
/// exists.
///
/// # Errors
/// [`Error::Io`] naming `path` (`AlreadyExists` with [`Overwrite::Never`]).
pub fn write_safetensors_with(
    path: &Path,
    tensors: &[(String, AnyTensor)],
    metadata: HashMap<String, String>,
    overwrite: Overwrite,
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, t)| {
            let (dtype, shape, bytes) = view(t);
            TensorView::new(dtype, shape.to_vec(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::format(path, format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = (!metadata.is_empty()).then_some(metadata);
    let bytes =
        safetensors::serialize(views, metadata).map_err(|e| Error::format(path, e.to_string()))?;
    write_file(path, overwrite, |w| {
        w.write_all(&bytes).map_err(|e| Error::io(path, e))
    })
}
