//! The whole model on a [`Device`]: weights uploaded once, then every op
//! runs as kernels (patch embedding, layout, blocks, selection, merge, head)
//! with the activations staying on the device. Only the images go up and
//! the logits (or backbone features) come back, with one flag that checks
//! the token selections; the classifier's forward replays one CUDA graph
//! per input shape on a GPU (`device/graph.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::trace::{Trace, f32_tensor, i32_tensor, record};
use super::weights::{BlockWeights, Head, MergeWeights};
use super::{AutoFocusFormer, BackboneFeatures, Tokens, image_batch_shape, pad_to_multiple};
use crate::error::{Error, Result};
use crate::gpu::tensor_ops::{gather_rows, mean_tokens};
use crate::gpu::{Buffer, Device, Element};
use crate::ops::cluster_attention::gpu::{DeviceAttentionInputs, cluster_attention};
use crate::ops::clustering::gpu::{DeviceClustering, space_filling_cluster};
use crate::ops::clustering::{grid_positions, round_half_even};
use crate::ops::linear::gpu::{DeviceLinear, Output, linear};
use crate::ops::neighbourhood::gpu::{DeviceNeighbourhood, nearest_neighbourhoods};
use crate::ops::norm::gpu::{DeviceLayerNorm, layer_norm, layer_norm_in_place};
use crate::ops::patch_embed::gpu::DevicePatchEmbed;
use crate::ops::pointconv_merge::INNER_CHANNELS;
use crate::ops::pointconv_merge::gpu::{DeviceMergeInputs, DeviceWeightNet, pointconv_merge};
use crate::ops::token_selection::gpu::{importance, select_tokens_on_grid};
use crate::ops::token_selection::grid_reserve_count;
use crate::profile;
use crate::tensor::Tensor;

mod graph;
mod pipeline;

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

enum DeviceHead<T: Element> {
    Classifier {
        norm: DeviceLayerNorm,
        head: Box<DeviceLinear<T>>,
    },
    Backbone {
        norms: Vec<DeviceLayerNorm>,
    },
}

/// The stage-0 layout of one grid: every image's stage-0 tokens are the
/// full grid, so all images share it (spec §3's cache, keyed by the grid).
struct GridLayout {
    /// n: the token of each rank, shared by every image.
    reorder: Buffer<i32>,
    /// Neighbourhoods of one image, shared by every image.
    nbhd: DeviceNeighbourhood,
}

/// A stage's neighbourhoods: its own, or the cached stage-0 ones.
enum StageNeighbourhood {
    Own(DeviceNeighbourhood),
    Grid(Arc<GridLayout>),
}

impl StageNeighbourhood {
    fn get(&self) -> &DeviceNeighbourhood {
        match self {
            Self::Own(nbhd) => nbhd,
            Self::Grid(layout) => &layout.nbhd,
        }
    }
}

/// An [`AutoFocusFormer`] with its weights on a device, stored as `T` (f32,
/// f16 or bf16). LayerNorm, importance and position parameters stay f32,
/// positions and importance scores are f32, and every kernel accumulates in
/// f32.
pub struct DeviceModel<'m, T: Element> {
    model: &'m AutoFocusFormer,
    device: Device,
    embed: DevicePatchEmbed<T>,
    stages: Vec<DeviceStage<T>>,
    head: DeviceHead<T>,
    offset_clamp: Option<f32>,
    grid_layouts: Mutex<HashMap<(usize, usize), Arc<GridLayout>>>,
    /// The classifier's forward per input shape as a CUDA graph.
    graphs: graph::Graphs<T>,
}

/// Tokens on the device between stages.
struct DeviceTokens<T: Element> {
    batch: usize,
    tokens: usize,
    channels: usize,
    pos: Buffer<f32>,
    feat: Buffer<T>,
}

impl<T: Element> DeviceTokens<T> {
    fn download(&self, device: &Device) -> Result<Tokens> {
        Ok(Tokens {
            batch: self.batch,
            tokens: self.tokens,
            channels: self.channels,
            pos: device.download(&self.pos)?,
            feat: device
                .download(&self.feat)?
                .into_iter()
                .map(T::to_f32)
                .collect(),
        })
    }
}

