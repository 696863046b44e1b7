//! Linear layers `y = x·Wᵀ + b` on token rows, backed by the `gemm` crate
//! (runtime-dispatched AVX2/AVX-512 kernels, rayon-parallel).

use rayon::prelude::*;

use super::activation::gelu_serial;

use crate::error::{Result, check_len};
use crate::io::F32Buffer;

pub mod gpu;

/// What a linear layer applies to its output, fused into the GEMM so each
/// thread finishes its part while it is still in cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    /// `y = x·Wᵀ + b`.
    None,
    /// `y = GELU(x·Wᵀ + b)` (the exact erf GELU).
    Gelu,
}

/// A linear layer with weight `out × in` (PyTorch layout) and optional bias.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: F32Buffer,
    pub bias: Option<F32Buffer>,
    pub in_dim: usize,
    pub out_dim: usize,
}

/// Below this many multiply-adds a GEMM runs on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// From this many rows on, a GEMM uses gemm's own threading.
const GEMM_THREADING_MIN_ROWS: usize = 1024;

/// Fewest rows or columns in one thread's part of a GEMM.
const MIN_PART: usize = 16;

/// An output matrix that parts of one GEMM write concurrently, each its own
/// columns: a raw pointer, because disjoint column blocks of a row-major
/// matrix cannot be expressed as disjoint slices.
#[derive(Clone, Copy)]
struct OutMatrix {
    ptr: *mut f32,
    len: usize,
}

impl OutMatrix {
    fn new(y: &mut [f32]) -> Self {
        Self {
            ptr: y.as_mut_ptr(),
            len: y.len(),
        }
    }
}

// SAFETY: an `OutMatrix` is only shared between GEMM parts that write
// disjoint columns (see `Linear::forward_into`), while the slice it was made
// from is mutably borrowed and so untouched by anyone else.
unsafe impl Send for OutMatrix {}
unsafe impl Sync for OutMatrix {}

/// Applies `epilogue` to `y` in place.
fn apply(epilogue: Epilogue, y: &mut [f32]) {
    match epilogue {
        Epilogue::None => {}
        Epilogue::Gelu => gelu_serial(y),
    }
}

/// `y[:, cols] += x · W[cols]ᵀ` for `x` rows×k and `y` rows×n, on this thread.
fn gemm_part(
    x: &[f32],
    k: usize,
    w: &[f32],
    y: OutMatrix,
    dims: (usize, usize),
    cols: std::ops::Range<usize>,
) {
    gemm_call(x, k, w, y, dims, cols, gemm::Parallelism::None);
}

/// [`gemm_part`] with the given threading.
fn gemm_call(
    x: &[f32],
    k: usize,
    w: &[f32],
    y: OutMatrix,
    (rows, n): (usize, usize),
    cols: std::ops::Range<usize>,
    parallelism: gemm::Parallelism,
) {
    assert!(x.len() >= rows * k && y.len >= rows * n && w.len() >= cols.end * k && cols.end <= n);
    if rows == 0 || cols.is_empty() {
        return;
    }
    // SAFETY: the assertion above bounds every access: x is rows×k (row
    // stride k); the rows `cols` of W (n×k) are read as the k×|cols| matrix
    // Wᵀ (row stride 1, column stride k); y is rows×n (row stride n), of
    // which columns `cols` are written. x, W and y do not overlap.
    unsafe {
        gemm::gemm(
            rows,
            cols.len(),
            k,
            y.ptr.add(cols.start),
            1,
            n as isize,
            true,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr().add(cols.start * k),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

impl Linear {
    /// The layer's parameters, borrowed.
    pub fn view(&self) -> LinearView<'_> {
        LinearView {
            weight: &self.weight[..],
            bias: self.bias.as_deref(),
            in_dim: self.in_dim,
            out_dim: self.out_dim,
        }
    }

    /// `y = x·Wᵀ + b` for `rows` rows of `x` (rows × in); returns rows × out.
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) when `x` is not rows × in.
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.view().forward_with(x, rows, Epilogue::None)
    }

    /// [`forward`](Self::forward) followed by `epilogue`, fused.
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) when `x` is not rows × in.
    pub fn forward_with(&self, x: &[f32], rows: usize, epilogue: Epilogue) -> Result<Vec<f32>> {
        self.view().forward_with(x, rows, epilogue)
    }

    /// Like [`forward`](Self::forward), writing into `y` (rows × out).
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) when `x` or `y` has the wrong length.
    pub fn forward_into(&self, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
        self.view().forward_into(x, rows, y)
    }
}

/// A linear layer's parameters borrowed from wherever they live (a
/// [`Linear`], a candle tensor): weight `out × in` (PyTorch layout) and
/// optional bias.
#[derive(Debug, Clone, Copy)]
pub struct LinearView<'a> {
    pub weight: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub in_dim: usize,
    pub out_dim: usize,
}

