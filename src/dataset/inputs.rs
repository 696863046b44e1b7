//! The input list of a dataset run: image files, directories (walked
//! recursively, sorted) and manifests, in the order given.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// File extensions read as images (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// One image to process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub path: PathBuf,
    /// The manifest's `id`, when it gave one.
    pub id: Option<String>,
}

impl Input {
    /// The key this input is known by in every output: its id, else its
    /// path as given.
    pub fn key(&self) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| self.path.display().to_string())
    }

    /// The fields that start its output line: `path`, and `id` when the
    /// manifest gave one.
    pub fn line_fields(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut fields = serde_json::Map::new();
        fields.insert("path".into(), self.path.display().to_string().into());
        if let Some(id) = &self.id {
            fields.insert("id".into(), id.clone().into());
        }
        fields
    }
}

/// Where each input's key sits in `inputs`.
pub fn key_positions(inputs: &[Input]) -> HashMap<String, usize> {
    inputs
        .iter()
        .enumerate()
        .map(|(i, input)| (input.key(), i))
        .collect()
}

/// Every input of a run, in order, and what was passed over.
#[derive(Debug, Clone, Default)]
pub struct InputList {
    pub inputs: Vec<Input>,
    /// Files met in directories whose extension is not an image's.
    pub skipped: Vec<PathBuf>,
}

impl InputList {
    /// Where each key sits in [`inputs`](Self::inputs).
    pub fn positions(&self) -> HashMap<String, usize> {
        key_positions(&self.inputs)
    }
}

/// True when `path`'s extension is an image's.
pub fn is_image_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// One manifest line in its JSON form.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestEntry {
    path: PathBuf,
    id: Option<String>,
}

/// The inputs a manifest lists: one path per line, or JSON lines with
/// `path` and an optional `id`. Blank lines are ignored; relative paths are
/// taken relative to the current folder, as on the command line.
///
/// # Errors
/// [`Error::Io`] when the manifest cannot be read; [`Error::Format`] naming
/// the line that is not a path or a valid JSON entry.
pub fn read_manifest(manifest: &Path) -> Result<Vec<Input>> {
    let text = std::fs::read_to_string(manifest).map_err(|e| Error::io(manifest, e))?;
    let mut inputs = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('{') {
            let entry: ManifestEntry = serde_json::from_str(line).map_err(|e| Error::Format {
                path: manifest.to_path_buf(),
                reason: format!("line {}: not a manifest entry: {e}", number + 1),
            })?;
            if entry.id.as_deref().is_some_and(str::is_empty) {
                return Err(Error::Format {
                    path: manifest.to_path_buf(),
                    reason: format!("line {}: empty id", number + 1),
                });
            }
            inputs.push(Input {
                path: entry.path,
                id: entry.id,
            });
        } else {
            inputs.push(Input {
                path: PathBuf::from(line),
                id: None,
            });
        }
    }
    Ok(inputs)
}

/// Every file under `dir`, recursively, in sorted path order (symlinked
/// folders are not followed, so a cycle cannot loop).
fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<(PathBuf, std::fs::FileType)> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|entry| {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            let kind = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
            Ok((entry.path(), kind))
        })
        .collect::<Result<_>>()?;
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (path, kind) in entries {
        if kind.is_dir() {
            walk(&path, files)?;
        } else {
            files.push(path);
        }
    }
    Ok(())
}

/// The inputs of a run: each of `paths` in order (a directory expands to its
/// image files, recursively, in sorted path order; other files in it are
/// skipped and counted), then the entries of each manifest.
///
/// A file named directly is taken whatever its extension (a wrong one is
/// reported per image when it cannot be decoded).
///
/// # Errors
/// [`Error::InvalidArgument`] when a path does not exist, or when two
/// inputs share a key (an id, or a path without one): every input must be
/// told apart in the outputs. Manifest errors as [`read_manifest`].
pub fn gather_inputs(paths: &[PathBuf], manifests: &[PathBuf]) -> Result<InputList> {
    let mut list = InputList::default();
    for path in paths {
        let meta = std::fs::metadata(path)
            .map_err(|e| Error::InvalidArgument(format!("input {}: {e}", path.display())))?;
        if meta.is_dir() {
            let mut files = Vec::new();
            walk(path, &mut files)?;
            for file in files {
                if is_image_path(&file) {
                    list.inputs.push(Input {
                        path: file,
                        id: None,
                    });
                } else {
                    list.skipped.push(file);
                }
            }
        } else {
            list.inputs.push(Input {
                path: path.clone(),
                id: None,
            });
        }
    }
    for manifest in manifests {
        list.inputs.extend(read_manifest(manifest)?);
    }
    let mut seen: HashMap<String, usize> = HashMap::with_capacity(list.inputs.len());
    for (i, input) in list.inputs.iter().enumerate() {
        if let Some(first) = seen.insert(input.key(), i) {
            return Err(Error::InvalidArgument(format!(
                "input `{}` is given twice (inputs {} and {}): every input needs its own path or id",
                input.key(),
                first + 1,
                i + 1
            )));
        }
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_take_plain_and_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("m.txt");
        std::fs::write(
            &manifest,
            "a.png\n\n{\"path\": \"b.jpg\", \"id\": \"bee\"}\n{\"path\": \"c.png\"}\n",
        )
        .unwrap();
        let inputs = read_manifest(&manifest).unwrap();
        let keys: Vec<String> = inputs.iter().map(Input::key).collect();
        assert_eq!(keys, ["a.png", "bee", "c.png"]);
        std::fs::write(&manifest, "{\"path\": 3}\n").unwrap();
        let err = read_manifest(&manifest).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn directories_expand_sorted_and_duplicates_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        for name in ["b.PNG", "a.jpg", "sub/c.jpeg", "notes.txt"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let list = gather_inputs(&[dir.path().to_path_buf()], &[]).unwrap();
        let names: Vec<_> = list
            .inputs
            .iter()
            .map(|i| i.path.strip_prefix(dir.path()).unwrap().to_path_buf())
            .collect();
        assert_eq!(
            names,
            [
                PathBuf::from("a.jpg"),
                PathBuf::from("b.PNG"),
                PathBuf::from("sub/c.jpeg")
            ]
        );
        assert_eq!(list.skipped, [dir.path().join("notes.txt")]);
        let twice = [dir.path().to_path_buf(), dir.path().join("a.jpg")];
        let err = gather_inputs(&twice, &[]).unwrap_err().to_string();
        assert!(err.contains("given twice"), "{err}");
        let missing = gather_inputs(&[dir.path().join("nope")], &[]).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
    }
}
