//! The whole model on a [`Device`]: weights uploaded once, then every stage
//! runs as kernels (layout, blocks, selection, merge, head) with the
//! activations staying on the device. The patch embedding still runs on the
//! CPU (its tokens are uploaded once per batch).

use super::AutoFocusFormer;
use super::weights::{BlockWeights, Head, MergeWeights};
use crate::error::{Error, Result};
use crate::gpu::tensor_ops::{gather_rows, mean_tokens};
use crate::gpu::{Buffer, Device, Element};
use crate::ops::cluster_attention::gpu::{DeviceAttentionInputs, cluster_attention};
use crate::ops::clustering::gpu::space_filling_cluster;
use crate::ops::clustering::round_half_even;
use crate::ops::linear::gpu::{DeviceLinear, Output, linear};
use crate::ops::neighbourhood::gpu::{DeviceNeighbourhood, nearest_neighbourhoods};
use crate::ops::norm::gpu::{DeviceLayerNorm, layer_norm, layer_norm_in_place};
use crate::ops::pointconv_merge::INNER_CHANNELS;
use crate::ops::pointconv_merge::gpu::{DeviceMergeInputs, DeviceWeightNet, pointconv_merge};
use crate::ops::token_selection::gpu::{importance, select_tokens};
use crate::profile;
use crate::tensor::Tensor;

struct DeviceBlock<T: Element> {
    norm1: DeviceLayerNorm,
    q: DeviceLinear<T>,
    kv: DeviceLinear<T>,
    proj: DeviceLinear<T>,
    pos_weight: Buffer<f32>,
    pos_bias: Buffer<f32>,
    blank_k: Buffer<f32>,
    blank_v: Buffer<f32>,
    heads: usize,
    norm2: DeviceLayerNorm,
    fc1: DeviceLinear<T>,
    fc2: DeviceLinear<T>,
    gamma1: Option<Buffer<f32>>,
    gamma2: Option<Buffer<f32>>,
}

struct DeviceMerge<T: Element> {
    prob_weight: Buffer<f32>,
    prob_bias: f32,
    weight_net: DeviceWeightNet,
    norm: DeviceLayerNorm,
    linear: DeviceLinear<T>,
}

struct DeviceStage<T: Element> {
    blocks: Vec<DeviceBlock<T>>,
    merge: Option<DeviceMerge<T>>,
}

/// An [`AutoFocusFormer`] classifier with its weights on a device, stored
/// as `T` (f32, f16 or bf16; LayerNorm, importance and position parameters
/// stay f32, and every kernel accumulates in f32).
pub struct DeviceModel<'m, T: Element> {
    model: &'m AutoFocusFormer,
    device: Device,
    stages: Vec<DeviceStage<T>>,
    norm: DeviceLayerNorm,
    head: DeviceLinear<T>,
}

/// Tokens on the device between stages.
struct DeviceTokens<T: Element> {
    batch: usize,
    tokens: usize,
    channels: usize,
    pos: Buffer<f32>,
    feat: Buffer<T>,
}