impl LinearView<'_> {
    /// `y = epilogue(x·Wᵀ + b)` for `rows` rows of `x` (rows × in); returns
    /// rows × out.
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) when `x` is not rows × in, or
    /// the weight or bias does not have the layer's shape.
    pub fn forward_with(&self, x: &[f32], rows: usize, epilogue: Epilogue) -> Result<Vec<f32>> {
        self.check(x, rows, rows * self.out_dim)?;
        // Start from the bias rows rather than zeros: one pass fewer.
        let mut y = match self.bias {
            Some(b) => b.repeat(rows),
            None => vec![0.0f32; rows * self.out_dim],
        };
        self.accumulate(x, rows, &mut y, epilogue);
        Ok(y)
    }

    /// `y = x·Wᵀ + b`, written into `y` (rows × out).
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) when `x` or `y` has the wrong length.
    pub fn forward_into(&self, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
        self.check(x, rows, y.len())?;
        match self.bias {
            Some(b) => y
                .chunks_exact_mut(self.out_dim)
                .for_each(|row| row.copy_from_slice(b)),
            None => y.fill(0.0),
        }
        self.accumulate(x, rows, y, Epilogue::None);
        Ok(())
    }

    fn check(&self, x: &[f32], rows: usize, y_len: usize) -> Result<()> {
        let (k, n) = (self.in_dim, self.out_dim);
        check_len("linear", "x", &[rows, k], x.len())?;
        check_len("linear", "y", &[rows, n], y_len)?;
        check_len("linear", "weight", &[n, k], self.weight.len())?;
        if let Some(b) = self.bias {
            check_len("linear", "bias", &[n], b.len())?;
        }
        Ok(())
    }

    /// `y = epilogue(y + x·Wᵀ)` (shapes checked by the caller).
    fn accumulate(&self, x: &[f32], rows: usize, y: &mut [f32], epilogue: Epilogue) {
        let (k, n) = (self.in_dim, self.out_dim);
        if rows == 0 || n == 0 || k == 0 {
            return;
        }
        let threads = rayon::current_num_threads();
        if rows * n * k < PARALLEL_MIN_MACS || threads == 1 {
            gemm_part(x, k, self.weight, OutMatrix::new(y), (rows, n), 0..n);
            apply(epilogue, y);
            return;
        }
        if rows >= GEMM_THREADING_MIN_ROWS {
            // Tall products: gemm's own threading shares packed weights best.
            let out = OutMatrix::new(y);
            let parallelism = gemm::Parallelism::Rayon(threads);
            gemm_call(x, k, self.weight, out, (rows, n), 0..n, parallelism);
            if epilogue != Epilogue::None {
                y.par_chunks_mut(n * 64)
                    .for_each(|part| apply(epilogue, part));
            }
        } else if rows >= n {
            // Skinny products (batch-1 inference): one single-threaded GEMM
            // per thread over a part of the larger output dimension, measured
            // faster here than gemm's threading.
            let part_rows = rows.div_ceil(threads).max(MIN_PART);
            y.par_chunks_mut(part_rows * n)
                .zip(x.par_chunks(part_rows * k))
                .for_each(|(y, x)| {
                    let part_rows = x.len() / k;
                    gemm_part(x, k, self.weight, OutMatrix::new(y), (part_rows, n), 0..n);
                    apply(epilogue, y);
                });
        } else {
            let part_cols = n.div_ceil(threads).max(MIN_PART);
            let columns: Vec<std::ops::Range<usize>> = (0..n)
                .step_by(part_cols)
                .map(|c| c..(c + part_cols).min(n))
                .collect();
            let out = OutMatrix::new(y);
            columns
                .into_par_iter()
                .for_each(|cols| gemm_part(x, k, self.weight, out, (rows, n), cols));
            if epilogue != Epilogue::None {
                y.par_chunks_mut(n * 64)
                    .for_each(|part| apply(epilogue, part));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], rows: usize, w: &[f32], b: &[f32], k: usize, n: usize) -> Vec<f32> {
        let mut y = vec![0.0; rows * n];
        for r in 0..rows {
            for o in 0..n {
                y[r * n + o] = b[o] + (0..k).map(|i| x[r * k + i] * w[o * k + i]).sum::<f32>();
            }
        }
        y
    }

    #[test]
    fn matches_naive_on_awkward_sizes() {
        for (rows, k, n) in [
            (1, 1, 1),
            (7, 5, 3),
            (33, 17, 9),
            (129, 64, 96),
            (300, 97, 131),
        ] {
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 53 % 89) as f32 - 44.0) / 44.0)
                .collect();
            let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.1).collect();
            let lin = Linear {
                weight: F32Buffer::owned(w.clone()),
                bias: Some(F32Buffer::owned(b.clone())),
                in_dim: k,
                out_dim: n,
            };
            let got = lin.forward(&x, rows).unwrap();
            let want = naive(&x, rows, &w, &b, k, n);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                    "{rows}×{k}×{n}: {g} vs {w}"
                );
            }
            // The fused GELU epilogue equals GELU applied afterwards.
            let fused = lin.forward_with(&x, rows, Epilogue::Gelu).unwrap();
            let mut after = got.clone();
            crate::ops::activation::gelu(&mut after);
            assert_eq!(fused, after, "{rows}×{k}×{n}");
        }
    }

    #[test]
    fn without_bias_and_with_wrong_shapes() {
        let lin = Linear {
            weight: F32Buffer::owned(vec![1.0, 2.0]),
            bias: None,
            in_dim: 2,
            out_dim: 1,
        };
        assert_eq!(lin.forward(&[3.0, 4.0], 1).unwrap(), [11.0]);
        assert!(lin.forward(&[3.0], 1).is_err());
    }
}
