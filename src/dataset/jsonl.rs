//! Outputs of one JSON line per input (`classify --out`, the `features`
//! index): appended and flushed line by line, resumable, and put in input
//! order at the end.
//!
//! Every line is an object naming its input by `path` (and `id` when the
//! manifest gave one); a line with an `error` field records a failure.
//! A killed run leaves complete lines and at most one torn last line:
//! [`JsonlOutput::open`] with [`OutputMode::Resume`] drops the torn line and
//! the failures (to retry them) and keeps the rest.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::Overwrite;
use crate::io::output::write_file;

/// What to do with an output that exists already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputMode {
    /// Refuse to start (the default: nothing the user has is touched).
    New,
    /// Start again from nothing.
    Force,
    /// Keep what is there, run the rest.
    Resume,
}

impl OutputMode {
    /// From the `--resume` and `--force` flags.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when both are given.
    pub fn from_flags(resume: bool, force: bool) -> Result<Self> {
        match (resume, force) {
            (true, true) => Err(Error::InvalidArgument(
                "--resume and --force exclude each other".into(),
            )),
            (true, false) => Ok(Self::Resume),
            (false, true) => Ok(Self::Force),
            (false, false) => Ok(Self::New),
        }
    }
}

/// The key a line names its input by: `id`, else `path`.
pub fn line_key(line: &Value) -> Option<String> {
    match line.get("id").and_then(Value::as_str) {
        Some(id) => Some(id.to_string()),
        None => line.get("path").and_then(Value::as_str).map(str::to_string),
    }
}

/// True for a line that records a failure.
pub fn is_failure(line: &Value) -> bool {
    line.get("error").is_some()
}

/// The complete lines of a JSON-lines file, each parsed, with its text; a
/// last line without its newline (torn by a kill) is left out.
///
/// # Errors
/// [`Error::Io`] when it cannot be read; [`Error::Format`] naming the first
/// complete line that is not a JSON object naming its input.
pub fn read_lines(path: &Path) -> Result<Vec<(String, Value)>> {
    read_lines_and_tear(path).map(|(lines, _)| lines)
}

/// As [`read_lines`], and whether a torn last line was left out.
///
/// # Errors
/// As [`read_lines`].
pub fn read_lines_and_tear(path: &Path) -> Result<(Vec<(String, Value)>, bool)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let torn = bytes.last().is_some_and(|&b| b != b'\n');
    let complete = match bytes.iter().rposition(|&b| b == b'\n') {
        Some(last) => &bytes[..=last],
        None => &bytes[..0],
    };
    let mut lines = Vec::new();
    for (number, raw) in complete.split(|&b| b == b'\n').enumerate() {
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let bad = |reason: String| Error::Format {
            path: path.to_path_buf(),
            reason: format!("line {}: {reason}", number + 1),
        };
        let text = std::str::from_utf8(raw).map_err(|e| bad(e.to_string()))?;
        let value: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if line_key(&value).is_none() {
            return Err(bad("no `path` or `id`: not an output of this tool".into()));
        }
        lines.push((text.to_string(), value));
    }
    Ok((lines, torn))
}

/// A JSON-lines output being written.
#[derive(Debug)]
pub struct JsonlOutput {
    path: PathBuf,
    file: File,
    /// Lines written so far, by input position (to restore input order).
    order: Vec<usize>,
}

/// What [`JsonlOutput::open`] found in an output being resumed.
#[derive(Debug, Default)]
pub struct Resumed {
    /// Per input position: its line was kept (the input is done).
    pub done: Vec<bool>,
    /// Failure lines dropped, to be retried.
    pub retried: usize,
    /// A torn last line was dropped.
    pub torn: bool,
}

impl JsonlOutput {
    /// Opens `path` for a run over inputs whose keys sit at `positions`.
    ///
    /// - [`OutputMode::New`]: `path` must not exist.
    /// - [`OutputMode::Force`]: it is emptied.
    /// - [`OutputMode::Resume`]: its complete lines are read; successes that
    ///   `keep` accepts stay (their inputs are marked done), failures and a
    ///   torn last line go; the file is rewritten (atomically) with what stays.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `path` exists in `New` mode, or, in
    /// `Resume` mode, holds lines for inputs not in this run or the same
    /// input twice (nothing is then changed); I/O and format errors.
    pub fn open(
        path: &Path,
        positions: &HashMap<String, usize>,
        mode: OutputMode,
        keep: &dyn Fn(&Value) -> Result<bool>,
    ) -> Result<(Self, Resumed)> {
        let len = positions.len();
        let mut resumed = Resumed {
            done: vec![false; len],
            ..Resumed::default()
        };
        let exists = path.symlink_metadata().is_ok();
        let mut order = Vec::new();
        match mode {
            OutputMode::New if exists => {
                return Err(Error::InvalidArgument(format!(
                    "{} exists: pass --resume to continue it or --force to start again",
                    path.display()
                )));
            }
            OutputMode::Resume if exists => {
                let (lines, torn) = read_lines_and_tear(path)?;
                resumed.torn = torn;
                let mut seen = vec![false; len];
                let mut kept = Vec::new();
                for (text, value) in lines {
                    let key = line_key(&value).expect("read_lines checked the key");
                    let Some(&pos) = positions.get(&key) else {
                        return Err(Error::InvalidArgument(format!(
                            "{}: holds a line for `{key}`, which is not among this run's inputs: was it written for other inputs? (nothing changed)",
                            path.display()
                        )));
                    };
                    if std::mem::replace(&mut seen[pos], true) {
                        return Err(Error::InvalidArgument(format!(
                            "{}: holds `{key}` twice (nothing changed)",
                            path.display()
                        )));
                    }
                    if is_failure(&value) || !keep(&value)? {
                        resumed.retried += 1;
                        continue;
                    }
                    resumed.done[pos] = true;
                    order.push(pos);
                    kept.push(text);
                }
                write_lines(path, &kept)?;
            }
            _ => write_lines(path, &[])?,
        }
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok((
            Self {
                path: path.to_path_buf(),
                file,
                order,
            },
            resumed,
        ))
    }

