//! The linear layer on a [`Device`] (`kernels/linear.cu`): the product on
//! cuBLASLt's tensor cores where the device has it ([`Device::gemm`]),
//! finished by the `linear_epilogue` kernel, else the SIMT kernel, which
//! applies the same epilogue in place.

use crate::error::Result;
use crate::gpu::counts::Event;
use crate::gpu::params::{LinearEpilogueParams, LinearParams};
use crate::gpu::{Buffer, Device, Element, Gemm, LaunchConfig, dim, kernel_name, optional_addr};

/// A linear layer's weights on a device: weight `out × in`, optional bias.
#[derive(Debug)]
pub struct DeviceLinear<T: Element> {
    pub weight: Buffer<T>,
    pub bias: Option<Buffer<T>>,
    pub in_dim: usize,
    pub out_dim: usize,
}

impl<T: Element> DeviceLinear<T> {
    /// Uploads `layer`, converting to `T`.
    ///
    /// # Errors
    /// Device errors.
    pub fn upload(device: &Device, layer: &super::Linear) -> Result<Self> {
        let convert = |v: &[f32]| v.iter().map(|&x| T::from_f32(x)).collect::<Vec<T>>();
        Ok(Self {
            weight: device.upload(&convert(&layer.weight))?,
            bias: layer
                .bias
                .as_ref()
                .map(|b| device.upload(&convert(b)))
                .transpose()?,
            in_dim: layer.in_dim,
            out_dim: layer.out_dim,
        })
    }
}

/// Where a linear layer's result `y` goes.
#[derive(Debug, Clone, Copy)]
pub enum Output<'a> {
    /// `out = y`.
    Overwrite,
    /// `out = out + gamma ∘ y` (a residual branch with optional layer scale).
    Accumulate { gamma: Option<&'a Buffer<f32>> },
}

const TILE: usize = 64;
const THREADS: u32 = 256;

/// `y = x·Wᵀ + b` over `rows` rows of `x` (rows×in), GELU applied when
/// `gelu`, written to `out` (rows×out) as `output` says.
///
/// # Errors
/// Shape errors naming the buffer; device errors.
pub fn linear<T: Element>(
    device: &Device,
    x: &Buffer<T>,
    layer: &DeviceLinear<T>,
    gelu: bool,
    out: &mut Buffer<T>,
    output: Output<'_>,
    rows: usize,
) -> Result<()> {
    const OP: &str = "linear";
    let (k, n) = (layer.in_dim, layer.out_dim);
    // The output first, then the inputs: the order errors are reported in.
    let params = output_params(device, OP, layer, gelu, out, output, rows)?;
    let params = LinearParams {
        x: device.check(OP, "x", x, &[rows, k])?,
        weight: device.check(OP, "weight", &layer.weight, &[n, k])?,
        ..params
    };
    if rows == 0 || n == 0 {
        return Ok(());
    }
    if let (Gemm::CublasLt(lt), true) = (device.gemm()?, k > 0) {
        let mut product = device.alloc::<f32>(rows * n)?;
        let product_addr = device.check_mut(OP, "product", &mut product, &[rows, n])?;
        // SAFETY: `x` and the weight were checked against rows × k and
        // n × k, the product was allocated rows × n, all on this device's
        // stream, which runs the epilogue after the product.
        let shape = (rows, k, n);
        let (x, w) = (params.x, params.weight);
        if unsafe { lt.product(T::SUFFIX, x, w, product_addr, shape)? } {
            device.count(Event::LibraryGemm);
            return launch_epilogue::<T>(device, &product, &params);
        }
        // No cuBLASLt algorithm for this shape: the SIMT kernel below.
    }
    // Rows on the grid's x axis, outputs on y (at most 65 535 tiles of 64).
    let config = LaunchConfig::blocks(OP, rows.div_ceil(TILE), n.div_ceil(TILE), THREADS, 0)?;
    // SAFETY: every buffer was checked against the shapes the kernel indexes;
    // the residual aliases `out` element for element (read, then written, by
    // the same thread).
    unsafe { device.launch(&kernel_name::<T>(OP), config, &params) }
}

/// The epilogue of `params` (bias, GELU, residual and layer scale, into
/// `params.out`) over `product` = x·Wᵀ in f32, rows × out.
fn launch_epilogue<T: Element>(
    device: &Device,
    product: &Buffer<f32>,
    params: &LinearParams,
) -> Result<()> {
    const OP: &str = "linear_epilogue";
    let (rows, n) = (params.rows as usize, params.out_dim as usize);
    let epilogue = LinearEpilogueParams {
        product: device.check(OP, "product", product, &[rows, n])?,
        bias: params.bias,
        residual: params.residual,
        gamma: params.gamma,
        out: params.out,
        rows: params.rows,
        out_dim: params.out_dim,
        gelu: params.gelu,
    };
    let threads = 256;
    let blocks = (rows * n).div_ceil(threads).min(1 << 16);
    let config = LaunchConfig::blocks(OP, blocks, 1, threads as u32, 0)?;
    // SAFETY: the caller checked bias, residual, gamma and out against
    // the layer's shapes; the product was checked above.
    unsafe { device.launch(&kernel_name::<T>(OP), config, &epilogue) }
}

/// `linear`'s result from a product computed elsewhere: `out` as `output`
/// says from `product` = x·Wᵀ (f32, rows × out) and `layer`'s bias, GELU
/// applied when `gelu`. What the cuBLASLt path runs after its product;
/// public so that the emulator tests can check it against the SIMT kernel.
///
/// # Errors
/// Shape errors naming the buffer; device errors.
pub fn linear_epilogue<T: Element>(
    device: &Device,
    product: &Buffer<f32>,
    layer: &DeviceLinear<T>,
    gelu: bool,
    out: &mut Buffer<T>,
    output: Output<'_>,
    rows: usize,
) -> Result<()> {
    const OP: &str = "linear_epilogue";
    let params = output_params(device, OP, layer, gelu, out, output, rows)?;
    if rows == 0 || layer.out_dim == 0 {
        return Ok(());
    }
    launch_epilogue::<T>(device, product, &params)
}

/// `linear`'s parameters but for its inputs (`x` and the weight, left
/// null): the bias, the output and what `output` adds to it, checked
/// against `rows` and the layer's shapes (errors named after `op`). Both
/// GEMMs' epilogues read these.
fn output_params<T: Element>(
    device: &Device,
    op: &'static str,
    layer: &DeviceLinear<T>,
    gelu: bool,
    out: &mut Buffer<T>,
    output: Output<'_>,
    rows: usize,
) -> Result<LinearParams> {
    let n = layer.out_dim;
    let out_addr = device.check_mut(op, "out", out, &[rows, n])?;
    let (residual, gamma) = match output {
        Output::Overwrite => (0, 0),
        Output::Accumulate { gamma } => {
            (out_addr, optional_addr(device, op, "gamma", gamma, &[n])?)
        }
    };
    Ok(LinearParams {
        x: 0,
        weight: 0,
        bias: optional_addr(device, op, "bias", layer.bias.as_ref(), &[n])?,
        residual,
        gamma,
        out: out_addr,
        rows: dim(op, "rows", rows)?,
        in_dim: dim(op, "in_dim", layer.in_dim)?,
        out_dim: dim(op, "out_dim", n)?,
        gelu: i32::from(gelu),
    })
}
