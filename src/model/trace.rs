//! Optional recording of intermediates under the golden files' names
//! (spec §12), for tests and for `autofocus infer --stages`.

use std::collections::BTreeMap;

use crate::tensor::{AnyTensor, Tensor};

/// Which intermediates a [`Trace`] keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceLevel {
    /// Only each stage's output (`stage{s}.out.pos`, `stage{s}.out.feat`).
    StageOutputs,
    /// Everything the golden files hold.
    All,
}

/// Named intermediates of one forward pass.
#[derive(Debug, Clone)]
pub struct Trace {
    level: TraceLevel,
    tensors: BTreeMap<String, AnyTensor>,
}

impl Trace {
    /// An empty trace keeping `level`.
    pub fn new(level: TraceLevel) -> Self {
        Self {
            level,
            tensors: BTreeMap::new(),
        }
    }

    /// The recorded tensors, by name.
    pub fn tensors(&self) -> &BTreeMap<String, AnyTensor> {
        &self.tensors
    }

    /// Consumes the trace, returning its tensors.
    pub fn into_tensors(self) -> BTreeMap<String, AnyTensor> {
        self.tensors
    }

    /// The f32 tensor recorded as `name`.
    pub fn f32(&self, name: &str) -> Option<&Tensor<f32>> {
        match self.tensors.get(name) {
            Some(AnyTensor::F32(t)) => Some(t),
            _ => None,
        }
    }

    /// The i32 tensor recorded as `name`.
    pub fn i32(&self, name: &str) -> Option<&Tensor<i32>> {
        match self.tensors.get(name) {
            Some(AnyTensor::I32(t)) => Some(t),
            _ => None,
        }
    }

    fn wants(&self, name: &str) -> bool {
        match self.level {
            TraceLevel::All => true,
            TraceLevel::StageOutputs => name.ends_with(".out.pos") || name.ends_with(".out.feat"),
        }
    }
}

/// Records `make()` as `name` when a trace is present and wants it; `make` is
/// not called otherwise, so an untraced forward pass copies nothing.
pub(crate) fn record<T: Into<AnyTensor>>(
    trace: &mut Option<&mut Trace>,
    name: impl FnOnce() -> String,
    make: impl FnOnce() -> T,
) {
    if let Some(t) = trace {
        let name = name();
        if t.wants(&name) {
            t.tensors.insert(name, make().into());
        }
    }
}

/// An f32 tensor from a slice and a shape (shapes are right by construction).
pub(crate) fn f32_tensor(shape: &[usize], data: &[f32]) -> Tensor<f32> {
    Tensor::new(shape.to_vec(), data.to_vec()).expect("traced shape matches its data")
}

/// An i32 tensor from indices and a shape.
pub(crate) fn i32_tensor(shape: &[usize], data: impl IntoIterator<Item = i32>) -> Tensor<i32> {
    Tensor::new(shape.to_vec(), data.into_iter().collect()).expect("traced shape matches its data")
}
