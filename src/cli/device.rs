//! `--device` and `--dtype`: where the model runs and in what storage type,
//! shared by every command that runs a model.

use autofocus::gpu::Device;
use autofocus::{AutoFocusFormer, BackboneFeatures, DeviceModel, Error, Result, Tensor};

/// Where and in what precision the model runs.
#[derive(Debug, clap::Args)]
pub struct DeviceArgs {
    /// cpu, cuda (GPU 0), or emulator (the CUDA kernels as C++ on the CPU:
    /// slow, for checking).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Storage type of weights and activations on a device: f32, f16 or bf16
    /// (accumulation is f32 throughout; the CPU backend is f32 only).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// A model ready to run on the chosen backend.
pub enum Runner<'m> {
    Cpu(&'m AutoFocusFormer),
    F32(DeviceModel<'m, f32>),
    F16(DeviceModel<'m, half::f16>),
    Bf16(DeviceModel<'m, half::bf16>),
}

impl DeviceArgs {
    /// The device asked for, `None` for the CPU backend.
    ///
    /// # Errors
    /// An unknown device, or a dtype the CPU backend lacks; CUDA errors.
    pub fn device(&self) -> Result<Option<Device>> {
        let device = match self.device.as_str() {
            "cpu" => None,
            "cuda" => Some(Device::cuda(0)?),
            "emulator" => Some(Device::emulator()),
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown --device `{other}` (cpu, cuda, emulator)"
                )));
            }
        };
        if !["f32", "f16", "bf16"].contains(&self.dtype.as_str()) {
            return Err(Error::InvalidArgument(format!(
                "unknown --dtype `{}` (f32, f16, bf16)",
                self.dtype
            )));
        }
        if device.is_none() && self.dtype != "f32" {
            return Err(Error::Unsupported(format!(
                "--dtype {}: the CPU backend computes in f32 only (use --device cuda)",
                self.dtype
            )));
        }
        Ok(device)
    }

    /// `model` on the chosen backend (weights uploaded once).
    ///
    /// # Errors
    /// As [`DeviceArgs::device`]; upload errors.
    pub fn runner<'m>(&self, model: &'m AutoFocusFormer) -> Result<Runner<'m>> {
        let Some(device) = self.device()? else {
            return Ok(Runner::Cpu(model));
        };
        Ok(match self.dtype.as_str() {
            "f16" => Runner::F16(DeviceModel::new(model, device)?),
            "bf16" => Runner::Bf16(DeviceModel::new(model, device)?),
            _ => Runner::F32(DeviceModel::new(model, device)?),
        })
    }
}

impl Runner<'_> {
    /// Class logits, as [`AutoFocusFormer::forward`].
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        match self {
            Self::Cpu(m) => m.forward(images),
            Self::F32(m) => m.forward(images),
            Self::F16(m) => m.forward(images),
            Self::Bf16(m) => m.forward(images),
        }
    }

    /// Backbone features, as [`AutoFocusFormer::features`].
    pub fn features(&self, images: &Tensor) -> Result<BackboneFeatures> {
        match self {
            Self::Cpu(m) => m.features(images),
            Self::F32(m) => m.features(images),
            Self::F16(m) => m.features(images),
            Self::Bf16(m) => m.features(images),
        }
    }

    /// `cpu`, or the device's name.
    pub fn name(&self) -> String {
        match self {
            Self::Cpu(_) => "cpu".into(),
            Self::F32(m) => m.device().name(),
            Self::F16(m) => m.device().name(),
            Self::Bf16(m) => m.device().name(),
        }
    }
}
