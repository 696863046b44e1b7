//! A minimal owned, row-major tensor: a shape and a flat `Vec`.
//!
//! The model works on flat slices with explicit sizes; this type is what
//! crosses the public API (inputs, logits, traced intermediates, files).

use crate::error::{Error, Result};

/// A dense row-major tensor of `T` (f32 values or i32 indices).
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor<T = f32> {
    shape: Vec<usize>,
    data: Vec<T>,
}

impl<T> Tensor<T> {
    /// Wraps `data` as a tensor of `shape`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the element count disagrees with the shape.
    pub fn new(shape: Vec<usize>, data: Vec<T>) -> Result<Self> {
        // Checked: a shape whose product wraps around must not pass for
        // one that matches a short buffer.
        let expected = crate::limits::checked_product(&shape);
        if expected != Some(data.len()) {
            return Err(Error::InvalidArgument(format!(
                "tensor of shape {shape:?} needs {} elements, got {}",
                expected.map_or("more than 2^64".to_string(), |e| e.to_string()),
                data.len()
            )));
        }
        Ok(Self { shape, data })
    }

    /// The shape, outermost dimension first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The elements in row-major order.
    pub fn data(&self) -> &[T] {
        &self.data
    }

    /// The elements in row-major order, mutable.
    pub fn data_mut(&mut self) -> &mut [T] {
        &mut self.data
    }

    /// Consumes the tensor, returning its elements.
    pub fn into_data(self) -> Vec<T> {
        self.data
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when the tensor holds no element.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

impl<T: Clone + Default> Tensor<T> {
    /// A tensor of `shape` filled with `T::default()`.
    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self {
            shape,
            data: vec![T::default(); n],
        }
    }
}

/// The first value of `data` (row-major, of `shape`) that is NaN or
/// infinite, with its index per dimension.
pub fn first_non_finite(shape: &[usize], data: &[f32]) -> Option<(Vec<usize>, f32)> {
    let flat = data.iter().position(|v| !v.is_finite())?;
    let mut index = vec![0; shape.len()];
    let mut rest = flat;
    for (i, &d) in index.iter_mut().zip(shape).rev() {
        if d > 0 {
            *i = rest % d;
            rest /= d;
        }
    }
    Some((index, data[flat]))
}

impl Tensor<f32> {
    /// Checks that every value is finite: the model's clustering and
    /// selection rank values, and a NaN would silently pick arbitrary tokens.
    ///
    /// # Errors
    /// [`Error::NonFinite`] naming `name` and the first offending index.
    pub fn check_finite(&self, name: &str) -> Result<()> {
        match first_non_finite(&self.shape, &self.data) {
            None => Ok(()),
            Some((index, value)) => Err(Error::NonFinite {
                tensor: name.to_string(),
                index,
                value,
            }),
        }
    }
}

/// A tensor of any element type the crate reads or writes.
#[derive(Debug, Clone, PartialEq)]
pub enum AnyTensor {
    F32(Tensor<f32>),
    I32(Tensor<i32>),
    I64(Tensor<i64>),
}

impl AnyTensor {
    /// The shape, outermost dimension first.
    pub fn shape(&self) -> &[usize] {
        match self {
            Self::F32(t) => t.shape(),
            Self::I32(t) => t.shape(),
            Self::I64(t) => t.shape(),
        }
    }
}

impl From<Tensor<f32>> for AnyTensor {
    fn from(t: Tensor<f32>) -> Self {
        Self::F32(t)
    }
}

impl From<Tensor<i32>> for AnyTensor {
    fn from(t: Tensor<i32>) -> Self {
        Self::I32(t)
    }
}

impl From<Tensor<i64>> for AnyTensor {
    fn from(t: Tensor<i64>) -> Self {
        Self::I64(t)
    }
}