impl<'m, T: Element> DeviceModel<'m, T> {
    /// Uploads `model`'s weights to `device`.
    ///
    /// # Errors
    /// Device errors; [`Error::Unsupported`] for weights no published model has.
    pub fn new(model: &'m AutoFocusFormer, device: Device) -> Result<Self> {
        let weights = model.weights();
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
        let head = match &weights.head {
            Head::Classifier { norm, head } => DeviceHead::Classifier {
                norm: DeviceLayerNorm::upload(&device, norm)?,
                head: Box::new(DeviceLinear::upload(&device, head)?),
            },
            Head::Backbone { norms } => DeviceHead::Backbone {
                norms: norms
                    .iter()
                    .map(|n| DeviceLayerNorm::upload(&device, n))
                    .collect::<Result<_>>()?,
            },
        };
        Ok(Self {
            model,
            embed: DevicePatchEmbed::upload(&device, &weights.patch_embed)?,
            stages,
            head,
            offset_clamp: model.offset_clamp().map(|c| c as f32),
            grid_layouts: Mutex::default(),
            graphs: graph::Graphs::new(device.is_cuda()),
            device,
        })
    }

    /// Whether the classifier's forward is captured as a CUDA graph per
    /// input shape (on a GPU, by default: the first forward at a shape runs
    /// as launches, the second records them, every later one replays
    /// them). Off, every forward launches its kernels one by one (`bench
    /// --no-graph`, to compare).
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs.set_enabled(on && self.device.is_cuda());
    }

    /// How many forwards replayed a graph so far.
    pub fn graph_replays(&self) -> u64 {
        self.graphs.replays()
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Class logits (b × classes) for normalised images (b×3×H×W), as
    /// [`AutoFocusFormer::forward`].
    ///
    /// # Errors
    /// [`Error::Unsupported`] for a backbone; [`Error::Shape`] for a
    /// malformed input; device errors.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        self.forward_traced(images, None)
    }

    /// As [`forward`](Self::forward), recording into `trace` (when given)
    /// what decides the layout, under the CPU trace's names: per stage
    /// `global_attn`, `cluster.pos`, `cluster.reorder`, `nbhd.idx`,
    /// `nbhd.mask`, `importance`, `merge.reserve_num`, `merge.pos` and
    /// `out.pos`, then `logits`. Each is a download: for tests and checks.
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn forward_traced(&self, images: &Tensor, mut trace: Option<&mut Trace>) -> Result<Tensor> {
        let DeviceHead::Classifier { head, .. } = &self.head else {
            return Err(Error::Unsupported(
                "this is a segmentation backbone: it has no classification head".into(),
            ));
        };
        let (b, height, width) = image_batch_shape(images)?;
        // A trace reads back along the way, and a profile synchronises per
        // op: neither can be a graph.
        if trace.is_none() && !profile::is_enabled() {
            if let Some(logits) = graph::forward(self, images, (b, height, width))? {
                return Ok(logits);
            }
        }
        let device = &self.device;
        let (x, grid) = self.embed(images)?;
        let mut check = SelectionCheck::new(device)?;
        let mut logits = device.alloc::<T>(b * head.out_dim)?;
        self.classify(x, grid, &mut trace, &mut check, &mut logits)?;
        let logits = self.read_logits(&logits, &check, b)?;
        record(&mut trace, || "logits".into(), || logits.clone());
        Ok(logits)
    }

    /// Stages and head of the classifier on the embedded tokens `x`,
    /// writing `logits` (b × classes); selections report to `check`.
    fn classify(
        &self,
        x: DeviceTokens<T>,
        grid: (usize, usize),
        trace: &mut Option<&mut Trace>,
        check: &mut SelectionCheck,
        logits: &mut Buffer<T>,
    ) -> Result<()> {
        let DeviceHead::Classifier { norm, head } = &self.head else {
            return Err(Error::Unsupported("no classification head".into()));
        };
        let mut x = self.run_stages(x, grid, trace, check, |_, _| Ok(()))?;
        let device = &self.device;
        let b = x.batch;
        self.op("head", || {
            let (n, c) = (x.tokens, x.channels);
            layer_norm_in_place(device, &mut x.feat, norm, b * n)?;
            let mut pooled = device.alloc::<T>(b * c)?;
            mean_tokens(device, &x.feat, &mut pooled, (b, n, c))?;
            linear(device, &pooled, head, false, logits, Output::Overwrite, b)
        })
    }

    /// The logits of a batch of `b` read back, once the selection check
    /// has passed.
    fn read_logits(&self, logits: &Buffer<T>, check: &SelectionCheck, b: usize) -> Result<Tensor> {
        let device = &self.device;
        let values = device.download(logits)?;
        check.verify(device)?;
        let classes = values.len() / b.max(1);
        Tensor::new(
            vec![b, classes],
            values.into_iter().map(T::to_f32).collect(),
        )
    }

    /// The multi-scale features of a segmentation backbone, as
    /// [`AutoFocusFormer::features`].
    ///
    /// # Errors
    /// [`Error::Unsupported`] for a classifier; [`Error::Shape`] for a
    /// malformed input; device errors.
    pub fn features(&self, images: &Tensor) -> Result<BackboneFeatures> {
        let DeviceHead::Backbone { norms } = &self.head else {
            return Err(Error::Unsupported(
                "features need a segmentation backbone (a checkpoint with norm0..norm3); this is a classifier".into(),
            ));
        };
        let padded = pad_to_multiple(images, 4)?;
        let (x, grid) = self.embed(&padded)?;
        let device = &self.device;
        let mut stages = Vec::with_capacity(self.stages.len());
        let mut output = |s: usize, mut tokens: DeviceTokens<T>| -> Result<()> {
            let norm = norms
                .get(s)
                .ok_or_else(|| Error::Unsupported(format!("the backbone has no norm{s}")))?;
            let rows = tokens.batch * tokens.tokens;
            layer_norm_in_place(device, &mut tokens.feat, norm, rows)?;
            stages.push(tokens.download(device)?);
            Ok(())
        };
        let mut check = SelectionCheck::new(device)?;
        let last = self.run_stages(x, grid, &mut None, &mut check, &mut output)?;
        output(self.stages.len() - 1, last)?;
        check.verify(device)?;
        Ok(BackboneFeatures { grid, stages })
    }

    /// Runs `f` as op `name` of the profile. When profiling, waits for the
    /// device at the end, so the time is the op's, not its launch's.
    fn op<R>(&self, name: &'static str, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let _scope = profile::scope(name);
        let result = f()?;
        if profile::is_enabled() {
            self.device.synchronize()?;
        }
        Ok(result)
    }

    /// Patch embedding of b×3×H×W images: stage-0 tokens and their grid.
    fn embed(&self, images: &Tensor) -> Result<(DeviceTokens<T>, (usize, usize))> {
        let (b, height, width) = image_batch_shape(images)?;
        self.op("patch_embed", || {
            let pixels = self.device.upload(&Self::pixels(images))?;
            self.embed_pixels(&pixels, (b, height, width))
        })
    }

    /// The images' values in the storage type, as uploaded.
    fn pixels(images: &Tensor) -> Vec<T> {
        use rayon::prelude::*;
        images.data().par_iter().map(|&v| T::from_f32(v)).collect()
    }

    /// Patch embedding of `pixels` already on the device (b×3×H×W).
    fn embed_pixels(
        &self,
        pixels: &Buffer<T>,
        (b, height, width): (usize, usize, usize),
    ) -> Result<(DeviceTokens<T>, (usize, usize))> {
        let device = &self.device;
        let (feat, grid) = self.embed.forward(device, pixels, b, (height, width))?;
        let tokens = DeviceTokens {
            batch: b,
            tokens: grid.0 * grid.1,
            channels: self.model.config().embed_dim[0],
            // The batch's grid positions: a table per (grid, batch),
            // copied on the device for this forward to own.
            pos: device.copy(&*device.constant(
                &format!("grid positions {}x{} b{b}", grid.0, grid.1),
                || grid_positions(grid.0, grid.1).repeat(b),
            )?)?,
            feat,
        };
        Ok((tokens, grid))
    }

    /// Stage `s` on the stage-0 `grid`: layout, then blocks. Returns the
    /// tokens after the blocks (before merging) and the stage's neighbourhoods.
    fn run_stage(
        &self,
        s: usize,
        x: DeviceTokens<T>,
        grid: (usize, usize),
        trace: &mut Option<&mut Trace>,
    ) -> Result<(DeviceTokens<T>, StageNeighbourhood)> {
        let device = &self.device;
        let config = self.model.config();
        let (b, n, c) = (x.batch, x.tokens, x.channels);
        let nbhd_size = config.nbhd_size[s];

        // Layout (spec §3–4): global, the cached grid layout (stage 0), or
        // clusters and their neighbourhoods.
        let global = nbhd_size >= n;
        record(
            trace,
            || format!("stage{s}.global_attn"),
            || i32_tensor(&[1], [global as i32]),
        );
        let (pos, mut feat, nbhd) = if global {
            let nbhd = StageNeighbourhood::Own(DeviceNeighbourhood::global(n));
            (x.pos, x.feat, nbhd)
        } else if s == 0 {
            self.op("layout", || {
                let layout = self.grid_layout(grid)?;
                let mut pos = device.alloc::<f32>(b * n * 2)?;
                gather_rows(device, &x.pos, &layout.reorder, &mut pos, (b, n, n, 2))?;
                let mut feat = device.alloc::<T>(b * n * c)?;
                gather_rows(device, &x.feat, &layout.reorder, &mut feat, (b, n, n, c))?;
                self.trace_layout(trace, s, (b, n), &pos, &layout.reorder, &layout.nbhd)?;
                Ok((pos, feat, StageNeighbourhood::Grid(layout)))
            })?
        } else {
            self.op("layout", || {
                let (clustering, nbhd) = self.cluster(s, &x.pos, b, n, grid)?;
                let mut feat = device.alloc::<T>(b * n * c)?;
                let shape = (b, n, n, c);
                gather_rows(device, &x.feat, &clustering.reorder, &mut feat, shape)?;
                self.trace_layout(
                    trace,
                    s,
                    (b, n),
                    &clustering.pos,
                    &clustering.reorder,
                    &nbhd,
                )?;
                Ok((clustering.pos, feat, StageNeighbourhood::Own(nbhd)))
            })?
        };
        for (j, block) in self.stages[s].blocks.iter().enumerate() {
            let _block = crate::nvtx::range_with(|| format!("block{j}"));
            self.run_block(block, &mut feat, &pos, nbhd.get(), (b, n, c))?;
        }
        let tokens = DeviceTokens {
            batch: b,
            tokens: n,
            channels: c,
            pos,
            feat,
        };
        Ok((tokens, nbhd))
    }

    /// Records a clustered stage's layout (a download each; only with a
    /// trace). Lists shared by the batch (stage 0) are repeated per image,
    /// as on the CPU.
    fn trace_layout(
        &self,
        trace: &mut Option<&mut Trace>,
        s: usize,
        (b, n): (usize, usize),
        pos: &Buffer<f32>,
        reorder: &Buffer<i32>,
        nbhd: &DeviceNeighbourhood,
    ) -> Result<()> {
        if trace.is_none() {
            return Ok(());
        }
        let device = &self.device;
        let pos = device.download(pos)?;
        record(
            trace,
            || format!("stage{s}.cluster.pos"),
            || f32_tensor(&[b, n, 2], &pos),
        );
        // One image's lists (shared by the batch) become b copies.
        let repeat = |v: Vec<i32>, per_image: usize| {
            let copies = if v.len() == per_image { b } else { 1 };
            v.repeat(copies)
        };
        let reorder = repeat(device.download(reorder)?, n);
        record(
            trace,
            || format!("stage{s}.cluster.reorder"),
            || i32_tensor(&[b, n], reorder),
        );
        let m = nbhd.size;
        if let Some(idx) = &nbhd.idx {
            let idx = repeat(device.download(idx)?, n * m);
            record(
                trace,
                || format!("stage{s}.nbhd.idx"),
                || i32_tensor(&[b, n, m], idx),
            );
        }
        if let Some(mask) = &nbhd.mask {
            let mask: Vec<i32> = device.download(mask)?.into_iter().map(i32::from).collect();
            let mask = repeat(mask, n * m);
            record(
                trace,
                || format!("stage{s}.nbhd.mask"),
                || i32_tensor(&[b, n, m], mask),
            );
        }
        Ok(())
    }

    /// Clusters stage `s`'s tokens (b×n at `pos`) and finds their neighbourhoods.
    fn cluster(
        &self,
        s: usize,
        pos: &Buffer<f32>,
        b: usize,
        n: usize,
        grid: (usize, usize),
    ) -> Result<(DeviceClustering, DeviceNeighbourhood)> {
        let config = self.model.config();
        let s_c = config.cluster_size;
        let scope = self.model.key_scope();
        let clustering = space_filling_cluster(&self.device, pos, b, n, s_c, grid, scope)?;
        let k = clustering.clusters;
        let nnc = (round_half_even(config.nbhd_size[s] as f64 / s_c as f64) as usize).clamp(1, k);
        let nbhd = nearest_neighbourhoods(
            &self.device,
            &clustering.pos,
            &clustering.means,
            (b, n, k),
            nnc,
            clustering.cluster_size,
        )?;
        Ok((clustering, nbhd))
    }

    /// The stage-0 layout of `grid`, computed for one image on first use.
    fn grid_layout(&self, grid: (usize, usize)) -> Result<Arc<GridLayout>> {
        let mut layouts = self.grid_layouts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(layout) = layouts.get(&grid) {
            return Ok(layout.clone());
        }
        let pos = self.device.upload(&grid_positions(grid.0, grid.1))?;
        let (clustering, nbhd) = self.cluster(0, &pos, 1, grid.0 * grid.1, grid)?;
        let layout = Arc::new(GridLayout {
            reorder: clustering.reorder,
            nbhd,
        });
        // A few grid sizes at most in practice; bound it like the CPU cache.
        if layouts.len() >= 16 {
            layouts.clear();
        }
        layouts.insert(grid, layout.clone());
        Ok(layout)
    }

    /// Importance, selection and PointConv merge ending stage `s` (spec §7),
    /// on the tokens after its blocks; returns the next stage's tokens.
    fn merge(
        &self,
        s: usize,
        merge: &DeviceMerge<T>,
        x: &DeviceTokens<T>,
        nbhd: &DeviceNeighbourhood,
        (grid, check): ((usize, usize), &mut SelectionCheck),
        trace: &mut Option<&mut Trace>,
    ) -> Result<DeviceTokens<T>> {
        let device = &self.device;
        let config = self.model.config();
        let (b, n, c) = (x.batch, x.tokens, x.channels);
        let (p, selection) = self.op("merge.selection", || {
            let mut p = device.alloc::<f32>(b * n)?;
            let (weight, bias) = (&merge.prob_weight, merge.prob_bias);
            importance(device, &x.feat, weight, bias, &mut p, (b * n, c))?;
            let stride = 2usize << s;
            let (alpha, ds_rate) = (config.alpha as f32, config.ds_rate);
            // The grid fixes the reserve count: no read-back mid-forward.
            let reserve = grid_reserve_count(grid, stride);
            let selection = select_tokens_on_grid(
                device,
                &x.pos,
                &p,
                b,
                n,
                stride,
                reserve,
                alpha,
                ds_rate,
                &mut check.mismatch,
            )?;
            Ok((p, selection))
        })?;
        let kept = selection.kept;
        if trace.is_some() {
            let p = device.download(&p)?;
            record(
                trace,
                || format!("stage{s}.importance"),
                || f32_tensor(&[b, n, 1], &p),
            );
            let reserve = selection.reserve as i32;
            record(
                trace,
                || format!("stage{s}.merge.reserve_num"),
                || i32_tensor(&[1], [reserve]),
            );
        }
        let merged = self.op("merge.pointconv", || {
            let mut merged = device.alloc::<T>(b * kept * INNER_CHANNELS * c)?;
            let inputs = DeviceMergeInputs {
                feat: &x.feat,
                importance: &p,
                nbhd,
                centres: &selection.order,
                pos: &x.pos,
                weight_net: &merge.weight_net,
                offset_clamp: self.offset_clamp,
                batch: b,
                tokens: n,
                kept,
                channels: c,
            };
            pointconv_merge(device, &inputs, &mut merged)?;
            layer_norm_in_place(device, &mut merged, &merge.norm, b * kept)?;
            Ok(merged)
        })?;
        let c_next = merge.linear.out_dim;
        let feat = self.op("merge.linear", || {
            let mut next = device.alloc::<T>(b * kept * c_next)?;
            let rows = b * kept;
            linear(
                device,
                &merged,
                &merge.linear,
                false,
                &mut next,
                Output::Overwrite,
                rows,
            )?;
            Ok(next)
        })?;
        let mut pos = device.alloc::<f32>(b * kept * 2)?;
        gather_rows(device, &x.pos, &selection.order, &mut pos, (b, n, kept, 2))?;
        if trace.is_some() {
            let merged_pos = device.download(&pos)?;
            for key in ["merge.pos", "out.pos"] {
                record(
                    trace,
                    || format!("stage{s}.{key}"),
                    || f32_tensor(&[b, kept, 2], &merged_pos),
                );
            }
        }
        Ok(DeviceTokens {
            batch: b,
            tokens: kept,
            channels: c_next,
            pos,
            feat,
        })
    }

    /// Every stage: returns the last stage's tokens and the selection
    /// check to verify once they are read, and hands each stage's tokens
    /// before merging to `before_merge`.
    fn run_stages(
        &self,
        mut x: DeviceTokens<T>,
        grid: (usize, usize),
        trace: &mut Option<&mut Trace>,
        check: &mut SelectionCheck,
        mut before_merge: impl FnMut(usize, DeviceTokens<T>) -> Result<()>,
    ) -> Result<DeviceTokens<T>> {
        let last = self.stages.len() - 1;
        for s in 0..last {
            let _stage = crate::nvtx::range_with(|| format!("stage{s}"));
            let (tokens, nbhd) = self.run_stage(s, x, grid, trace)?;
            let merge = self.stages[s]
                .merge
                .as_ref()
                .ok_or_else(|| Error::Unsupported(format!("stage {s} has no merge")))?;
            x = self.merge(s, merge, &tokens, nbhd.get(), (grid, &mut *check), trace)?;
            before_merge(s, tokens)?;
        }
        let out = {
            let _stage = crate::nvtx::range_with(|| format!("stage{last}"));
            self.run_stage(last, x, grid, trace)?.0
        };
        if trace.is_some() {
            let pos = self.device.download(&out.pos)?;
            let (b, n) = (out.batch, out.tokens);
            record(
                trace,
                || format!("stage{last}.out.pos"),
                || f32_tensor(&[b, n, 2], &pos),
            );
        }
        Ok(out)
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
        let (q, kv) = self.op("attn.qkv", || {
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
            Ok((q, kv))
        })?;
        self.op("attn.cluster_attention", || {
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
                offset_clamp: self.offset_clamp,
                batch: b,
                tokens: n,
                heads: block.heads,
                head_dim,
            };
            // The attention output has `q`'s shape: it goes into `normed`.
            cluster_attention(device, &inputs, &mut normed)
        })?;
        self.op("attn.proj", || {
            let gamma = block.gamma1.as_ref();
            linear(
                device,
                &normed,
                &block.proj,
                false,
                x,
                Output::Accumulate { gamma },
                rows,
            )
        })?;
        self.op("mlp", || {
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
            let gamma = block.gamma2.as_ref();
            linear(
                device,
                &hidden,
                &block.fc2,
                false,
                x,
                Output::Accumulate { gamma },
                rows,
            )
        })
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

/// The device selections' flag: set when a merge found another reserve
/// count than the grid implies (then its selection, and all after it, are
/// wrong). Read once, after the forward's results.
struct SelectionCheck {
    mismatch: Buffer<i32>,
}

impl SelectionCheck {
    fn new(device: &Device) -> Result<Self> {
        Ok(Self {
            mismatch: device.zeros::<i32>(1)?,
        })
    }

    /// Clears the flag (inside a graph, before each replay's selections).
    fn reset(&mut self, device: &Device) -> Result<()> {
        device.fill_zeros(&mut self.mismatch)
    }

    /// # Errors
    /// [`Error::Internal`] when a selection flagged a mismatch.
    fn verify(&self, device: &Device) -> Result<()> {
        if device.download(&self.mismatch)?.first() == Some(&0) {
            return Ok(());
        }
        Err(Self::mismatch_error())
    }

    /// What a raised flag means.
    fn mismatch_error() -> Error {
        Error::Internal(
            "token selection: a stage's reserve-grid tokens were not the ones its grid implies"
                .into(),
        )
    }
}
