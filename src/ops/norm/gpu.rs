//! LayerNorm on a [`Device`] (`kernels/norm.cu`).

use crate::error::Result;
use crate::gpu::params::LayerNormParams;
use crate::gpu::{Buffer, Device, Element, LaunchConfig, dim, kernel_name};

/// A LayerNorm's affine parameters on a device (kept in f32).
#[derive(Debug)]
pub struct DeviceLayerNorm {
    pub weight: Buffer<f32>,
    pub bias: Buffer<f32>,
}

impl DeviceLayerNorm {
    /// Uploads `norm`.
    ///
    /// # Errors
    /// Device errors.
    pub fn upload(device: &Device, norm: &super::LayerNorm) -> Result<Self> {
        Ok(Self {
            weight: device.upload(&norm.weight)?,
            bias: device.upload(&norm.bias)?,
        })
    }

    /// Features per row.
    pub fn dim(&self) -> usize {
        self.weight.len()
    }
}

const ROWS_PER_BLOCK: usize = 8;

/// Normalises each row of `x` (rows×dim) into `out`.
///
/// # Errors
/// Shape errors naming the buffer; device errors.
pub fn layer_norm<T: Element>(
    device: &Device,
    x: &Buffer<T>,
    norm: &DeviceLayerNorm,
    out: &mut Buffer<T>,
    rows: usize,
) -> Result<()> {
    let x_addr = device.check("layer_norm", "x", x, &[rows, norm.dim()])?;
    launch(device, x_addr, norm, out, rows)
}

/// Normalises each row of `x` (rows×dim) in place.
///
/// # Errors
/// Shape errors naming the buffer; device errors.
pub fn layer_norm_in_place<T: Element>(
    device: &Device,
    x: &mut Buffer<T>,
    norm: &DeviceLayerNorm,
    rows: usize,
) -> Result<()> {
    let x_addr = device.check_mut("layer_norm", "x", x, &[rows, norm.dim()])?;
    launch(device, x_addr, norm, x, rows)
}

fn launch<T: Element>(
    device: &Device,
    x: u64,
    norm: &DeviceLayerNorm,
    out: &mut Buffer<T>,
    rows: usize,
) -> Result<()> {
    const OP: &str = "layer_norm";
    let d = norm.dim();
    let params = LayerNormParams {
        x,
        weight: device.check(OP, "weight", &norm.weight, &[d])?,
        bias: device.check(OP, "bias", &norm.bias, &[d])?,
        out: device.check_mut(OP, "out", out, &[rows, d])?,
        rows: dim(OP, "rows", rows)?,
        dim: dim(OP, "dim", d)?,
        eps: super::EPS,
    };
    if rows == 0 {
        return Ok(());
    }
    let config = LaunchConfig::per_item(OP, rows * 32, (ROWS_PER_BLOCK * 32) as u32)?;
    // SAFETY: the buffers were checked against the shapes the kernel indexes;
    // an in-place `out` is read and written element by element by one lane.
    unsafe { device.launch(&kernel_name::<T>(OP), config, &params) }
}