    /// Appends the line of the input at `position` and flushes it to the
    /// system (a killed process loses nothing written).
    ///
    /// # Errors
    /// [`Error::Io`] naming the file.
    pub fn append(&mut self, position: usize, line: &Value) -> Result<()> {
        let mut text = serde_json::to_string(line).expect("JSON values serialise");
        text.push('\n');
        // One write per line: a kill tears at most this one.
        self.file
            .write_all(text.as_bytes())
            .map_err(|e| Error::io(&self.path, e))?;
        self.order.push(position);
        Ok(())
    }

    /// Makes the output durable, in input order: when a resumed run retried
    /// failures, their new lines came after later inputs' lines, and the
    /// file is rewritten (atomically) sorted by input position.
    ///
    /// # Errors
    /// I/O errors naming the file.
    pub fn finish(self, positions: &HashMap<String, usize>) -> Result<()> {
        self.file.sync_all().map_err(|e| Error::io(&self.path, e))?;
        if self.order.is_sorted() {
            return Ok(());
        }
        let mut lines = read_lines(&self.path)?;
        lines.sort_by_key(|(_, v)| {
            line_key(v)
                .and_then(|k| positions.get(&k).copied())
                .unwrap_or(usize::MAX)
        });
        let texts: Vec<String> = lines.into_iter().map(|(t, _)| t).collect();
        write_lines(&self.path, &texts)
    }
}

/// Replaces `path` (atomically) with `lines`, one per line.
pub fn write_lines(path: &Path, lines: &[String]) -> Result<()> {
    write_file(path, Overwrite::Replace, |out| {
        for line in lines {
            out.write_all(line.as_bytes())
                .and_then(|()| out.write_all(b"\n"))
                .map_err(|e| Error::io(path, e))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn positions(keys: &[&str]) -> HashMap<String, usize> {
        keys.iter()
            .enumerate()
            .map(|(i, k)| (k.to_string(), i))
            .collect()
    }

    #[test]
    fn resume_keeps_successes_drops_failures_and_a_torn_line_then_restores_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let pos = positions(&["a", "b", "c", "d"]);
        let keep_all = |_: &Value| Ok(true);
        let (mut out, _) = JsonlOutput::open(&path, &pos, OutputMode::New, &keep_all).unwrap();
        out.append(0, &json!({"path": "a", "top": 1})).unwrap();
        out.append(1, &json!({"path": "b", "error": "bad"}))
            .unwrap();
        out.append(2, &json!({"path": "c", "top": 3})).unwrap();
        drop(out);
        // A kill in the middle of the next line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"path\": \"d\", \"to").unwrap();
        drop(f);
        let err = JsonlOutput::open(&path, &pos, OutputMode::New, &keep_all).unwrap_err();
        assert!(err.to_string().contains("--resume"), "{err}");

        let (mut out, resumed) =
            JsonlOutput::open(&path, &pos, OutputMode::Resume, &keep_all).unwrap();
        assert_eq!(resumed.done, [true, false, true, false]);
        assert_eq!((resumed.retried, resumed.torn), (1, true));
        out.append(1, &json!({"path": "b", "top": 2})).unwrap();
        out.append(3, &json!({"path": "d", "top": 4})).unwrap();
        out.finish(&pos).unwrap();
        let keys: Vec<String> = read_lines(&path)
            .unwrap()
            .iter()
            .map(|(_, v)| line_key(v).unwrap())
            .collect();
        assert_eq!(keys, ["a", "b", "c", "d"]);

        // Lines for other inputs: refused, the file untouched.
        let before = std::fs::read(&path).unwrap();
        let other = positions(&["a", "b"]);
        assert!(JsonlOutput::open(&path, &other, OutputMode::Resume, &keep_all).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }
}
