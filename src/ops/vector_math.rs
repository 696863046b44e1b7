//! Branch-free f32 math that compilers vectorise: `exp`, GELU, reductions.
//!
//! Every function here is `#[inline(always)]` so that it is compiled inside
//! the callers' multiversioned loops (AVX2/AVX-512 when the CPU has them) and
//! vectorised there. Accuracy is a few ulp, far inside the 1e-4 the model is
//! held to; the tests below check it against f64.

/// Lanes of the accumulators of [`sum`] and friends: wide enough for AVX-512.
pub const LANES: usize = 16;

/// `e^x` in f32, relative error below 2e-7 for x in [-87, 88]; inputs below
/// that range give 0 (never a subnormal: those are slow), above it saturate.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part exact in f32 products and a correction (Cody–Waite).
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5·2^23 rounds to the nearest integer n, which then sits in
    // the low mantissa bits: read it from there (an `as` cast would not vectorise).
    const ROUND: f32 = 12_582_912.0;
    // Written as selects so NaN propagates (`f32::min` would drop it).
    let x_in = x;
    let x = if x > 88.0 { 88.0 } else { x };
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Taylor series of e^r to degree 7 for |r| ≤ ln2/2: error < 5e-9.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n: the biased exponent n + 127 in the exponent field.
    let biased = shifted
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(127);
    let scale = f32::from_bits(biased << 23);
    if x_in < -87.0 { 0.0 } else { p * scale }
}

/// The exact (erf) GELU, `x · Φ(x) = x/2 · erfc(−x/√2)`, absolute error
/// below 2e-7·max(1, |x|).
///
/// `erfc` uses the Chebyshev fit of Numerical Recipes §6.2 (relative error
/// < 1.2e-7), which stays accurate in both tails, so there is no cancellation
/// for negative `x`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * erfc_of_minus_scaled(x)
}

/// The derivative of the exact GELU, `Φ(x) + x·φ(x)`, with the same `erfc`.
#[inline(always)]
pub fn gelu_grad(x: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    0.5 * erfc_of_minus_scaled(x) + x * INV_SQRT_2PI * exp(-0.5 * x * x)
}

/// `erfc(−x/√2)` (= 2Φ(x)), shared by the GELU and its derivative.
#[inline(always)]
fn erfc_of_minus_scaled(x: f32) -> f32 {
    let u = -x * std::f32::consts::FRAC_1_SQRT_2;
    let z = u.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204
                                + t * (1.488_515_9 + t * (-0.822_152_2 + t * 0.170_872_77))))))));
    // Beyond z = 9, erfc(z) < 1e-36: flush it rather than go subnormal.
    let r = if z < 9.0 { t * exp(poly - z * z) } else { 0.0 };
    if u >= 0.0 { r } else { 2.0 - r }
}

/// Sum of a slice with [`LANES`] independent accumulators (vectorisable).
#[inline(always)]
pub fn sum(v: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    reduce(acc) + tail.iter().sum::<f32>()
}

/// The larger of `a` and `x`, NaN if either is (unlike `f32::max`, which
/// drops NaN).
#[inline(always)]
pub fn max_nan(a: f32, x: f32) -> f32 {
    if x > a || x.is_nan() { x } else { a }
}

/// Largest element (`-inf` for an empty slice; NaN propagates), vectorisable.
#[inline(always)]
pub fn max(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = max_nan(acc[l], c[l]);
        }
    }
    acc.into_iter()
        .chain(tail.iter().copied())
        .fold(f32::NEG_INFINITY, max_nan)
}

/// Below this, `e^(v − max)` is dropped from a softmax: the terms are under
/// 1e-26 of the largest (invisible in f32), and their products with the
/// values could be subnormal, which costs a hundred cycles each.
const SOFTMAX_CUTOFF: f32 = -60.0;

/// Replaces each `v` by `e^(v − shift)` (0 when `v − shift < −60`) and
/// returns their sum, vectorisable. With `shift` the maximum, these are the
/// unnormalised softmax weights.
#[inline(always)]
pub fn exp_sum(v: &mut [f32], shift: f32) -> f32 {
    let weight = |x: f32| {
        let d = x - shift;
        if d < SOFTMAX_CUTOFF { 0.0 } else { exp(d) }
    };
    let mut acc = [0.0f32; LANES];
    let mut chunks = v.chunks_exact_mut(LANES);
    for c in chunks.by_ref() {
        for l in 0..LANES {
            c[l] = weight(c[l]);
            acc[l] += c[l];
        }
    }
    let mut tail = 0.0;
    for x in chunks.into_remainder() {
        *x = weight(*x);
        tail += *x;
    }
    reduce(acc) + tail
}

/// Sum of squared deviations from `mean`, vectorisable.
#[inline(always)]
pub fn sum_sq_dev(v: &[f32], mean: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            let d = c[l] - mean;
            acc[l] += d * d;
        }
    }
    reduce(acc) + tail.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>()
}

/// Dot product, vectorisable.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    reduce(acc) + tail
}

/// Pairwise (tree) sum of the lanes.
#[inline(always)]
fn reduce(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    acc[0]
}

/// `y += a · x`, vectorisable.
#[inline(always)]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yv, &xv) in y.iter_mut().zip(x) {
        *yv += a * xv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gelu_f64(x: f64) -> f64 {
        // Φ via the complementary error function's continued fraction is
        // overkill here: integrate the normal density with Simpson's rule.
        let phi = |x: f64| {
            let (a, n) = (-12.0f64, 20_000);
            let h = (x - a) / n as f64;
            let f = |t: f64| (-0.5 * t * t).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let mut s = f(a) + f(x);
            for i in 1..n {
                s += f(a + i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
            }
            s * h / 3.0
        };
        x * phi(x)
    }

    #[test]
    fn exp_is_accurate_across_its_range() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_is_accurate() {
        let mut x = -10.0f32;
        while x < 10.0 {
            let want = gelu_f64(x as f64);
            let got = gelu(x) as f64;
            let tol = 2e-7 * (x.abs() as f64).max(1.0);
            assert!((got - want).abs() <= tol, "gelu({x}) = {got}, want {want}");
            x += 0.0173;
        }
        assert_eq!(gelu(0.0), 0.0);
    }

    #[test]
    fn reductions_match_sequential_sums() {
        let v: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let s: f64 = v.iter().map(|&x| x as f64).sum();
        assert!((sum(&v) as f64 - s).abs() < 1e-5);
        let d: f64 = v.iter().zip(&w).map(|(&a, &b)| a as f64 * b as f64).sum();
        assert!((dot(&v, &w) as f64 - d).abs() < 1e-5);
        let biggest = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(max(&v), biggest);
        assert!(max(&[1.0, f32::NAN, 3.0]).is_nan());
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        let mut e = v.clone();
        let total = exp_sum(&mut e, 0.5);
        let want: f64 = v.iter().map(|&x| (x as f64 - 0.5).exp()).sum();
        assert!((total as f64 - want).abs() < 1e-5 * want);
        assert!((e[3] as f64 - (v[3] as f64 - 0.5).exp()).abs() < 1e-6);
        let mut far = [0.0f32, -59.0, -61.0, -1000.0];
        exp_sum(&mut far, 0.0);
        assert_eq!((far[0], far[2], far[3]), (1.0, 0.0, 0.0));
        assert!(far[1] > 0.0);
        let m = (s / 37.0) as f32;
        let q: f64 = v.iter().map(|&x| ((x - m) as f64).powi(2)).sum();
        assert!((sum_sq_dev(&v, m) as f64 - q).abs() < 1e-5);
    }
}
