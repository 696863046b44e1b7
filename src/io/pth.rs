//! PyTorch checkpoints (`torch.save` zip archives) read natively.
//!
//! Layout (checked on `tiny-128.pth`): a zip with one top folder holding
//! `data.pkl` (the pickled object) and `data/<key>` raw little-endian
//! storages. Published AFF checkpoints pickle `{"model": state_dict,
//! "optimizer": ..., "config": ..., ...}`; we take `model` (or `model_ema`)
//! and skip every entry that is not a tensor.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::pickle::{self, StorageDtype, TensorRef, Value};
use super::{F32Buffer, TensorSource};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Which state dict of a training checkpoint to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryChoice {
    /// `model`, the weights as trained (the default).
    Model,
    /// `model_ema`, the exponential moving average kept by some runs.
    ModelEma,
}

impl EntryChoice {
    fn key(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::ModelEma => "model_ema",
        }
    }
}

/// A tensor read from a checkpoint: floats as f32, integers as i64.
#[derive(Debug, Clone)]
pub enum PthTensor {
    Float(Tensor<f32>),
    Int(Tensor<i64>),
}

impl PthTensor {
    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            Self::Float(t) => t.shape(),
            Self::Int(t) => t.shape(),
        }
    }
}

/// The state dict of a `.pth` checkpoint, fully read into memory.
pub struct PthCheckpoint {
    path: PathBuf,
    tensors: BTreeMap<String, PthTensor>,
    skipped: Vec<String>,
}

impl std::fmt::Debug for PthCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PthCheckpoint")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .field("skipped", &self.skipped)
            .finish()
    }
}

/// True when `path` starts with the zip signature (as `torch.save` files do).
///
/// # Errors
/// [`Error::Io`] when the file cannot be read.
pub fn looks_like_zip(path: &Path) -> Result<bool> {
    let mut head = [0u8; 4];
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let n = file.read(&mut head).map_err(|e| Error::io(path, e))?;
    Ok(n == 4 && head == *b"PK\x03\x04")
}

impl PthCheckpoint {
    /// Reads the state dict `choice` from the checkpoint at `path`. A file that
    /// pickles a bare state dict (tensors at the top level) is read as is.
    ///
    /// # Errors
    /// [`Error::Io`] when unreadable; [`Error::Format`] when it is not a
    /// `torch.save` zip, the pickle is corrupt, a storage is missing or too
    /// short, or the requested entry is absent.
    pub fn open(path: impl AsRef<Path>, choice: EntryChoice) -> Result<Self> {
        let path = path.as_ref();
        let fail = |reason: String| Error::format(path, reason);
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let archive_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut zip = zip::ZipArchive::new(file).map_err(|e| {
            fail(format!(
                "not a torch.save zip archive ({e}); legacy (pre-1.6) checkpoints are not supported"
            ))
        })?;
        let pkl_name = zip
            .file_names()
            .filter_map(|n| n.ok())
            .find(|n| n.ends_with("data.pkl") && n.matches('/').count() == 1)
            .map(|n| n.into_owned())
            .ok_or_else(|| fail("no <folder>/data.pkl in the archive".into()))?;
        let top = pkl_name.trim_end_matches("data.pkl").to_string();
        let pkl = read_entry(&mut zip, &pkl_name, archive_len).map_err(fail)?;
        let root = pickle::parse(&pkl).map_err(|e| fail(format!("{pkl_name}: {e}")))?;

        let Value::Dict(root) = root else {
            return Err(fail("the checkpoint does not pickle a dict".into()));
        };
        let is_state_dict = root.iter().any(|(_, v)| matches!(v, Value::Tensor(_)));
        let mut skipped = Vec::new();
        let entries = if is_state_dict {
            root
        } else {
            let key = choice.key();
            let mut found = None;
            for (k, v) in root {
                match k {
                    Value::Str(s) if s == key => found = Some(v),
                    Value::Str(s) => skipped.push(s),
                    _ => {}
                }
            }
            match found {
                Some(Value::Dict(d)) => d,
                Some(_) => return Err(fail(format!("entry `{key}` is not a state dict"))),
                None => return Err(fail(format!("the checkpoint has no `{key}` entry"))),
            }
        };

        let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
        let mut tensors = BTreeMap::new();
        for (key, value) in entries {
            let Value::Str(name) = key else { continue };
            let Value::Tensor(t) = value else {
                skipped.push(name);
                continue;
            };
            if !storages.contains_key(&t.storage_key) {
                let entry = format!("{top}data/{}", t.storage_key);
                let bytes = read_entry(&mut zip, &entry, archive_len)
                    .map_err(|e| fail(format!("tensor `{name}`: {e}")))?;
                storages.insert(t.storage_key.clone(), bytes);
            }
            let tensor = materialise(&t, &storages[&t.storage_key])
                .map_err(|e| fail(format!("tensor `{name}`: {e}")))?;
            tensors.insert(name, tensor);
        }
        // Checkpoints saved from a DataParallel wrapper prefix every key.
        if !tensors.is_empty() && tensors.keys().all(|k| k.starts_with("module.")) {
            tensors = tensors
                .into_iter()
                .map(|(k, v)| (k["module.".len()..].to_string(), v))
                .collect();
        }
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
            skipped,
        })
    }

    /// All tensors of the state dict, by name.
    pub fn tensors(&self) -> &BTreeMap<String, PthTensor> {
        &self.tensors
    }

    /// Entries that were skipped: the checkpoint's other top-level entries
    /// (optimizer state, config, ...) and non-tensor state-dict entries.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }
}

