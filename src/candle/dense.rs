//! The model's dense layers as candle custom ops on the CPU: a linear layer
//! with its bias (and optionally the erf GELU) fused into one GEMM call, and
//! LayerNorm in one pass per row, both running this crate's CPU kernels
//! ([`crate::ops::LinearView`], [`crate::ops::norm::layer_norm_in_place`]).
//!
//! Written with candle's own tensor ops, a block's dense layers are about
//! thirty ops, each a pass over its tensor and a fresh allocation; at the
//! small shapes of batch-1 inference that per-op cost, not the arithmetic,
//! is most of the candle model's time. The backwards are candle tensor ops
//! (a handful of GEMMs and reductions per layer), so the gradients are
//! candle's own formulas. The GELU variant's backward recomputes the
//! pre-activation (one GEMM) rather than keeping it: the MLP's widest
//! activation is not stored.
//!
//! Other devices use the plain candle ops (cuBLAS, candle's kernels), with
//! the same results up to rounding.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, D, DType, Layout, Module, Result, Shape, Tensor, bail,
};

use super::storage::{f32_values, storage_of};
use crate::ops::LinearView;
use crate::ops::activation::gelu_backward;
use crate::ops::linear::Epilogue;
use crate::ops::norm::{EPS, layer_norm_in_place};

/// The ops' names in error messages.
const LINEAR: &str = "autofocus linear";
const LAYER_NORM: &str = "autofocus layer_norm";
const GELU_BACKWARD: &str = "autofocus gelu backward";

/// `epilogue(x·Wᵀ + b)` for `x` of any shape `…×in`, `weight` out×in and
/// `bias` (out values), differentiable in all three.
///
/// # Errors
/// Shapes that disagree (the message names the tensor, the expected and
/// the found shape), or a dtype other than f32, f16 and bf16.
pub(crate) fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor, gelu: bool) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return linear_generic(x, weight, bias, gelu);
    }
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LinearOp { gelu },
    )
}

/// [`linear`] from candle-nn's layer and candle's GELU (any device).
pub(crate) fn linear_generic(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    gelu: bool,
) -> Result<Tensor> {
    let y = candle_nn::Linear::new(weight.clone(), Some(bias.clone())).forward(x)?;
    if gelu { y.gelu_erf() } else { Ok(y) }
}

/// LayerNorm over the last axis of `x` with affine `weight` and `bias`,
/// differentiable in all three, computed in f32 whatever the dtype.
///
/// # Errors
/// Shapes that disagree, or a dtype other than f32, f16 and bf16.
pub(crate) fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return layer_norm_generic(x, weight, bias);
    }
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, LayerNormOp)
}

/// LayerNorm from candle's differentiable tensor ops (any device).
pub(crate) fn layer_norm_generic(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + f64::from(EPS))?.sqrt()?)?;
    normed
        .broadcast_mul(&weight.to_dtype(DType::F32)?)?
        .broadcast_add(&bias.to_dtype(DType::F32)?)?
        .to_dtype(dtype)
}

/// Checks `x` (…×in), `weight` (out×in) and `bias` (out values); returns
/// (rows, in, out).
fn linear_dims(x: &[usize], weight: &[usize], bias: usize) -> Result<(usize, usize, usize)> {
    let &[out_dim, in_dim] = weight else {
        bail!("{LINEAR}: `weight` must be out × in, found shape {weight:?}")
    };
    match x.last() {
        Some(&last) if last == in_dim => {}
        _ => bail!(
            "{LINEAR}: `x` must have {in_dim} channels last (weight {weight:?}), found shape {x:?}"
        ),
    }
    if bias != out_dim {
        bail!("{LINEAR}: `bias` must hold {out_dim} values, found {bias}");
    }
    Ok((x.iter().product::<usize>() / in_dim, in_dim, out_dim))
}

