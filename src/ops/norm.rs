//! LayerNorm over the channels of token rows, and eval-mode BatchNorm.

use multiversion::multiversion;
use rayon::prelude::*;

use super::vector_math;

use crate::error::{Error, Result, check_len};
use crate::io::F32Buffer;

pub mod gpu;

/// The epsilon of every normalisation in AFF.
pub const EPS: f32 = 1e-5;

/// LayerNorm with affine weight and bias over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: F32Buffer,
    pub bias: F32Buffer,
}

impl LayerNorm {
    /// Channels normalised.
    pub fn dim(&self) -> usize {
        self.weight.len()
    }

    /// Normalises each row of `x` (rows × dim) into a new buffer.
    ///
    /// # Errors
    /// [`Error::Shape`] when `x` is not a whole number of rows.
    pub fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        let mut y = x.to_vec();
        self.forward_in_place(&mut y)?;
        Ok(y)
    }

    /// Normalises each row of `x` in place.
    ///
    /// # Errors
    /// [`Error::Shape`] when `x` is not a whole number of rows.
    pub fn forward_in_place(&self, x: &mut [f32]) -> Result<()> {
        layer_norm_in_place(x, &self.weight, &self.bias)
    }
}

/// LayerNorm of each row of `x` (rows × `weight.len()`) in place, with
/// affine `weight` and `bias`, rows in parallel.
///
/// # Errors
/// [`Error::Shape`] when `x` is not a whole number of rows or `bias` is
/// not as long as `weight`.
pub fn layer_norm_in_place(x: &mut [f32], weight: &[f32], bias: &[f32]) -> Result<()> {
    let c = weight.len();
    if c == 0 || !x.len().is_multiple_of(c) {
        return Err(Error::shape(
            "layer_norm",
            "x",
            format!("rows×{c}"),
            x.len(),
        ));
    }
    check_len("layer_norm", "bias", &[c], bias.len())?;
    let rows_per_task = (4096 / c).max(1);
    x.par_chunks_mut(rows_per_task * c)
        .for_each(|rows| normalise_rows(rows, weight, bias));
    Ok(())
}

#[multiversion(targets = "simd")]
fn normalise_rows(rows: &mut [f32], w: &[f32], b: &[f32]) {
    for row in rows.chunks_exact_mut(w.len()) {
        normalise_row(row, w, b);
    }
}

/// Biased-variance normalisation of one row, as `torch.nn.LayerNorm`.
#[inline(always)]
pub fn normalise_row(row: &mut [f32], w: &[f32], b: &[f32]) {
    let n = row.len() as f32;
    let mean = vector_math::sum(row) / n;
    let var = vector_math::sum_sq_dev(row, mean) / n;
    let inv = 1.0 / (var + EPS).sqrt();
    for ((v, &g), &beta) in row.iter_mut().zip(w).zip(b) {
        *v = (*v - mean) * inv * g + beta;
    }
}

/// Eval-mode BatchNorm: running statistics, affine, over channels.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    pub weight: F32Buffer,
    pub bias: F32Buffer,
    pub running_mean: F32Buffer,
    pub running_var: F32Buffer,
}

impl BatchNorm {
    /// The per-channel affine map it amounts to, `bn(x) = x·scale + shift`:
    /// `scale = w/√(var + ε)`, `shift = b − mean·scale`.
    pub fn scale_shift(&self) -> (Vec<f32>, Vec<f32>) {
        let scale: Vec<f32> = (0..self.weight.len())
            .map(|i| self.weight[i] / (self.running_var[i] + EPS).sqrt())
            .collect();
        let shift = (0..self.weight.len())
            .map(|i| self.bias[i] - self.running_mean[i] * scale[i])
            .collect();
        (scale, shift)
    }

    /// Normalises channels-last data `x` (pixels × channels) in place.
    ///
    /// # Errors
    /// [`Error::Shape`] when `x` is not a whole number of pixels.
    pub fn forward_channels_last(&self, x: &mut [f32]) -> Result<()> {
        let c = self.weight.len();
        if c == 0 || !x.len().is_multiple_of(c) {
            return Err(Error::shape(
                "batch_norm",
                "x",
                format!("pixels×{c}"),
                x.len(),
            ));
        }
        let (scale, shift) = self.scale_shift();
        x.par_chunks_mut(c * 1024).for_each(|px| {
            for p in px.chunks_exact_mut(c) {
                for ((v, s), t) in p.iter_mut().zip(&scale).zip(&shift) {
                    *v = *v * s + t;
                }
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_rows_have_zero_mean_unit_variance() {
        let ln = LayerNorm {
            weight: F32Buffer::owned(vec![1.0; 4]),
            bias: F32Buffer::owned(vec![0.0; 4]),
        };
        let y = ln
            .forward(&[1.0, 2.0, 3.0, 4.0, -1.0, -1.0, -1.0, -1.0])
            .unwrap();
        let s = (1.25f32 + 1e-5).sqrt();
        let want = [-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s, 0.0, 0.0, 0.0, 0.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6);
        }
        assert!(ln.forward(&[1.0; 5]).is_err());
    }

    #[test]
    fn batch_norm_uses_running_statistics() {
        let bn = BatchNorm {
            weight: F32Buffer::owned(vec![2.0]),
            bias: F32Buffer::owned(vec![1.0]),
            running_mean: F32Buffer::owned(vec![3.0]),
            running_var: F32Buffer::owned(vec![4.0 - 1e-5]),
        };
        let mut x = [5.0, 3.0];
        bn.forward_channels_last(&mut x).unwrap();
        assert!((x[0] - 3.0).abs() < 1e-6 && (x[1] - 1.0).abs() < 1e-6);
    }
}