/// Largest expansion of a compressed entry (deflate's best ratio is about
/// 1032:1): an entry declaring more than this over its compressed size lies.
const MAX_DEFLATE_RATIO: u64 = 1032;

/// Reads one archive entry, never reserving more than the archive can
/// really hold: the declared size is checked against the file's length
/// (stored entries) or the compressed size (deflated ones), and the read
/// stops at the declared size.
fn read_entry(
    zip: &mut zip::ZipArchive<File>,
    name: &str,
    archive_len: u64,
) -> std::result::Result<Vec<u8>, String> {
    let entry = zip
        .by_name(name)
        .map_err(|e| format!("archive entry {name}: {e}"))?;
    let declared = entry.size();
    let possible = archive_len.max(entry.compressed_size().saturating_mul(MAX_DEFLATE_RATIO));
    if declared > possible {
        return Err(format!(
            "archive entry {name} declares {declared} bytes, more than a {archive_len}-byte archive can hold"
        ));
    }
    let mut bytes = Vec::with_capacity(declared as usize);
    entry
        .take(declared)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("archive entry {name}: {e}"))?;
    if bytes.len() as u64 != declared {
        return Err(format!(
            "archive entry {name}: {} bytes read, {declared} declared",
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// Copies a (possibly strided) tensor out of its storage bytes. The view is
/// validated against the storage first: its element count may not overflow
/// nor exceed the storage's (no stride-0 expansion into a huge tensor), and
/// every index it touches lies inside the storage.
fn materialise(t: &TensorRef, storage: &[u8]) -> std::result::Result<PthTensor, String> {
    let size = t.dtype.size();
    let available = storage.len() / size;
    let numel = crate::limits::checked_product(&t.shape)
        .ok_or_else(|| format!("tensor of shape {:?} has more than 2^64 elements", t.shape))?;
    if numel > available {
        return Err(format!(
            "a view of shape {:?} has {numel} elements, its storage only {available}",
            t.shape
        ));
    }
    // The largest element index the view touches must lie inside the storage.
    if numel > 0 {
        let last = t
            .shape
            .iter()
            .zip(&t.stride)
            .try_fold(t.offset, |acc, (&n, &s)| {
                acc.checked_add((n - 1).checked_mul(s)?)
            })
            .ok_or("tensor view overflows")?;
        if last >= available {
            return Err(format!(
                "storage holds {available} elements, the view needs index {last}"
            ));
        }
    }
    // Element indices in row-major order, made as they are read (no index
    // array): every one is below `available` by the check above.
    let mut idx = vec![0usize; t.shape.len()];
    let indices = (0..numel).map(move |_| {
        let at: usize = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < t.shape[d] {
                break;
            }
            idx[d] = 0;
        }
        at
    });
    let elem = |i: usize| &storage[i * size..(i + 1) * size];
    let shape = t.shape.clone();
    let tensor = if t.dtype.is_float() {
        let values = indices
            .map(|i| {
                let b = elem(i);
                match t.dtype {
                    StorageDtype::F64 => f64::from_le_bytes(b.try_into().unwrap()) as f32,
                    StorageDtype::F32 => f32::from_le_bytes(b.try_into().unwrap()),
                    StorageDtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
                    _ => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                }
            })
            .collect();
        PthTensor::Float(Tensor::new(shape, values).map_err(|e| e.to_string())?)
    } else {
        let values = indices
            .map(|i| {
                let b = elem(i);
                match t.dtype {
                    StorageDtype::I64 => i64::from_le_bytes(b.try_into().unwrap()),
                    StorageDtype::I32 => i32::from_le_bytes(b.try_into().unwrap()).into(),
                    StorageDtype::I16 => i16::from_le_bytes([b[0], b[1]]).into(),
                    StorageDtype::I8 => (b[0] as i8).into(),
                    _ => b[0].into(),
                }
            })
            .collect();
        PthTensor::Int(Tensor::new(shape, values).map_err(|e| e.to_string())?)
    };
    Ok(tensor)
}

impl TensorSource for PthCheckpoint {
    fn path(&self) -> &Path {
        &self.path
    }

    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.shape().to_vec())
    }

    fn is_float(&self, name: &str) -> bool {
        matches!(self.tensors.get(name), Some(PthTensor::Float(_)))
    }

    fn f32(&self, name: &str) -> Result<F32Buffer> {
        match self.tensors.get(name) {
            Some(PthTensor::Float(t)) => Ok(F32Buffer::owned(t.data().to_vec())),
            other => Err(Error::InputTensor {
                path: self.path.clone(),
                name: name.to_string(),
                reason: if other.is_some() {
                    "holds integers, expected floats".into()
                } else {
                    "not in the checkpoint".into()
                },
            }),
        }
    }

    fn config_json(&self) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(offset: usize, shape: &[usize], stride: &[usize]) -> TensorRef {
        TensorRef {
            storage_key: "0".into(),
            dtype: StorageDtype::F32,
            offset,
            shape: shape.to_vec(),
            stride: stride.to_vec(),
        }
    }

    fn storage(n: usize) -> Vec<u8> {
        (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()
    }

    #[test]
    fn strided_views_are_gathered_in_row_major_order() {
        // A transposed 2×3 view of a 3×2 storage, starting at element 1.
        let PthTensor::Float(t) = materialise(&view(1, &[2, 3], &[1, 2]), &storage(7)).unwrap()
        else {
            panic!()
        };
        assert_eq!(t.shape(), &[2, 3]);
        assert_eq!(t.data(), &[1.0, 3.0, 5.0, 2.0, 4.0, 6.0]);
    }

    /// Stride-0 views that would expand a small storage, and shapes whose
    /// product wraps around, are refused before anything is allocated.
    #[test]
    fn expanding_and_wrapping_views_are_rejected() {
        let err = materialise(&view(0, &[1 << 20, 1 << 20], &[0, 0]), &storage(4)).unwrap_err();
        assert!(err.contains("storage only 4"), "{err}");
        let wrap = [1usize << 32, 1 << 32, 0];
        assert!(materialise(&view(0, &wrap, &[0, 0, 0]), &storage(4)).is_err());
        assert!(materialise(&view(0, &[1 << 62, 4], &[1, 1]), &storage(4)).is_err());
        // An honest broadcast within the storage's size is still read.
        let PthTensor::Float(t) = materialise(&view(1, &[2, 2], &[0, 1]), &storage(4)).unwrap()
        else {
            panic!()
        };
        assert_eq!(t.data(), &[1.0, 2.0, 1.0, 2.0]);
    }

    #[test]
    fn views_past_the_end_of_their_storage_are_rejected() {
        assert!(materialise(&view(0, &[2, 3], &[3, 1]), &storage(5)).is_err());
        assert!(materialise(&view(usize::MAX, &[2], &[1]), &storage(5)).is_err());
        assert!(materialise(&view(0, &[0, 3], &[3, 1]), &storage(0)).is_ok());
    }
}