struct LinearOp {
    gelu: bool,
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        if self.gelu {
            "autofocus-linear-gelu"
        } else {
            "autofocus-linear"
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, in_dim, out_dim) = linear_dims(l1.dims(), l2.dims(), l3.shape().elem_count())?;
        let x = f32_values(LINEAR, "x", s1, l1)?;
        let weight = f32_values(LINEAR, "weight", s2, l2)?;
        let bias = f32_values(LINEAR, "bias", s3, l3)?;
        let layer = LinearView {
            weight: &weight,
            bias: Some(&bias),
            in_dim,
            out_dim,
        };
        let epilogue = if self.gelu {
            Epilogue::Gelu
        } else {
            Epilogue::None
        };
        let y = layer
            .forward_with(&x, rows, epilogue)
            .map_err(candle_core::Error::wrap)?;
        let mut shape = l1.dims().to_vec();
        *shape.last_mut().expect("checked: x has a last axis") = out_dim;
        Ok((storage_of(y, s1.dtype())?, Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, in_dim, out_dim) = linear_dims(x.dims(), weight.dims(), bias.elem_count())?;
        let x2 = x.reshape(((), in_dim))?;
        let grad_y2 = grad_y.reshape(((), out_dim))?;
        let grad_z = if self.gelu {
            let z = x2.matmul(&weight.t()?)?.broadcast_add(bias)?;
            z.apply_op2_no_bwd(&grad_y2, &GeluBackward)?
        } else {
            grad_y2
        };
        let grad_x = grad_z.matmul(weight)?.reshape(x.shape())?;
        let grad_weight = grad_z.t()?.matmul(&x2)?;
        let grad_bias = grad_z.sum(0)?.reshape(bias.shape())?;
        Ok((Some(grad_x), Some(grad_weight), Some(grad_bias)))
    }
}

/// `dz = dy · GELU'(z)`, for inputs (z, dy).
struct GeluBackward;

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "autofocus-gelu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.dims() != l2.dims() {
            bail!(
                "{GELU_BACKWARD}: `z` is {:?} but `dy` is {:?}",
                l1.dims(),
                l2.dims()
            );
        }
        let z = f32_values(GELU_BACKWARD, "z", s1, l1)?;
        let grad_y = f32_values(GELU_BACKWARD, "dy", s2, l2)?;
        let grad_z = gelu_backward(&z, &grad_y);
        Ok((storage_of(grad_z, s2.dtype())?, l1.shape().clone()))
    }
}

struct LayerNormOp;

impl LayerNormOp {
    fn check(x: &[usize], weight: usize, bias: usize) -> Result<()> {
        match x.last() {
            Some(&c) if c == weight && c == bias => Ok(()),
            _ => bail!(
                "{LAYER_NORM}: `x` must have as many channels last as `weight` ({weight}) and `bias` ({bias}) hold, found shape {x:?}"
            ),
        }
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "autofocus-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Self::check(l1.dims(), l2.shape().elem_count(), l3.shape().elem_count())?;
        let mut y = f32_values(LAYER_NORM, "x", s1, l1)?.into_owned();
        let weight = f32_values(LAYER_NORM, "weight", s2, l2)?;
        let bias = f32_values(LAYER_NORM, "bias", s3, l3)?;
        layer_norm_in_place(&mut y, &weight, &bias).map_err(candle_core::Error::wrap)?;
        Ok((storage_of(y, s1.dtype())?, l1.shape().clone()))
    }

