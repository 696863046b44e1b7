//! Elementwise activations: exact (erf) GELU and the logistic sigmoid.

use multiversion::multiversion;
use rayon::prelude::*;

use super::vector_math;

/// Elements per parallel task of the elementwise ops.
const CHUNK: usize = 1 << 14;

/// Applies the exact GELU ([`vector_math::gelu`]) in place, in parallel.
pub fn gelu(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK).for_each(gelu_serial);
}

/// Applies the exact GELU in place on the calling thread.
#[multiversion(targets = "simd")]
pub fn gelu_serial(x: &mut [f32]) {
    for v in x {
        *v = vector_math::gelu(*v);
    }
}

/// The GELU's backward: `dy · GELU'(z)` per element, in parallel.
pub fn gelu_backward(z: &[f32], grad_y: &[f32]) -> Vec<f32> {
    let mut grad_z = vec![0.0f32; z.len()];
    grad_z
        .par_chunks_mut(CHUNK)
        .zip(z.par_chunks(CHUNK).zip(grad_y.par_chunks(CHUNK)))
        .for_each(|(out, (z, dy))| {
            for ((o, &z), &dy) in out.iter_mut().zip(z).zip(dy) {
                *o = dy * vector_math::gelu_grad(z);
            }
        });
    grad_z
}

/// The logistic sigmoid `1 / (1 + e^-x)`, with [`vector_math::exp`]: a fixed
/// sequence of correctly rounded f32 operations that `sigmoid_exact_twin`
/// in `kernels/common.cuh` repeats step for step, so importance scores are the
/// same bits on the CPU and on a device (a libm `exp` and CUDA's `expf`
/// may differ in the last place).
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + vector_math::exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_matches_reference_values() {
        // x/2 · erfc(−x/√2) at these points, from Python's math.erfc.
        let cases = [
            (0.0, 0.0),
            (1.0, 0.841_344_746_068_542_9),
            (-1.0, -0.158_655_253_931_457_05),
            (3.0, 2.995_950_305_905_11),
            (-3.0, -0.004_049_694_094_890_287),
            (0.1, 0.053_982_783_727_702_9),
            (-6.0, -5.919_525_870_226_207e-9),
        ];
        let mut xs: Vec<f32> = cases.iter().map(|c| c.0 as f32).collect();
        gelu(&mut xs);
        for ((x, want), got) in cases.iter().zip(xs) {
            let got = got as f64;
            assert!(
                (got - want).abs() <= 2e-7 * want.abs().max(1.0),
                "gelu({x}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn sigmoid_is_accurate() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.01;
            let want = 1.0 / (1.0 + (-(x as f64)).exp());
            let got = sigmoid(x) as f64;
            assert!(
                (got - want).abs() <= 3e-7 * want,
                "sigmoid({x}) = {got}, want {want}"
            );
        }
        assert!(sigmoid(-200.0) < 1e-38);
        assert_eq!(sigmoid(200.0), 1.0);
    }

    #[test]
    fn sigmoid_is_symmetric() {
        assert_eq!(sigmoid(0.0), 0.5);
        assert!((sigmoid(2.0) + sigmoid(-2.0) - 1.0).abs() < 1e-7);
    }
}