impl<'m, T: Element> DeviceModel<'m, T> {
    /// Uploads `model`'s weights to `device`.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for a segmentation backbone (the device path
    /// runs classifiers); device errors.
    pub fn new(model: &'m AutoFocusFormer, device: Device) -> Result<Self> {
        let weights = model.weights();
        let Head::Classifier { norm, head } = &weights.head else {
            return Err(Error::Unsupported(
                "the device path runs classifiers; segmentation backbones run on the CPU".into(),
            ));
        };
        let stages = weights
            .stages
            .iter()
            .map(|stage| {
                Ok(DeviceStage {
                    blocks: stage
                        .blocks
                        .iter()
                        .map(|b| upload_block(&device, b))
                        .collect::<Result<_>>()?,
                    merge: stage
                        .merge
                        .as_ref()
                        .map(|m| upload_merge(&device, m))
                        .transpose()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            model,
            stages,
            norm: DeviceLayerNorm::upload(&device, norm)?,
            head: DeviceLinear::upload(&device, head)?,
            device,
        })
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Class logits (b × classes) for normalised images (b×3×H×W).
    ///
    /// # Errors
    /// As [`AutoFocusFormer::forward`]; device errors.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let (tokens, grid) = self.model.embed(images, None)?;
        let device = &self.device;
        let convert: Vec<T> = tokens.feat.iter().map(|&v| T::from_f32(v)).collect();
        let mut x = DeviceTokens {
            batch: tokens.batch,
            tokens: tokens.tokens,
            channels: tokens.channels,
            pos: device.upload(&tokens.pos)?,
            feat: device.upload(&convert)?,
        };
        for s in 0..self.stages.len() {
            x = self.run_stage(s, x, grid)?;
        }
        let _t = profile::scope("head");
        let (b, n, c) = (x.batch, x.tokens, x.channels);
        layer_norm_in_place(device, &mut x.feat, &self.norm, b * n)?;
        let mut pooled = device.alloc::<T>(b * c)?;
        mean_tokens(device, &x.feat, &mut pooled, (b, n, c))?;
        let classes = self.head.out_dim;
        let mut logits = device.alloc::<T>(b * classes)?;
        linear(
            device,
            &pooled,
            &self.head,
            false,
            &mut logits,
            Output::Overwrite,
            b,
        )?;
        let logits = device
            .download(&logits)?
            .into_iter()
            .map(T::to_f32)
            .collect();
        Tensor::new(vec![b, classes], logits)
    }

    fn run_stage(
        &self,
        s: usize,
        x: DeviceTokens<T>,
        grid: (usize, usize),
    ) -> Result<DeviceTokens<T>> {
        let device = &self.device;
        let config = self.model.config();
        let (b, n, c) = (x.batch, x.tokens, x.channels);
        let nbhd_size = config.nbhd_size[s];
        let _stage = profile::scope(if s == 0 { "stage0" } else { "stage" });

        // Layout (spec §3–4): global, or clusters and their neighbourhoods.
        let (pos, mut feat, nbhd) = if nbhd_size >= n {
            (x.pos, x.feat, DeviceNeighbourhood::global(n))
        } else {
            let _t = profile::scope("layout");
            let s_c = config.cluster_size;
            let clustering = space_filling_cluster(device, &x.pos, b, n, s_c, grid)?;
            let k = clustering.clusters;
            let nnc = (round_half_even(nbhd_size as f64 / s_c as f64) as usize).clamp(1, k);
            let nbhd = nearest_neighbourhoods(
                device,
                &clustering.pos,
                &clustering.means,
                (b, n, k),
                nnc,
                clustering.cluster_size,
            )?;
            let mut feat = device.alloc::<T>(b * n * c)?;
            gather_rows(
                device,
                &x.feat,
                &clustering.reorder,
                &mut feat,
                (b, n, n, c),
            )?;
            (clustering.pos, feat, nbhd)
        };

        let stage = &self.stages[s];
        for block in &stage.blocks {
            self.run_block(block, &mut feat, &pos, &nbhd, (b, n, c))?;
        }
        let Some(merge) = &stage.merge else {
            return Ok(DeviceTokens {
                batch: b,
                tokens: n,
                channels: c,
                pos,
                feat,
            });
        };

        // Importance, selection and PointConv merge (spec §7).
        let _t = profile::scope("merge");
        let mut p = device.alloc::<f32>(b * n)?;
        importance(
            device,
            &feat,
            &merge.prob_weight,
            merge.prob_bias,
            &mut p,
            (b * n, c),
        )?;
        let stride = 2usize << s;
        let selection = select_tokens(
            device,
            &pos,
            &p,
            b,
            n,
            stride,
            config.alpha as f32,
            config.ds_rate,
        )?;
        let kept = selection.kept;
        let mut merged = device.alloc::<T>(b * kept * INNER_CHANNELS * c)?;
        let inputs = DeviceMergeInputs {
            feat: &feat,
            importance: &p,
            nbhd: &nbhd,
            centres: &selection.order,
            pos: &pos,
            weight_net: &merge.weight_net,
            offset_clamp: None,
            batch: b,
            tokens: n,
            kept,
            channels: c,
        };
        pointconv_merge(device, &inputs, &mut merged)?;
        layer_norm_in_place(device, &mut merged, &merge.norm, b * kept)?;
        let c_next = merge.linear.out_dim;
        let mut next = device.alloc::<T>(b * kept * c_next)?;
        linear(
            device,
            &merged,
            &merge.linear,
            false,
            &mut next,
            Output::Overwrite,
            b * kept,
        )?;
        let mut next_pos = device.alloc::<f32>(b * kept * 2)?;
        gather_rows(
            device,
            &pos,
            &selection.order,
            &mut next_pos,
            (b, n, kept, 2),
        )?;
        Ok(DeviceTokens {
            batch: b,
            tokens: kept,
            channels: c_next,
            pos: next_pos,
            feat: next,
        })
    }

    /// `x += g1·proj(attn(LN1(x)))`, `x += g2·fc2(GELU(fc1(LN2(x))))`.
    fn run_block(
        &self,
        block: &DeviceBlock<T>,
        x: &mut Buffer<T>,
        pos: &Buffer<f32>,
        nbhd: &DeviceNeighbourhood,
        (b, n, c): (usize, usize, usize),
    ) -> Result<()> {
        let device = &self.device;
        let rows = b * n;
        let mut normed = device.alloc::<T>(rows * c)?;
        layer_norm(device, x, &block.norm1, &mut normed, rows)?;
        let mut q = device.alloc::<T>(rows * c)?;
        linear(
            device,
            &normed,
            &block.q,
            false,
            &mut q,
            Output::Overwrite,
            rows,
        )?;
        let mut kv = device.alloc::<T>(rows * 2 * c)?;
        linear(
            device,
            &normed,
            &block.kv,
            false,
            &mut kv,
            Output::Overwrite,
            rows,
        )?;
        let head_dim = c / block.heads;
        let inputs = DeviceAttentionInputs {
            q: &q,
            q_scale: (head_dim as f64).powf(-0.5) as f32,
            kv: &kv,
            nbhd,
            pos,
            pos_weight: &block.pos_weight,
            pos_bias: &block.pos_bias,
            blank_k: &block.blank_k,
            blank_v: &block.blank_v,
            offset_clamp: None,
            batch: b,
            tokens: n,
            heads: block.heads,
            head_dim,
        };
        // The attention output reuses `q`'s shape; write it into `normed`.
        cluster_attention(device, &inputs, &mut normed)?;
        let gamma1 = Output::Accumulate {
            gamma: block.gamma1.as_ref(),
        };
        linear(device, &normed, &block.proj, false, x, gamma1, rows)?;
        layer_norm(device, x, &block.norm2, &mut normed, rows)?;
        let mut hidden = device.alloc::<T>(rows * block.fc1.out_dim)?;
        linear(
            device,
            &normed,
            &block.fc1,
            true,
            &mut hidden,
            Output::Overwrite,
            rows,
        )?;
        let gamma2 = Output::Accumulate {
            gamma: block.gamma2.as_ref(),
        };
        linear(device, &hidden, &block.fc2, false, x, gamma2, rows)
    }
}

fn upload_block<T: Element>(device: &Device, b: &BlockWeights) -> Result<DeviceBlock<T>> {
    let pos_bias = b.attn.pos_embed.bias.as_ref().ok_or_else(|| {
        Error::Unsupported("pos_embed without a bias is not a published model".into())
    })?;
    Ok(DeviceBlock {
        norm1: DeviceLayerNorm::upload(device, &b.norm1)?,
        q: DeviceLinear::upload(device, &b.attn.q)?,
        kv: DeviceLinear::upload(device, &b.attn.kv)?,
        proj: DeviceLinear::upload(device, &b.attn.proj)?,
        pos_weight: device.upload(&b.attn.pos_embed.weight)?,
        pos_bias: device.upload(pos_bias)?,
        blank_k: device.upload(&b.attn.blank_k)?,
        blank_v: device.upload(&b.attn.blank_v)?,
        heads: b.attn.pos_embed.out_dim,
        norm2: DeviceLayerNorm::upload(device, &b.norm2)?,
        fc1: DeviceLinear::upload(device, &b.fc1)?,
        fc2: DeviceLinear::upload(device, &b.fc2)?,
        gamma1: b.gamma1.as_ref().map(|g| device.upload(g)).transpose()?,
        gamma2: b.gamma2.as_ref().map(|g| device.upload(g)).transpose()?,
    })
}

fn upload_merge<T: Element>(device: &Device, m: &MergeWeights) -> Result<DeviceMerge<T>> {
    Ok(DeviceMerge {
        prob_weight: device.upload(&m.prob_net.weight)?,
        prob_bias: m.prob_net.bias.as_ref().map_or(0.0, |b| b[0]),
        weight_net: DeviceWeightNet::upload(device, &m.weight_net, &m.weight_norm)?,
        norm: DeviceLayerNorm::upload(device, &m.norm)?,
        linear: DeviceLinear::upload(device, &m.linear)?,
    })
}
