//! Linear layers `y = x·Wᵀ + b` on token rows, backed by the `gemm` crate
//! (runtime-dispatched AVX2/AVX-512 kernels, rayon-parallel).

use crate::error::{Error, Result};
use crate::io::F32Buffer;

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

impl Linear {
    /// `y = x·Wᵀ + b` for `rows` rows of `x` (rows × in); returns rows × out.
    ///
    /// # Errors
    /// [`Error::Shape`] when `x` is not rows × in.
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let mut y = vec![0.0f32; rows * self.out_dim];
        self.forward_into(x, rows, &mut y)?;
        Ok(y)
    }

    /// Like [`forward`](Self::forward), writing into `y` (rows × out).
    ///
    /// # Errors
    /// [`Error::Shape`] when `x` or `y` has the wrong length.
    pub fn forward_into(&self, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
        let (k, n) = (self.in_dim, self.out_dim);
        if x.len() != rows * k {
            return Err(Error::shape("linear", "x", [rows, k], x.len()));
        }
        if y.len() != rows * n {
            return Err(Error::shape("linear", "y", [rows, n], y.len()));
        }
        if self.weight.len() != n * k {
            return Err(Error::shape("linear", "weight", [n, k], self.weight.len()));
        }
        if let Some(b) = &self.bias {
            if b.len() != n {
                return Err(Error::shape("linear", "bias", [n], b.len()));
            }
            for row in y.chunks_exact_mut(n) {
                row.copy_from_slice(b);
            }
        }
        if rows == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            if self.bias.is_none() {
                y.fill(0.0);
            }
            return Ok(());
        }
        let parallelism = if rows * n * k >= PARALLEL_MIN_MACS && rayon::current_num_threads() > 1 {
            gemm::Parallelism::Rayon(rayon::current_num_threads())
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: the lengths were checked above: x is rows×k (row stride k),
        // W is n×k read as its transpose k×n (row stride 1, column stride k),
        // y is rows×n (row stride n). The three buffers do not overlap.
        unsafe {
            gemm::gemm(
                rows,
                n,
                k,
                y.as_mut_ptr(),
                1,
                n as isize,
                self.bias.is_some(),
                x.as_ptr(),
                1,
                k as isize,
                self.weight.as_ptr(),
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
        Ok(())
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
