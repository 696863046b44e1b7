//! Between candle's storages and the f32 slices the CPU ops take.

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Layout, Result, Tensor, bail};
use half::{bf16, f16};

/// The values of a contiguous f32, f16 or bf16 storage as f32 (borrowed
/// when already f32). `what` names the input in errors.
pub(crate) fn f32_values<'a>(
    op: &str,
    what: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<Cow<'a, [f32]>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op}: `{what}` must be contiguous (call `.contiguous()`)")
    };
    Ok(match storage {
        CpuStorage::F32(v) => Cow::Borrowed(&v[start..end]),
        CpuStorage::F16(v) => Cow::Owned(v[start..end].iter().map(|x| x.to_f32()).collect()),
        CpuStorage::BF16(v) => Cow::Owned(v[start..end].iter().map(|x| x.to_f32()).collect()),
        other => bail!(
            "{op}: `{what}` must be f32, f16 or bf16, found {:?}",
            other.dtype()
        ),
    })
}

/// f32 values as a storage of `dtype` (f32, f16 or bf16).
pub(crate) fn storage_of(values: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(values),
        DType::F16 => CpuStorage::F16(values.into_iter().map(f16::from_f32).collect()),
        DType::BF16 => CpuStorage::BF16(values.into_iter().map(bf16::from_f32).collect()),
        other => bail!("autofocus ops take f32, f16 or bf16 tensors, found {other:?}"),
    })
}

/// A tensor's values as f32, in its logical (row-major) order.
pub(crate) fn tensor_values(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// f32 values as a tensor of `shape`, `dtype` and `device`.
pub(crate) fn tensor_of(
    values: Vec<f32>,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    Tensor::from_vec(values, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

/// An op's small parameters as one tensor (a custom op takes at most three
/// inputs; `cat`'s backward splits their gradient): `matrix` (name, tensor,
/// shape, what its axes are) must have exactly its shape, so that a
/// transposed weight cannot pass; each of `vectors` (name, tensor, count)
/// its count of values, in any shape.
pub(crate) fn pack_params(
    op: &str,
    (name, matrix, shape, axes): (&str, &Tensor, [usize; 2], &str),
    vectors: [(&str, &Tensor, usize); 3],
) -> Result<Tensor> {
    if matrix.dims() != shape {
        bail!(
            "{op}: `{name}` must have shape {shape:?} ({axes}), found {:?}",
            matrix.dims()
        );
    }
    let mut parts = vec![matrix.flatten_all()?];
    for (name, t, count) in vectors {
        if t.elem_count() != count {
            bail!(
                "{op}: `{name}` must hold {count} values, found shape {:?}",
                t.dims()
            );
        }
        parts.push(t.flatten_all()?);
    }
    Tensor::cat(&parts, 0)
}
