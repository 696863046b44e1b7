//! One shard of a run fanned out over a scheduler: `--shard I/N`, or the
//! task index a Slurm job array or a Kubernetes Indexed Job gives.

use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Shard `index` of `count` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

/// Reads a variable of `env` (a lookup, so tests need not touch the
/// process environment).
fn number(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<usize>> {
    env(name)
        .map(|v| {
            v.trim().parse::<usize>().map_err(|_| {
                Error::InvalidArgument(format!("{name}={v}: not a non-negative integer"))
            })
        })
        .transpose()
}

impl Shard {
    /// Parses `I/N` (0 ≤ I < N).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the text when it is not `I/N`.
    pub fn parse(text: &str) -> Result<Self> {
        let bad =
            || Error::InvalidArgument(format!("--shard `{text}`: expected I/N with 0 ≤ I < N"));
        let (i, n) = text.split_once('/').ok_or_else(bad)?;
        let shard = Self {
            index: i.trim().parse().map_err(|_| bad())?,
            count: n.trim().parse().map_err(|_| bad())?,
        };
        shard.validate().map_err(|_| bad())?;
        Ok(shard)
    }

    fn validate(self) -> Result<Self> {
        if self.count == 0 || self.index >= self.count {
            return Err(Error::InvalidArgument(format!(
                "shard {}/{}: needs 0 ≤ I < N",
                self.index, self.count
            )));
        }
        Ok(self)
    }

    /// The shard to run: `--shard` when given, else the Slurm array task
    /// (`SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN` of
    /// `SLURM_ARRAY_TASK_COUNT`), else Kubernetes' `JOB_COMPLETION_INDEX` of
    /// `--shards N`. `None`: the whole input list.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for malformed values, an index out of
    /// range, or `--shards` without `JOB_COMPLETION_INDEX`.
    pub fn resolve(
        shard: Option<&str>,
        shards: Option<usize>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>> {
        if let Some(text) = shard {
            return Self::parse(text).map(Some);
        }
        if let (Some(id), Some(count)) = (
            number(env, "SLURM_ARRAY_TASK_ID")?,
            number(env, "SLURM_ARRAY_TASK_COUNT")?,
        ) {
            let min = number(env, "SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let index = id.checked_sub(min).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "SLURM_ARRAY_TASK_ID={id} is below SLURM_ARRAY_TASK_MIN={min}"
                ))
            })?;
            return Self { index, count }.validate().map(Some);
        }
        match (number(env, "JOB_COMPLETION_INDEX")?, shards) {
            (Some(index), Some(count)) => Self { index, count }.validate().map(Some),
            (None, Some(_)) => Err(Error::InvalidArgument(
                "--shards N takes the shard index from JOB_COMPLETION_INDEX (a Kubernetes Indexed Job), which is not set: use --shard I/N".into(),
            )),
            _ => Ok(None),
        }
    }

    /// The positions of the `len` inputs this shard processes: a
    /// contiguous block, so every shard of one sorted list is disjoint and
    /// together they cover it.
    pub fn range(self, len: usize) -> Range<usize> {
        let bound = |i: usize| (i as u128 * len as u128 / self.count as u128) as usize;
        bound(self.index)..bound(self.index + 1)
    }

    /// `I-of-N`, as it appears in output names.
    pub fn tag(self) -> String {
        format!("{}-of-{}", self.index, self.count)
    }

    /// `NAME.I-of-N.EXT` for an output `NAME.EXT` (`NAME.I-of-N` without one).
    pub fn output_name(self, path: &Path) -> PathBuf {
        let stem = path
            .file_stem()
            .unwrap_or(path.as_os_str())
            .to_string_lossy();
        let name = match path.extension() {
            Some(ext) => format!("{stem}.{}.{}", self.tag(), ext.to_string_lossy()),
            None => format!("{stem}.{}", self.tag()),
        };
        path.with_file_name(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn shards_cover_the_list_once() {
        for len in [0, 1, 7, 100, 101] {
            for count in 1..6 {
                let mut covered = Vec::new();
                for index in 0..count {
                    covered.extend(Shard { index, count }.range(len));
                }
                assert_eq!(covered, (0..len).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn shard_comes_from_the_flag_slurm_or_kubernetes() {
        let none = env_of(&[]);
        assert_eq!(Shard::resolve(None, None, &none).unwrap(), None);
        let s = Shard::resolve(Some("2/3"), None, &none).unwrap().unwrap();
        assert_eq!((s.index, s.count), (2, 3));
        for bad in ["3/3", "1", "a/2", "0/0"] {
            assert!(Shard::resolve(Some(bad), None, &none).is_err(), "{bad}");
        }
        let slurm = env_of(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "4"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]);
        let s = Shard::resolve(None, None, &slurm).unwrap().unwrap();
        assert_eq!((s.index, s.count), (1, 3));
        let k8s = env_of(&[("JOB_COMPLETION_INDEX", "3")]);
        let s = Shard::resolve(None, Some(4), &k8s).unwrap().unwrap();
        assert_eq!((s.index, s.count), (3, 4));
        assert!(Shard::resolve(None, Some(3), &k8s).is_err());
        assert!(Shard::resolve(None, Some(3), &none).is_err());
        assert_eq!(
            s.output_name(Path::new("out/preds.jsonl")),
            PathBuf::from("out/preds.3-of-4.jsonl")
        );
    }
}