    /// With `x̂ = (x − μ)·r` (r = 1/√(σ² + ε)) and `g = dy·w`:
    /// `dx = r·(g − mean(g) − x̂·mean(g·x̂))`, `dw = Σ dy·x̂`, `db = Σ dy`
    /// over the rows; in f32.
    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Self::check(x.dims(), weight.elem_count(), bias.elem_count())?;
        let c = weight.elem_count();
        let f32_rows = |t: &Tensor| t.to_dtype(DType::F32)?.reshape(((), c));
        let (x32, grad_y32) = (f32_rows(x)?, f32_rows(grad_y)?);
        let centred = x32.broadcast_sub(&x32.mean_keepdim(1)?)?;
        let var = centred.sqr()?.mean_keepdim(1)?;
        let inv_std = (var + f64::from(EPS))?.sqrt()?.recip()?;
        let normed = centred.broadcast_mul(&inv_std)?;
        let g = grad_y32.broadcast_mul(&weight.to_dtype(DType::F32)?.reshape((1, c))?)?;
        let g_mean = g.mean_keepdim(1)?;
        let gx_mean = (&g * &normed)?.mean_keepdim(1)?;
        let grad_x = g
            .broadcast_sub(&g_mean)?
            .sub(&normed.broadcast_mul(&gx_mean)?)?
            .broadcast_mul(&inv_std)?;
        let grad_weight = (&grad_y32 * &normed)?.sum(0)?;
        let grad_bias = grad_y32.sum(0)?;
        Ok((
            Some(grad_x.to_dtype(x.dtype())?.reshape(x.shape())?),
            Some(
                grad_weight
                    .to_dtype(weight.dtype())?
                    .reshape(weight.shape())?,
            ),
            Some(grad_bias.to_dtype(bias.dtype())?.reshape(bias.shape())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::candle::test_util::{assert_close, var};

    /// The fused op and the plain candle ops: same output, same gradients
    /// of a weighted sum (weights not all equal, so every path counts).
    fn compare(
        fused: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
        plain: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
        shapes: [&[usize]; 3],
        out_shape: &[usize],
    ) {
        let [x, w, b] = [var(shapes[0], 1), var(shapes[1], 2), var(shapes[2], 3)];
        let mix = var(out_shape, 4);
        let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>| {
            let y = f(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
            let grads = (&y * mix.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grad = |v: &Var| grads.get(v).expect("a gradient").clone();
            (y, grad(&x), grad(&w), grad(&b))
        };
        let (got, want) = (run(&fused), run(&plain));
        assert_close(&got.0, &want.0, "output");
        assert_close(&got.1, &want.1, "dx");
        assert_close(&got.2, &want.2, "dweight");
        assert_close(&got.3, &want.3, "dbias");
    }

    #[test]
    fn linear_matches_candle_ops_with_and_without_gelu() {
        for gelu in [false, true] {
            let plain = |x: &Tensor, w: &Tensor, b: &Tensor| linear_generic(x, w, b, gelu);
            let fused = |x: &Tensor, w: &Tensor, b: &Tensor| linear(x, w, b, gelu);
            compare(fused, plain, [&[2, 37, 24], &[40, 24], &[40]], &[2, 37, 40]);
            compare(fused, plain, [&[5, 3], &[1, 3], &[1]], &[5, 1]);
        }
    }

    #[test]
    fn layer_norm_matches_candle_ops() {
        compare(
            layer_norm,
            layer_norm_generic,
            [&[3, 19, 24], &[24], &[24]],
            &[3, 19, 24],
        );
        compare(
            layer_norm,
            layer_norm_generic,
            [&[7, 4], &[4], &[4]],
            &[7, 4],
        );
    }

    /// bf16 tensors: bf16 results and gradients, near the f32 ones.
    #[test]
    fn half_precision_in_half_precision_out() {
        let bf16 =
            |v: &Var| Var::from_tensor(&v.as_tensor().to_dtype(DType::BF16).unwrap()).unwrap();
        let max_diff = |a: &Tensor, b: &Tensor| {
            let a = a.to_dtype(DType::F32).unwrap();
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            d.to_scalar::<f32>().unwrap()
        };
        type Layer = fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;
        let cases: [(Layer, [&[usize]; 3]); 2] = [
            (|x, w, b| linear(x, w, b, true), [&[2, 5, 8], &[6, 8], &[6]]),
            (layer_norm, [&[2, 5, 8], &[8], &[8]]),
        ];
        for (layer, shapes) in cases {
            let vars = [var(shapes[0], 1), var(shapes[1], 2), var(shapes[2], 3)];
            let [x, w, b] = vars.each_ref().map(Var::as_tensor);
            let want = layer(x, w, b).unwrap();
            let half = vars.each_ref().map(bf16);
            let [xh, wh, bh] = half.each_ref().map(Var::as_tensor);
            let got = layer(xh, wh, bh).unwrap();
            assert_eq!(got.dtype(), DType::BF16);
            assert!(max_diff(&got, &want) < 0.15, "{}", max_diff(&got, &want));
            let grads = got.sum_all().unwrap().backward().unwrap();
            for v in &half {
                assert_eq!(grads.get(v).expect("a gradient").dtype(), DType::BF16);
            }
        }
    }

    #[test]
    fn shape_errors_name_the_tensor() {
        let t = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        let err = linear(&t(&[2, 5]), &t(&[3, 4]), &t(&[3]), false).unwrap_err();
        assert!(
            err.to_string().contains("`x` must have 4 channels"),
            "{err}"
        );
        let err = linear(&t(&[2, 4]), &t(&[3, 4]), &t(&[2]), true).unwrap_err();
        assert!(err.to_string().contains("`bias` must hold 3"), "{err}");
        let err = layer_norm(&t(&[2, 4]), &t(&[4]), &t(&[3])).unwrap_err();
        assert!(err.to_string().contains("layer_norm"), "{err}");
    }
}
