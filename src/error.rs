//! The crate's one error type.
//!
//! Every fallible library function returns [`Result`]. Messages name what is
//! wrong (file, tensor, expected and found shape) so the command line can print
//! them as a single line.

use std::fmt;
use std::path::{Path, PathBuf};

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One tensor that does not fit the model: missing, unexpected, of the
/// wrong shape or type, or holding non-finite values.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorProblem {
    /// The model needs this tensor and the file lacks it.
    Missing { name: String, expected: Vec<usize> },
    /// The file holds this tensor and the model has no use for it.
    Unexpected { name: String, found: Vec<usize> },
    /// Present, but with another shape.
    WrongShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// Present, but not stored as a float type the model can read.
    WrongDtype { name: String, found: String },
    /// Present, but holding a NaN or an infinity (first one shown).
    NonFinite {
        name: String,
        index: Vec<usize>,
        value: f32,
    },
}

impl fmt::Display for TensorProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing { name, expected } => {
                write!(f, "`{name}` missing (expected shape {expected:?})")
            }
            Self::Unexpected { name, found } => {
                write!(f, "`{name}` unexpected (shape {found:?})")
            }
            Self::WrongShape {
                name,
                expected,
                found,
            } => write!(f, "`{name}` expected shape {expected:?}, found {found:?}"),
            Self::WrongDtype { name, found } => {
                write!(f, "`{name}` has dtype {found}, expected a float type")
            }
            Self::NonFinite { name, index, value } => {
                write!(
                    f,
                    "`{name}` holds the non-finite value {value} at index {index:?}"
                )
            }
        }
    }
}

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file is not what it claims to be (corrupt, truncated, wrong format).
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },

    /// A weights file does not fit the configuration.
    #[error("{}", weights_message(path, problems, fitting_presets))]
    Weights {
        path: PathBuf,
        problems: Vec<TensorProblem>,
        /// Presets whose tensor shapes the file matches exactly.
        fitting_presets: Vec<String>,
    },

    /// A tensor an input file must hold is missing or malformed.
    #[error("{}: tensor `{name}`: {reason}", path.display())]
    InputTensor {
        path: PathBuf,
        name: String,
        reason: String,
    },

    /// A tensor given to the model holds a NaN or an infinity.
    #[error("tensor `{tensor}`: non-finite value {value} at index {index:?}")]
    NonFinite {
        tensor: String,
        /// The first offending element, one index per dimension.
        index: Vec<usize>,
        value: f32,
    },

    /// A size from a file, a configuration or an option beyond what can be
    /// served (see [`crate::limits`]), refused before anything is allocated.
    #[error("{what}: asks for {asked}, the limit is {limit}")]
    TooLarge {
        what: String,
        asked: String,
        limit: String,
    },

    /// An invalid or unknown model configuration.
    #[error("config: {0}")]
    Config(String),

    /// An op was called with inputs whose shapes do not agree.
    #[error("{op}: `{tensor}` expected shape {expected}, found {found}")]
    Shape {
        op: &'static str,
        tensor: &'static str,
        expected: String,
        found: String,
    },

    /// An image could not be decoded or is unusable.
    #[error("{}: {reason}", path.display())]
    Image { path: PathBuf, reason: String },

    /// A request the library cannot serve (for instance a device it was built without).
    #[error("{0}")]
    Unsupported(String),

    /// An argument out of its valid range.
    #[error("{0}")]
    InvalidArgument(String),

    /// A device (GPU or its emulator) failed to run an op.
    #[error("{op}: {reason}")]
    Device { op: String, reason: String },

    /// A broken invariant inside the crate (a bug: please report it).
    #[error("internal error: {0}")]
    Internal(String),
}

fn weights_message(path: &Path, problems: &[TensorProblem], fitting: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut msg = format!(
        "{}: {} tensor(s) do not fit the configuration: ",
        path.display(),
        problems.len()
    );
    let listed: Vec<String> = problems.iter().take(SHOWN).map(|p| p.to_string()).collect();
    msg.push_str(&listed.join("; "));
    if problems.len() > SHOWN {
        msg.push_str(&format!("; and {} more", problems.len() - SHOWN));
    }
    match fitting.len() {
        0 => {}
        1 => msg.push_str(&format!(" (the tensors fit preset `{}`)", fitting[0])),
        _ => msg.push_str(&format!(
            " (the tensors fit presets {})",
            fitting
                .iter()
                .map(|p| format!("`{p}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
    msg
}

/// Checks that buffer `tensor` of `op` holds the elements of `shape`.
///
/// # Errors
/// [`Error::Shape`] naming the op, the tensor, the shape and the length found.
pub fn check_len(
    op: &'static str,
    tensor: &'static str,
    shape: &[usize],
    len: usize,
) -> Result<()> {
    if shape.iter().product::<usize>() == len {
        Ok(())
    } else {
        Err(Error::Shape {
            op,
            tensor,
            expected: format!("{shape:?}"),
            found: format!("{len} elements"),
        })
    }
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// A format error on `path`.
    pub fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// A device failure in `op`.
    pub fn device(op: impl Into<String>, reason: impl fmt::Display) -> Self {
        Self::Device {
            op: op.into(),
            reason: reason.to_string(),
        }
    }

    /// A shape mismatch in `op`.
    pub fn shape(
        op: &'static str,
        tensor: &'static str,
        expected: impl fmt::Debug,
        found: impl fmt::Debug,
    ) -> Self {
        Self::Shape {
            op,
            tensor,
            expected: format!("{expected:?}"),
            found: format!("{found:?}"),
        }
    }
}
