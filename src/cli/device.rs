//! `--device` and `--dtype`: where the model runs and in what storage type,
//! shared by every command that runs a model.

use std::borrow::Borrow;

use autofocus::gpu::Device;
use autofocus::{AutoFocusFormer, BackboneFeatures, DeviceModel, Error, Result, Tensor};

/// Where and in what precision the model runs.
#[derive(Debug, clap::Args)]
pub struct DeviceArgs {
    /// cpu, cuda (GPU 0), cuda:N, or emulator (the CUDA kernels as C++ on
    /// the CPU: slow, for checking); dataset commands also take cuda:N,M,…
    /// and cuda:all (one worker per GPU).
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

/// The backend one worker drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    Emulator,
    Cuda(usize),
}

impl DeviceArgs {
    /// The backends `--device` names: `cpu`, `emulator`, `cuda` (GPU 0),
    /// `cuda:N`, `cuda:N,M,…` or `cuda:all` (every GPU).
    ///
    /// # Errors
    /// An unknown device or dtype, a dtype the CPU backend lacks, no GPU
    /// for `cuda:all`.
    pub fn backends(&self) -> Result<Vec<Backend>> {
        let unknown = || {
            Error::InvalidArgument(format!(
                "unknown --device `{}` (cpu, emulator, cuda, cuda:N, cuda:N,M,…, cuda:all)",
                self.device
            ))
        };
        let backends = match self.device.as_str() {
            "cpu" => vec![Backend::Cpu],
            "emulator" => vec![Backend::Emulator],
            "cuda" => vec![Backend::Cuda(0)],
            "cuda:all" => {
                let count = Device::cuda_count()?;
                if count == 0 {
                    return Err(Error::Unsupported(
                        "--device cuda:all: the driver sees no GPU".into(),
                    ));
                }
                (0..count).map(Backend::Cuda).collect()
            }
            other => {
                let list = other.strip_prefix("cuda:").ok_or_else(unknown)?;
                let mut ordinals: Vec<usize> = list
                    .split(',')
                    .map(|n| n.trim().parse().map_err(|_| unknown()))
                    .collect::<Result<_>>()?;
                let given = ordinals.len();
                ordinals.sort_unstable();
                ordinals.dedup();
                if ordinals.len() != given {
                    return Err(Error::InvalidArgument(format!(
                        "--device {other}: a GPU is named twice"
                    )));
                }
                ordinals.into_iter().map(Backend::Cuda).collect()
            }
        };
        if !["f32", "f16", "bf16"].contains(&self.dtype.as_str()) {
            return Err(Error::InvalidArgument(format!(
                "unknown --dtype `{}` (f32, f16, bf16)",
                self.dtype
            )));
        }
        if backends.contains(&Backend::Cpu) && self.dtype != "f32" {
            return Err(Error::Unsupported(format!(
                "--dtype {}: the CPU backend computes in f32 only (use --device cuda)",
                self.dtype
            )));
        }
        Ok(backends)
    }

    /// The one device asked for, `None` for the CPU backend (commands that
    /// run on a single device).
    ///
    /// # Errors
    /// As [`DeviceArgs::backends`]; more than one device named; CUDA errors.
    pub fn device(&self) -> Result<Option<Device>> {
        match self.backends()?.as_slice() {
            [one] => open(*one),
            _ => Err(Error::InvalidArgument(format!(
                "--device {}: this command runs on one device (dataset commands take several)",
                self.device
            ))),
        }
    }

    /// `model` on the chosen backend (weights uploaded once).
    ///
    /// # Errors
    /// As [`DeviceArgs::device`]; upload errors.
    pub fn runner<'m>(&self, model: &'m AutoFocusFormer) -> Result<Runner<'m>> {
        let device = self.device()?;
        self.runner_on(model, device)
    }

    /// `model` on `device` (`None`: the CPU), in this `--dtype`.
    ///
    /// # Errors
    /// Upload errors.
    pub fn runner_on<'m>(
        &self,
        model: &'m AutoFocusFormer,
        device: Option<Device>,
    ) -> Result<Runner<'m>> {
        let Some(device) = device else {
            return Ok(Runner::Cpu(model));
        };
        Ok(match self.dtype.as_str() {
            "f16" => Runner::F16(DeviceModel::new(model, device)?),
            "bf16" => Runner::Bf16(DeviceModel::new(model, device)?),
            _ => Runner::F32(DeviceModel::new(model, device)?),
        })
    }
}

/// Opens `backend`'s device (`None` for the CPU).
///
/// # Errors
/// CUDA errors naming the GPU.
pub fn open(backend: Backend) -> Result<Option<Device>> {
    Ok(match backend {
        Backend::Cpu => None,
        Backend::Emulator => Some(Device::emulator()),
        Backend::Cuda(ordinal) => Some(Device::cuda(ordinal)?),
    })
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

    /// Class logits of every batch, handed to `each` in order: on a device
    /// through [`DeviceModel::forward_stream`] (the copies overlap the
    /// kernels; an item `None` hands over every batch in flight), on the
    /// CPU one forward after another.
    pub fn forward_stream<B: Borrow<Tensor>>(
        &self,
        batches: impl IntoIterator<Item = Result<Option<B>>>,
        mut each: impl FnMut(Tensor) -> Result<()>,
    ) -> Result<()> {
        match self {
            Self::Cpu(m) => batches.into_iter().try_for_each(|images| match images? {
                Some(images) => each(m.forward(images.borrow())?),
                None => Ok(()),
            }),
            Self::F32(m) => m.forward_stream(batches, each),
            Self::F16(m) => m.forward_stream(batches, each),
            Self::Bf16(m) => m.forward_stream(batches, each),
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

    /// Whether forwards on a GPU replay one CUDA graph per input shape
    /// ([`DeviceModel::set_graphs`]; on by default).
    pub fn set_graphs(&mut self, on: bool) {
        match self {
            Self::Cpu(_) => {}
            Self::F32(m) => m.set_graphs(on),
            Self::F16(m) => m.set_graphs(on),
            Self::Bf16(m) => m.set_graphs(on),
        }
    }

    /// Forwards that replayed a graph so far.
    pub fn graph_replays(&self) -> u64 {
        match self {
            Self::Cpu(_) => 0,
            Self::F32(m) => m.graph_replays(),
            Self::F16(m) => m.graph_replays(),
            Self::Bf16(m) => m.graph_replays(),
        }
    }

    /// The device it runs on (`None`: the CPU path).
    pub fn device(&self) -> Option<&Device> {
        match self {
            Self::Cpu(_) => None,
            Self::F32(m) => Some(m.device()),
            Self::F16(m) => Some(m.device()),
            Self::Bf16(m) => Some(m.device()),
        }
    }

    /// The dense layers' GEMM: `cpu` (the gemm crate), or the device's
    /// (`simt` or `cublaslt`, [`Device::gemm`]).
    ///
    /// # Errors
    /// As [`Device::gemm`].
    pub fn gemm(&self) -> Result<&'static str> {
        match self.device() {
            None => Ok("cpu"),
            Some(device) => Ok(device.gemm()?.name()),
        }
    }
}
