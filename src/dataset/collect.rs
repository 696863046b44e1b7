//! `collect`: checks that a set of shard outputs covers every input exactly
//! once, and merges them in input order.

use std::path::{Path, PathBuf};

use super::inputs::InputList;
use super::jsonl::{line_key, read_lines_and_tear};
use crate::error::{Error, Result};

/// Lines named in a message, at most.
const SHOWN: usize = 10;

/// How the shard outputs cover the inputs.
#[derive(Debug, Default)]
pub struct Coverage {
    /// Each input's line (`None`: missing), in input order.
    pub lines: Vec<Option<String>>,
    /// Inputs with more than one line, and where.
    pub duplicates: Vec<(String, Vec<PathBuf>)>,
    /// Lines for keys that are not inputs, and where.
    pub unknown: Vec<(String, PathBuf)>,
    /// Outputs that end in a torn line (their run was killed).
    pub torn: Vec<PathBuf>,
}

impl Coverage {
    /// Inputs without a line.
    pub fn missing<'a>(&'a self, inputs: &'a InputList) -> impl Iterator<Item = String> + 'a {
        self.lines
            .iter()
            .zip(&inputs.inputs)
            .filter(|(line, _)| line.is_none())
            .map(|(_, input)| input.key())
    }

    /// True when every input has exactly one line and nothing else is there.
    pub fn is_complete(&self) -> bool {
        self.lines.iter().all(Option::is_some)
            && self.duplicates.is_empty()
            && self.unknown.is_empty()
    }
}

/// Reads `outputs` (JSON-lines files of `classify --out` or `features`
/// indices) and matches their lines to `inputs`.
///
/// # Errors
/// I/O and format errors naming the file.
pub fn coverage(inputs: &InputList, outputs: &[PathBuf]) -> Result<Coverage> {
    let positions = inputs.positions();
    let mut cover = Coverage {
        lines: vec![None; inputs.inputs.len()],
        ..Coverage::default()
    };
    let mut seen_in: Vec<Vec<PathBuf>> = vec![Vec::new(); inputs.inputs.len()];
    for output in outputs {
        let (lines, torn) = read_lines_and_tear(output)?;
        if torn {
            cover.torn.push(output.clone());
        }
        for (text, value) in lines {
            let key = line_key(&value).expect("read_lines checked the key");
            match positions.get(&key) {
                None => cover.unknown.push((key, output.clone())),
                Some(&pos) => {
                    seen_in[pos].push(output.clone());
                    cover.lines[pos].get_or_insert(text);
                }
            }
        }
    }
    for (pos, files) in seen_in.into_iter().enumerate() {
        if files.len() > 1 {
            cover.duplicates.push((inputs.inputs[pos].key(), files));
        }
    }
    Ok(cover)
}

/// Why `cover` is not complete, in one paragraph: what is missing,
/// duplicated or unknown (the first few of each, and how many).
pub fn describe_gaps(cover: &Coverage, inputs: &InputList) -> String {
    fn list(items: Vec<String>) -> String {
        let count = items.len();
        let mut text = items.into_iter().take(SHOWN).collect::<Vec<_>>().join(", ");
        if count > SHOWN {
            text.push_str(&format!(", … ({} more)", count - SHOWN));
        }
        text
    }
    let mut parts = Vec::new();
    let missing: Vec<String> = cover.missing(inputs).collect();
    if !missing.is_empty() {
        parts.push(format!(
            "{} input(s) missing: {}",
            missing.len(),
            list(missing)
        ));
    }
    if !cover.duplicates.is_empty() {
        let dups = cover
            .duplicates
            .iter()
            .map(|(k, files)| format!("{k} ({} times)", files.len()))
            .collect();
        parts.push(format!(
            "{} input(s) more than once: {}",
            cover.duplicates.len(),
            list(dups)
        ));
    }
    if !cover.unknown.is_empty() {
        let unknown = cover
            .unknown
            .iter()
            .map(|(k, f)| format!("{k} (in {})", f.display()))
            .collect();
        parts.push(format!(
            "{} line(s) for inputs not in the list: {}",
            cover.unknown.len(),
            list(unknown)
        ));
    }
    if !cover.torn.is_empty() {
        let torn = cover.torn.iter().map(|p| p.display().to_string()).collect();
        parts.push(format!(
            "torn last line (a killed run: rerun it with --resume) in {}",
            list(torn)
        ));
    }
    parts.join("; ")
}

/// Merges `outputs` into `merged`, in input order, when they cover every
/// input exactly once.
///
/// # Errors
/// [`Error::InvalidArgument`] describing the gaps (nothing is written);
/// I/O and format errors.
pub fn collect(inputs: &InputList, outputs: &[PathBuf], merged: &Path) -> Result<usize> {
    let cover = coverage(inputs, outputs)?;
    if !cover.is_complete() {
        return Err(Error::InvalidArgument(format!(
            "the outputs do not cover the inputs exactly once: {}",
            describe_gaps(&cover, inputs)
        )));
    }
    let lines: Vec<String> = cover
        .lines
        .into_iter()
        .map(|l| l.expect("complete"))
        .collect();
    super::jsonl::write_lines(merged, &lines)?;
    Ok(lines.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::inputs::Input;

    #[test]
    fn gaps_duplicates_and_strangers_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = InputList {
            inputs: ["a", "b", "c"]
                .iter()
                .map(|p| Input {
                    path: PathBuf::from(p),
                    id: None,
                })
                .collect(),
            skipped: vec![],
        };
        let one = dir.path().join("one.jsonl");
        let two = dir.path().join("two.jsonl");
        std::fs::write(
            &one,
            "{\"path\":\"a\",\"top\":[]}\n{\"path\":\"b\",\"error\":\"x\"}\n",
        )
        .unwrap();
        std::fs::write(&two, "{\"path\":\"c\",\"top\":[]}\n").unwrap();
        let merged = dir.path().join("all.jsonl");
        assert_eq!(
            collect(&inputs, &[two.clone(), one.clone()], &merged).unwrap(),
            3
        );
        let text = std::fs::read_to_string(&merged).unwrap();
        assert!(text.starts_with("{\"path\":\"a\"") && text.ends_with("\"top\":[]}\n"));

        std::fs::write(
            &two,
            "{\"path\":\"a\",\"top\":[]}\n{\"path\":\"z\",\"top\":[]}\n{\"pa",
        )
        .unwrap();
        let err = collect(&inputs, &[one, two], &dir.path().join("no.jsonl"))
            .unwrap_err()
            .to_string();
        for part in ["1 input(s) missing: c", "a (2 times)", "z (in", "torn"] {
            assert!(err.contains(part), "{part}: {err}");
        }
        assert!(!dir.path().join("no.jsonl").exists());
    }
}
