//! Every kernel against its CPU reference, on the emulator (always) and on
//! GPU 0 when one is present (`AUTOFOCUS_REQUIRE_GPU=1` makes its absence a
//! failure, for the device check). Fresh random inputs, odd sizes, batch > 1;
//! outputs start poisoned on the emulator, so an unwritten element fails.

mod common;

use autofocus::gpu::{Device, Element, Gemm};
use autofocus::io::F32Buffer;
use autofocus::ops::LayerNorm;
use autofocus::ops::cluster_attention::gpu::{
    AttentionPlan, DeviceAttentionInputs, attention_plan, cluster_attention,
};
use autofocus::ops::cluster_attention::{AttentionInputs, cluster_attention as cpu_attention};
use autofocus::ops::clustering::{KeyScope, space_filling_cluster};
use autofocus::ops::dense::{DenseOptions, to_dense};
use autofocus::ops::linear::gpu::{DeviceLinear, Output, linear, linear_epilogue};
use autofocus::ops::linear::{Epilogue, Linear};
use autofocus::ops::neighbourhood::gpu::{DeviceNeighbourhood, nearest_neighbourhoods};
use autofocus::ops::neighbourhood::{Neighbourhood, nearest_clusters};
use autofocus::ops::norm::gpu::{DeviceLayerNorm, layer_norm, layer_norm_in_place};
use autofocus::ops::pointconv_merge::gpu::{DeviceMergeInputs, DeviceWeightNet, pointconv_merge};
use autofocus::ops::pointconv_merge::{MergeInputs, weight_net_table};
use autofocus::ops::rel_pos::{OffsetTable, neighbour_rows};
use autofocus::ops::token_selection::gpu::select_tokens_on_grid;
use autofocus::ops::token_selection::{grid_reserve_count, importance, select_tokens};
use common::{assert_slices_close, download_f32, download_indices, upload_as};

/// The run's base seed: `AUTOFOCUS_TEST_SEED`, or fresh from the clock, so
/// every run draws new inputs; printed, so a failure can be replayed.
fn base_seed() -> u64 {
    let seed = std::env::var("AUTOFOCUS_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("inputs from AUTOFOCUS_TEST_SEED={seed}");
    seed
}

/// A small generator (xorshift64*), one stream per test.
struct Rng(u64);

impl Rng {
    fn new(stream: u64) -> Self {
        let seed = base_seed() ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    fn float(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn floats(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.float()).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// `count` distinct cells of an `h × w` grid, in random order, as x, y pairs.
    fn grid_subset(&mut self, h: usize, w: usize, count: usize) -> Vec<f32> {
        let mut cells: Vec<usize> = (0..h * w).collect();
        for i in (1..cells.len()).rev() {
            cells.swap(i, self.below(i + 1));
        }
        cells[..count]
            .iter()
            .flat_map(|&c| [(c % w) as f32, (c / w) as f32])
            .collect()
    }
}

fn linear_layer(rng: &mut Rng, in_dim: usize, out_dim: usize, bias: bool) -> Linear {
    Linear {
        weight: F32Buffer::owned(rng.floats(in_dim * out_dim)),
        bias: bias.then(|| F32Buffer::owned(rng.floats(out_dim))),
        in_dim,
        out_dim,
    }
}

/// Per storage type: how far a kernel may stray from the f32 reference.
fn tolerance<T: Element>() -> f32 {
    match T::SUFFIX {
        "f32" => 1e-5,
        "f16" => 5e-3,
        _ => 3e-2,
    }
}

fn check_linear<T: Element>(device: &Device) {
    let mut rng = Rng::new(1);
    let before = device.counts();
    for (rows, k, n, bias, gelu) in [
        (70, 37, 45, true, false),
        (3, 64, 130, false, true),
        (1, 5, 1, true, true),
    ] {
        let layer = linear_layer(&mut rng, k, n, bias);
        let x = rng.floats(rows * k);
        let epilogue = if gelu { Epilogue::Gelu } else { Epilogue::None };
        let want = layer.forward_with(&x, rows, epilogue).unwrap();
        let dev_layer = DeviceLinear::<T>::upload(device, &layer).unwrap();
        let dx = upload_as::<T>(device, &x);
        let mut out = device.alloc::<T>(rows * n).unwrap();
        linear(
            device,
            &dx,
            &dev_layer,
            gelu,
            &mut out,
            Output::Overwrite,
            rows,
        )
        .unwrap();
        let what = format!("linear {rows}×{k}→{n} on {device:?} {}", T::SUFFIX);
        assert_slices_close(&what, &download_f32(device, &out), &want, tolerance::<T>());

        // Residual with layer scale: out = r + gamma ∘ y.
        let residual = rng.floats(rows * n);
        let gamma = rng.floats(n);
        let mut acc = upload_as::<T>(device, &residual);
        let dgamma = device.upload(&gamma).unwrap();
        let output = Output::Accumulate {
            gamma: Some(&dgamma),
        };
        linear(device, &dx, &dev_layer, gelu, &mut acc, output, rows).unwrap();
        let want: Vec<f32> = (0..rows * n)
            .map(|e| residual[e] + gamma[e % n] * want[e])
            .collect();
        assert_slices_close(
            &format!("{what} + residual"),
            &download_f32(device, &acc),
            &want,
            tolerance::<T>(),
        );
    }
    // Where the device's dense layers use cuBLASLt (a GPU, unless
    // AUTOFOCUS_GEMM=simt), the products above ran in it, not on the SIMT
    // kernel in its place: both of the 70×37→45 shape's at least, which
    // surely has an algorithm (the others may not).
    let library_gemms = (device.counts() - before).library_gemms;
    match device.gemm().unwrap() {
        Gemm::CublasLt(_) => assert!(library_gemms >= 2, "{} on {device:?}", T::SUFFIX),
        Gemm::Simt => assert_eq!(library_gemms, 0, "{} on {device:?}", T::SUFFIX),
    }
}

#[test]
fn linear_matches_the_cpu_in_every_storage_type() {
    for device in common::devices() {
        check_linear::<f32>(&device);
        check_linear::<half::f16>(&device);
        check_linear::<half::bf16>(&device);
    }
}

/// The cuBLASLt path's epilogue, over a product computed elsewhere, gives
/// what the SIMT kernel gives, bit for bit: on small integers every
/// product is exact in any order, so only the epilogue can differ.
fn check_linear_epilogue<T: Element>(device: &Device) {
    let mut rng = Rng::new(7);
    let mut ints = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.below(7) as f32 - 3.0).collect() };
    let (rows, k, n) = (37, 19, 70);
    let x = ints(rows * k);
    let layer = Linear {
        weight: F32Buffer::owned(ints(n * k)),
        bias: Some(F32Buffer::owned(ints(n))),
        in_dim: k,
        out_dim: n,
    };
    let product: Vec<f32> = (0..rows * n)
        .map(|e| {
            let (r, c) = (e / n, e % n);
            (0..k).map(|i| x[r * k + i] * layer.weight[c * k + i]).sum()
        })
        .collect();
    let residual: Vec<f32> = ints(rows * n).iter().map(|v| v / 4.0).collect();
    let gamma: Vec<f32> = ints(n).iter().map(|v| v / 8.0).collect();
    let dgamma = device.upload(&gamma).unwrap();
    let dx = upload_as::<T>(device, &x);
    let dproduct = device.upload(&product).unwrap();
    for bias in [true, false] {
        let layer = Linear {
            bias: layer.bias.clone().filter(|_| bias),
            ..layer.clone()
        };
        let dev_layer = DeviceLinear::<T>::upload(device, &layer).unwrap();
        for gelu in [false, true] {
            for output in [
                Output::Overwrite,
                Output::Accumulate { gamma: None },
                Output::Accumulate {
                    gamma: Some(&dgamma),
                },
            ] {
                let mut simt = upload_as::<T>(device, &residual);
                linear(device, &dx, &dev_layer, gelu, &mut simt, output, rows).unwrap();
                let mut finished = upload_as::<T>(device, &residual);
                linear_epilogue(
                    device,
                    &dproduct,
                    &dev_layer,
                    gelu,
                    &mut finished,
                    output,
                    rows,
                )
                .unwrap();
                common::assert_exact(
                    &format!(
                        "epilogue on {device:?} {} (bias {bias}, gelu {gelu}, {output:?})",
                        T::SUFFIX
                    ),
                    &download_f32(device, &finished),
                    &download_f32(device, &simt),
                );
            }
        }
    }
    // Shapes are checked like the kernel's.
    let mut out = device.alloc::<T>(rows * n).unwrap();
    let short = device.upload(&product[1..]).unwrap();
    let dev_layer = DeviceLinear::<T>::upload(device, &layer).unwrap();
    let e = linear_epilogue(
        device,
        &short,
        &dev_layer,
        false,
        &mut out,
        Output::Overwrite,
        rows,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("product"), "{e}");
}

#[test]
fn linear_epilogue_finishes_a_product_as_the_simt_kernel_does() {
    for device in common::devices() {
        check_linear_epilogue::<f32>(&device);
        check_linear_epilogue::<half::f16>(&device);
        check_linear_epilogue::<half::bf16>(&device);
    }
}

/// A device counts what it is asked to do, for `bench`'s per-forward report.
#[test]
fn a_device_counts_launches_fills_and_copies() {
    let device = Device::emulator();
    let before = device.counts();
    let mut rng = Rng::new(3);
    let layer = DeviceLinear::<f32>::upload(&device, &linear_layer(&mut rng, 4, 3, true)).unwrap();
    let x = device.upload(&rng.floats(2 * 4)).unwrap();
    let mut out = device.alloc::<f32>(2 * 3).unwrap();
    let _flag = device.zeros::<i32>(1).unwrap();
    linear(&device, &x, &layer, false, &mut out, Output::Overwrite, 2).unwrap();
    device.download(&out).unwrap();
    let clone = device.clone();
    clone.download(&out).unwrap();
    let counts = device.counts() - before;
    // Weight, bias and x; two downloads, one through a clone (shared).
    assert_eq!(
        (counts.uploads, counts.allocations, counts.zero_fills),
        (3, 1, 1)
    );
    assert_eq!((counts.kernel_launches, counts.library_gemms), (1, 0));
    assert_eq!(counts.downloads, 2);
    assert_eq!(counts.per(2).downloads, 1);
}

#[test]
fn layer_norm_matches_the_cpu() {
    let mut rng = Rng::new(2);
    for device in common::devices() {
        for (rows, d) in [(13, 45), (1, 4), (9, 128)] {
            let norm = LayerNorm {
                weight: F32Buffer::owned(rng.floats(d)),
                bias: F32Buffer::owned(rng.floats(d)),
            };
            let x: Vec<f32> = rng.floats(rows * d).iter().map(|v| 3.0 * v + 1.0).collect();
            let want = norm.forward(&x).unwrap();
            let dnorm = DeviceLayerNorm::upload(&device, &norm).unwrap();
            let dx = device.upload(&x).unwrap();
            let mut out = device.alloc::<f32>(rows * d).unwrap();
            layer_norm(&device, &dx, &dnorm, &mut out, rows).unwrap();
            assert_slices_close("layer_norm", &device.download(&out).unwrap(), &want, 1e-5);
            let mut inplace = device.upload(&x).unwrap();
            layer_norm_in_place(&device, &mut inplace, &dnorm, rows).unwrap();
            assert_slices_close(
                "layer_norm in place",
                &device.download(&inplace).unwrap(),
                &want,
                1e-5,
            );
        }
    }
}

/// Clustering, then neighbourhoods, exactly as the CPU: full grids (stage 0)
/// and random subsets (later stages), padded last clusters, batch 3.
#[test]
fn clustering_and_neighbourhoods_match_the_cpu_exactly() {
    let mut rng = Rng::new(3);
    for device in common::devices() {
        for (h, w, n, s, nnc, batch, scope) in [
            (9, 13, 117, 8, 6, 1, KeyScope::Batch),
            (14, 14, 196, 8, 6, 2, KeyScope::Batch),
            (16, 11, 61, 8, 3, 3, KeyScope::Batch),
            (16, 11, 61, 8, 3, 3, KeyScope::Image),
            (7, 5, 20, 4, 5, 2, KeyScope::Image),
            (3, 3, 9, 1, 4, 1, KeyScope::Batch),
            (2, 40, 33, 8, 2, 2, KeyScope::Batch),
        ] {
            let pos: Vec<f32> = (0..batch)
                .flat_map(|_| {
                    if n == h * w {
                        (0..n)
                            .flat_map(|t| [(t % w) as f32, (t / w) as f32])
                            .collect()
                    } else {
                        rng.grid_subset(h, w, n)
                    }
                })
                .collect();
            let want = space_filling_cluster(&pos, batch, n, s, (h, w), scope).unwrap();
            let dpos = device.upload(&pos).unwrap();
            let got = autofocus::ops::clustering::gpu::space_filling_cluster(
                &device,
                &dpos,
                batch,
                n,
                s,
                (h, w),
                scope,
            )
            .unwrap();
            let case = format!("{h}×{w}, n {n}, s {s}, batch {batch}, {scope:?} on {device:?}");
            let reorder: Vec<u32> = download_indices(&device, &got.reorder);
            assert_eq!(reorder, want.reorder, "reorder, {case}");
            assert_eq!(device.download(&got.pos).unwrap(), want.pos, "pos, {case}");
            assert_eq!(
                device.download(&got.means).unwrap(),
                want.means,
                "means, {case}"
            );
            assert_eq!(got.clusters, want.clusters);

            let k = want.clusters;
            let nnc = nnc.min(k);
            let nearest = nearest_clusters(&want.pos, &want.means, batch, n, k, nnc).unwrap();
            let want_nbhd =
                Neighbourhood::from_clusters(&nearest, batch, n, nnc, want.cluster_size);
            let got_nbhd = nearest_neighbourhoods(
                &device,
                &got.pos,
                &got.means,
                (batch, n, k),
                nnc,
                want.cluster_size,
            )
            .unwrap();
            let idx: Vec<u32> = download_indices(&device, got_nbhd.idx.as_ref().unwrap());
            assert_eq!(idx, want_nbhd.idx, "neighbourhoods, {case}");
            let mask = got_nbhd.mask.as_ref().map(|m| {
                device
                    .download(m)
                    .unwrap()
                    .iter()
                    .map(|&v| v == 1)
                    .collect::<Vec<bool>>()
            });
            assert_eq!(mask, want_nbhd.mask, "masks, {case}");
        }
    }
}

/// The nearest clusters of every token, read back from device neighbour
/// lists (member `u` of cluster `c` is token `c·s + u`).
fn device_nearest(device: &Device, nbhd: &DeviceNeighbourhood, s: usize) -> Vec<u32> {
    let idx = device.download(nbhd.idx.as_ref().unwrap()).unwrap();
    idx.chunks(s)
        .map(|members| members[0] as u32 / s as u32)
        .collect()
}

/// Brute force in f32 (spec §4): every cluster sorted by (d², index), d²
/// rounded step by step.
fn brute_force_nearest(
    pos: &[f32],
    means: &[f32],
    (b, n, k): (usize, usize, usize),
    nnc: usize,
) -> Vec<u32> {
    let mut out = Vec::with_capacity(b * n * nnc);
    for img in 0..b {
        for t in 0..n {
            let p = &pos[(img * n + t) * 2..][..2];
            let mut all: Vec<(f32, u32)> = (0..k)
                .map(|c| {
                    let m = &means[(img * k + c) * 2..][..2];
                    let (dx, dy) = (p[0] - m[0], p[1] - m[1]);
                    (dx * dx + dy * dy, c as u32)
                })
                .collect();
            all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            out.extend(all[..nnc].iter().map(|e| e.1));
        }
    }
    out
}

/// The near-tie that f64 ranks the other way (the issue that brought f32
/// ranking): from (6, 6), cluster 2 at (9, 1.8333334) and cluster 12 at
/// (4.8333335, 11) are the same f32 distance away, so 2 comes first.
#[test]
fn nearest_clusters_break_an_f32_tie_to_the_lower_index_on_every_device() {
    let (n, nnc) = (13, 2);
    let mut pos = vec![0.0f32; 2 * n];
    let mut means = vec![100.0f32; 2 * n];
    pos[..2].copy_from_slice(&[6.0, 6.0]);
    means[4..6].copy_from_slice(&[9.0, 1.833_333_4]);
    means[24..26].copy_from_slice(&[4.833_333_5, 11.0]);
    let cpu = nearest_clusters(&pos, &means, 1, n, n, nnc).unwrap();
    assert_eq!(cpu[..2], [2, 12]);
    for device in common::devices() {
        let (dpos, dmeans) = (device.upload(&pos).unwrap(), device.upload(&means).unwrap());
        let got = nearest_neighbourhoods(&device, &dpos, &dmeans, (1, n, n), nnc, 1).unwrap();
        assert_eq!(device_nearest(&device, &got, 1), cpu, "on {device:?}");
    }
}

/// Property: tokens on the grid, cluster means on thirds and sixths of it
/// (many exact and near ties); the CPU and every device rank clusters as a
/// brute-force f32 reference does.
#[test]
fn nearest_clusters_match_an_f32_brute_force_on_colliding_means() {
    let mut rng = Rng::new(11);
    let devices = common::devices();
    for round in 0..40 {
        let (h, w) = (3 + rng.below(20), 3 + rng.below(20));
        let s = 1 + rng.below(7);
        let n = (s + rng.below(h * w - s)).min(h * w);
        let k = n.div_ceil(s);
        let nnc = 1 + rng.below(k.min(8));
        let batch = 1 + rng.below(2);
        let pos: Vec<f32> = (0..batch).flat_map(|_| rng.grid_subset(h, w, n)).collect();
        let means: Vec<f32> = (0..batch * k)
            .flat_map(|_| {
                let x = rng.below(3 * w) as f32 / 3.0;
                let y = rng.below(6 * h) as f32 / 6.0;
                [x, y]
            })
            .collect();
        let want = brute_force_nearest(&pos, &means, (batch, n, k), nnc);
        let case = format!("round {round}: {h}×{w}, n {n}, s {s}, k {k}, nnc {nnc}, batch {batch}");
        let cpu = nearest_clusters(&pos, &means, batch, n, k, nnc).unwrap();
        assert_eq!(cpu, want, "CPU, {case}");
        for device in &devices {
            let (dpos, dmeans) = (device.upload(&pos).unwrap(), device.upload(&means).unwrap());
            let got =
                nearest_neighbourhoods(device, &dpos, &dmeans, (batch, n, k), nnc, s).unwrap();
            assert_eq!(device_nearest(device, &got, s), want, "{device:?}, {case}");
        }
    }
}

/// Random neighbourhoods with padding, as the stage's clusters give them.
fn random_neighbourhood(rng: &mut Rng, images: usize, n: usize, m: usize) -> Neighbourhood {
    let idx: Vec<u32> = (0..images * n * m).map(|_| rng.below(n) as u32).collect();
    let mask: Vec<bool> = (0..images * n * m).map(|_| rng.below(5) != 0).collect();
    let mut nbhd = Neighbourhood {
        images,
        tokens: n,
        size: m,
        idx,
        mask: Some(mask),
    };
    // Padded slots point at token 0, as from_clusters makes them.
    for (i, valid) in nbhd.mask.clone().unwrap().iter().enumerate() {
        if !valid {
            nbhd.idx[i] = 0;
        }
    }
    nbhd
}

/// Random inputs of one attention: positions on an `h × w` grid, queries,
/// keys and values, the position-bias layer and blank tokens.
struct AttentionCase {
    batch: usize,
    grid: (usize, usize),
    n: usize,
    heads: usize,
    d: usize,
    clamp: Option<usize>,
    pos: Vec<f32>,
    q: Vec<f32>,
    kv: Vec<f32>,
    pos_embed: Linear,
    blank_k: Vec<f32>,
    blank_v: Vec<f32>,
}

impl AttentionCase {
    fn random(
        rng: &mut Rng,
        (batch, h, w, n): (usize, usize, usize, usize),
        heads: usize,
        d: usize,
        clamp: Option<usize>,
    ) -> Self {
        let c = heads * d;
        Self {
            batch,
            grid: (h, w),
            n,
            heads,
            d,
            clamp,
            pos: (0..batch).flat_map(|_| rng.grid_subset(h, w, n)).collect(),
            q: rng.floats(batch * n * c),
            kv: rng
                .floats(batch * n * 2 * c)
                .iter()
                .map(|v| 2.0 * v)
                .collect(),
            pos_embed: linear_layer(rng, 5, heads, true),
            blank_k: rng.floats(c),
            blank_v: rng.floats(c),
        }
    }

    fn q_scale(&self) -> f32 {
        (self.d as f32).powf(-0.5)
    }

    /// The CPU reference over `nbhd`.
    fn expected(&self, nbhd: &Neighbourhood) -> Vec<f32> {
        let offsets = OffsetTable::new(self.grid.0, self.grid.1, self.clamp);
        let bias_rows = neighbour_rows(&offsets, &self.pos, nbhd, self.batch).unwrap();
        let bias_table = offsets.apply(&self.pos_embed).unwrap();
        cpu_attention(&AttentionInputs {
            q: &self.q,
            q_scale: self.q_scale(),
            kv: &self.kv,
            nbhd,
            bias_rows: &bias_rows,
            bias_table: &bias_table,
            blank_k: &self.blank_k,
            blank_v: &self.blank_v,
            batch: self.batch,
            tokens: self.n,
            heads: self.heads,
            head_dim: self.d,
        })
        .unwrap()
    }

    /// The kernel's output over `nbhd`, stored as `T`, read back as f32.
    fn on_device<T: Element>(&self, device: &Device, nbhd: &DeviceNeighbourhood) -> Vec<f32> {
        let (dq, dkv) = (
            upload_as::<T>(device, &self.q),
            upload_as::<T>(device, &self.kv),
        );
        let dpos = device.upload(&self.pos).unwrap();
        let pos_weight = device.upload(&self.pos_embed.weight).unwrap();
        let pos_bias = device
            .upload(self.pos_embed.bias.as_ref().unwrap())
            .unwrap();
        let (dbk, dbv) = (
            device.upload(&self.blank_k).unwrap(),
            device.upload(&self.blank_v).unwrap(),
        );
        let mut out = device
            .alloc::<T>(self.batch * self.n * self.heads * self.d)
            .unwrap();
        let inputs = DeviceAttentionInputs {
            q: &dq,
            q_scale: self.q_scale(),
            kv: &dkv,
            nbhd,
            pos: &dpos,
            pos_weight: &pos_weight,
            pos_bias: &pos_bias,
            blank_k: &dbk,
            blank_v: &dbv,
            offset_clamp: self.clamp.map(|c| c as f32),
            batch: self.batch,
            tokens: self.n,
            heads: self.heads,
            head_dim: self.d,
        };
        cluster_attention(device, &inputs, &mut out).unwrap();
        download_f32(device, &out)
    }
}

fn check_attention<T: Element>(device: &Device, rng: &mut Rng) {
    for (batch, h, w, n, heads, d, m, global, clamp, shared) in [
        (2, 9, 7, 50, 2, 5, 12, false, None, false),
        (1, 6, 6, 36, 3, 33, 40, false, Some(2usize), true),
        (3, 4, 5, 20, 1, 32, 20, true, None, true),
    ] {
        let case = AttentionCase::random(rng, (batch, h, w, n), heads, d, clamp);
        let nbhd = if global {
            Neighbourhood::global(n)
        } else {
            random_neighbourhood(rng, if shared { 1 } else { batch }, n, m)
        };
        let dnbhd = if global {
            DeviceNeighbourhood::global(n)
        } else {
            DeviceNeighbourhood::upload(device, &nbhd).unwrap()
        };
        let what = format!(
            "attention b {batch} n {n} h {heads} d {d} m {m} global {global} on {device:?} {}",
            T::SUFFIX
        );
        let tol = if T::SUFFIX == "f32" {
            1e-4
        } else {
            10.0 * tolerance::<T>()
        };
        assert_slices_close(
            &what,
            &case.on_device::<T>(device, &dnbhd),
            &case.expected(&nbhd),
            tol,
        );
    }
}

#[test]
fn cluster_attention_matches_the_cpu() {
    let mut rng = Rng::new(4);
    for device in common::devices() {
        check_attention::<f32>(&device, &mut rng);
        check_attention::<half::bf16>(&device, &mut rng);
    }
}

#[test]
fn token_selection_matches_the_cpu_exactly() {
    let mut rng = Rng::new(5);
    for device in common::devices() {
        for (batch, h, w, stride, n, alpha, ds_rate) in [
            (2, 10, 13, 2, 130, 4.0f32, 0.25),
            (3, 16, 16, 4, 90, 2.5, 0.5),
            (1, 9, 9, 8, 30, 1.0, 0.25),
        ] {
            // Every reserve position (divisible by 2·stride), then others.
            let coarse = 2 * stride;
            let reserve: Vec<usize> = (0..h * w)
                .filter(|c| (c % w) % coarse == 0 && (c / w) % coarse == 0)
                .collect();
            let pos: Vec<f32> = (0..batch)
                .flat_map(|_| {
                    let mut cells = reserve.clone();
                    let mut others: Vec<usize> =
                        (0..h * w).filter(|c| !reserve.contains(c)).collect();
                    for i in (1..others.len()).rev() {
                        others.swap(i, rng.below(i + 1));
                    }
                    cells.extend(&others[..n - reserve.len()]);
                    for i in (1..cells.len()).rev() {
                        cells.swap(i, rng.below(i + 1));
                    }
                    cells
                        .into_iter()
                        .flat_map(|c| [(c % w) as f32, (c / w) as f32])
                        .collect::<Vec<_>>()
                })
                .collect();
            // Coarse importance values: many exact ties.
            let importance: Vec<f32> = (0..batch * n).map(|_| rng.below(4) as f32 / 4.0).collect();
            let want =
                select_tokens(&pos, &importance, batch, n, stride, (h, w), alpha, ds_rate).unwrap();
            let (dpos, dimp) = (
                device.upload(&pos).unwrap(),
                device.upload(&importance).unwrap(),
            );
            let got = autofocus::ops::token_selection::gpu::select_tokens(
                &device, &dpos, &dimp, batch, n, stride, alpha, ds_rate,
            )
            .unwrap();
            assert_eq!(
                (got.kept, got.sampled, got.reserve),
                (want.kept, want.sampled, want.reserve)
            );
            let order: Vec<u32> = download_indices(&device, &got.order);
            assert_eq!(order, want.order, "stride {stride} on {device:?}");

            // The model's path: the count from the grid, nothing read back,
            // the same order; a count that is not the tokens' raises the flag.
            let expected = grid_reserve_count((h, w), stride);
            assert_eq!(expected, want.reserve);
            for (reserve, flagged) in [(expected, 0), (expected + 1, 1), (expected - 1, 1)] {
                let mut mismatch = device.zeros::<i32>(1).unwrap();
                let got = select_tokens_on_grid(
                    &device,
                    &dpos,
                    &dimp,
                    batch,
                    n,
                    stride,
                    reserve,
                    alpha,
                    ds_rate,
                    &mut mismatch,
                )
                .unwrap();
                assert_eq!(
                    device.download(&mismatch).unwrap(),
                    [flagged],
                    "reserve {reserve}"
                );
                if flagged == 0 {
                    let order: Vec<u32> = download_indices(&device, &got.order);
                    assert_eq!(order, want.order, "on grid, stride {stride} on {device:?}");
                }
            }
        }
    }
}

/// The importance kernel gives the CPU's bits (same operation order, the
/// twin sigmoid), in every storage type (the CPU reads the stored values),
/// so a device selects the same tokens however close the scores at the
/// keep/drop boundary. The CPU op is also checked against a plain sum.
fn check_importance<T: Element>(device: &Device, rng: &mut Rng) {
    for (rows, d) in [(37, 70), (5, 31), (64, 1), (3, 512)] {
        let x = rng.floats(rows * d);
        let weight: Vec<f32> = rng.floats(d).iter().map(|v| 4.0 * v).collect();
        let bias = rng.float();
        let dx = upload_as::<T>(device, &x);
        let stored = download_f32(device, &dx);
        let want = importance(&stored, &weight, bias, rows, d).unwrap();
        let plain: Vec<f32> = stored
            .chunks(d)
            .map(|r| {
                let logit: f64 = r
                    .iter()
                    .zip(&weight)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                (1.0 / (1.0 + (-(logit + bias as f64)).exp())) as f32
            })
            .collect();
        assert_slices_close("importance (CPU vs f64)", &want, &plain, 1e-5);
        let dw = device.upload(&weight).unwrap();
        let mut out = device.alloc::<f32>(rows).unwrap();
        autofocus::ops::token_selection::gpu::importance(
            device,
            &dx,
            &dw,
            bias,
            &mut out,
            (rows, d),
        )
        .unwrap();
        let got = device.download(&out).unwrap();
        let (got_bits, want_bits): (Vec<u32>, Vec<u32>) = (
            got.iter().map(|v| v.to_bits()).collect(),
            want.iter().map(|v| v.to_bits()).collect(),
        );
        assert_eq!(
            got_bits,
            want_bits,
            "importance {rows}×{d} in {} on {device:?}",
            T::SUFFIX
        );
    }
}

#[test]
fn importance_gives_the_cpu_bits() {
    let mut rng = Rng::new(6);
    for device in common::devices() {
        check_importance::<f32>(&device, &mut rng);
        check_importance::<half::f16>(&device, &mut rng);
        check_importance::<half::bf16>(&device, &mut rng);
    }
}

fn check_merge<T: Element>(device: &Device, rng: &mut Rng) {
    for (batch, h, w, n, c, m, kept, global) in [
        (2, 8, 9, 40, 35, 16, 11, false),
        (1, 5, 5, 25, 64, 25, 7, true),
    ] {
        let pos: Vec<f32> = (0..batch).flat_map(|_| rng.grid_subset(h, w, n)).collect();
        let feat = rng.floats(batch * n * c);
        let importance: Vec<f32> = rng
            .floats(batch * n)
            .iter()
            .map(|v| 0.5 + 0.5 * v)
            .collect();
        let nbhd = if global {
            Neighbourhood::global(n)
        } else {
            random_neighbourhood(rng, batch, n, m)
        };
        let centres: Vec<u32> = (0..batch * kept).map(|_| rng.below(n) as u32).collect();
        let net = linear_layer(rng, 5, 4, true);
        let norm = LayerNorm {
            weight: F32Buffer::owned(rng.floats(4)),
            bias: F32Buffer::owned(rng.floats(4)),
        };
        let offsets = OffsetTable::new(h, w, None);
        let rows = neighbour_rows(&offsets, &pos, &nbhd, batch).unwrap();
        let table = weight_net_table(&offsets, &net, &norm).unwrap();
        let want = autofocus::ops::pointconv_merge::pointconv_merge(&MergeInputs {
            feat: &feat,
            importance: &importance,
            nbhd: &nbhd,
            centres: &centres,
            weight_rows: &rows,
            weight_table: &table,
            batch,
            tokens: n,
            channels: c,
        })
        .unwrap();
        let dnbhd = if global {
            DeviceNeighbourhood::global(n)
        } else {
            DeviceNeighbourhood::upload(device, &nbhd).unwrap()
        };
        let dfeat = upload_as::<T>(device, &feat);
        let dimp = device.upload(&importance).unwrap();
        let dcentres = device
            .upload(&centres.iter().map(|&i| i as i32).collect::<Vec<_>>())
            .unwrap();
        let dpos = device.upload(&pos).unwrap();
        let dnet = DeviceWeightNet::upload(device, &net, &norm).unwrap();
        let mut out = device.alloc::<T>(batch * kept * 4 * c).unwrap();
        let inputs = DeviceMergeInputs {
            feat: &dfeat,
            importance: &dimp,
            nbhd: &dnbhd,
            centres: &dcentres,
            pos: &dpos,
            weight_net: &dnet,
            offset_clamp: None,
            batch,
            tokens: n,
            kept,
            channels: c,
        };
        pointconv_merge(device, &inputs, &mut out).unwrap();
        let what = format!("merge n {n} c {c} m {m} on {device:?} {}", T::SUFFIX);
        let tol = if T::SUFFIX == "f32" {
            1e-4
        } else {
            10.0 * tolerance::<T>()
        };
        assert_slices_close(&what, &download_f32(device, &out), &want, tol);
    }
}

#[test]
fn pointconv_merge_matches_the_cpu() {
    let mut rng = Rng::new(7);
    for device in common::devices() {
        check_merge::<f32>(&device, &mut rng);
        check_merge::<half::f16>(&device, &mut rng);
    }
}

/// Both searches against the CPU: grids sparse and full, fewer tokens than
/// k, ties (a regular lattice of tokens), batch > 1; and the search the
/// wrapper picks on its own.
#[test]
fn to_dense_matches_the_cpu() {
    use autofocus::ops::dense::gpu::{DenseSearch, to_dense_searching};
    let mut rng = Rng::new(8);
    for device in common::devices() {
        for (batch, h, w, n, c, k, lattice) in [
            (2, 9, 11, 30, 5, 4, false),
            (1, 6, 4, 1, 3, 4, false),
            (1, 5, 7, 35, 2, 3, false),
            (2, 31, 37, 900, 3, 4, false),
            (1, 40, 50, 60, 2, 16, false),
            (1, 20, 24, 30, 2, 4, true),
        ] {
            let pos: Vec<f32> = if lattice {
                // Every 4th cell of every 4th row: many equal distances.
                (0..batch)
                    .flat_map(|_| {
                        (0..n).flat_map(|t| [(t % (w / 4) * 4) as f32, (t / (w / 4) * 4) as f32])
                    })
                    .collect()
            } else {
                (0..batch).flat_map(|_| rng.grid_subset(h, w, n)).collect()
            };
            let feat = rng.floats(batch * n * c);
            let options = DenseOptions { k, power: 6.0 };
            let want = to_dense(&pos, &feat, (batch, n, c), (h, w), options).unwrap();
            let (dpos, dfeat) = (device.upload(&pos).unwrap(), device.upload(&feat).unwrap());
            for search in [DenseSearch::AllTokens, DenseSearch::Rings] {
                let mut out = device.alloc::<f32>(batch * c * h * w).unwrap();
                to_dense_searching(
                    &device,
                    &dpos,
                    &dfeat,
                    &mut out,
                    (batch, n, c),
                    (h, w),
                    options,
                    search,
                )
                .unwrap();
                let what = format!("to_dense {h}x{w} n {n} k {k} {search:?} on {device:?}");
                assert_slices_close(&what, &device.download(&out).unwrap(), &want, 1e-5);
            }
            let mut out = device.alloc::<f32>(batch * c * h * w).unwrap();
            let sizes = (batch, n, c);
            autofocus::ops::dense::gpu::to_dense(
                &device,
                &dpos,
                &dfeat,
                &mut out,
                sizes,
                (h, w),
                options,
            )
            .unwrap();
            assert_slices_close("to_dense", &device.download(&out).unwrap(), &want, 1e-5);
        }
        // Two tokens on one cell: the rings, as the CPU, keep the lower one
        // (searching all tokens would weigh both).
        let (n, c) = (40, 2);
        let mut pos = rng.grid_subset(9, 11, n);
        for t in [5, 17, 39] {
            pos.copy_within(2 * (t - 3)..2 * (t - 2), 2 * t);
        }
        let feat = rng.floats(n * c);
        let options = DenseOptions::default();
        let want = to_dense(&pos, &feat, (1, n, c), (9, 11), options).unwrap();
        let (dpos, dfeat) = (device.upload(&pos).unwrap(), device.upload(&feat).unwrap());
        let mut out = device.alloc::<f32>(c * 9 * 11).unwrap();
        let sizes = (1, n, c);
        to_dense_searching(
            &device,
            &dpos,
            &dfeat,
            &mut out,
            sizes,
            (9, 11),
            options,
            DenseSearch::Rings,
        )
        .unwrap();
        assert_slices_close(
            "to_dense, shared cells",
            &device.download(&out).unwrap(),
            &want,
            1e-5,
        );
        // Rings where tokens are many for the grid, every token otherwise.
        assert_eq!(DenseSearch::for_sizes(900, 31 * 37, 4), DenseSearch::Rings);
        assert_eq!(
            DenseSearch::for_sizes(60, 40 * 50, 16),
            DenseSearch::AllTokens
        );
    }
}

/// The merge sort against Rust's stable sort: many ties (equal keys keep
/// index order; −0 and +0 are equal, as `<` and `==` see them), sizes
/// around powers of two (so the last run of a pass has no partner, or a
/// short one), batch 3, the output poisoned first.
#[test]
fn stable_sort_keeps_ties_in_index_order() {
    let mut rng = Rng::new(9);
    for device in common::devices() {
        for n in [1, 2, 3, 5, 8, 9, 600, 1024, 1025, 3000] {
            let batch = 3;
            let keys: Vec<f32> = (0..batch * n)
                .map(|_| match rng.below(9) {
                    7 => -0.0,
                    8 => 0.0,
                    v => v as f32 - 3.0 + 1e-3 * rng.below(3) as f32,
                })
                .collect();
            let dkeys = device.upload(&keys).unwrap();
            let mut order = device.upload(&vec![-7i32; batch * n]).unwrap();
            autofocus::gpu::sort::stable_sort(&device, &dkeys, &mut order, batch, n).unwrap();
            let got = device.download(&order).unwrap();
            for img in 0..batch {
                let k = &keys[img * n..(img + 1) * n];
                let mut want: Vec<i32> = (0..n as i32).collect();
                want.sort_by(|&a, &b| k[a as usize].partial_cmp(&k[b as usize]).unwrap());
                assert_eq!(
                    &got[img * n..(img + 1) * n],
                    &want[..],
                    "n {n}, image {img}"
                );
            }
        }
    }
}

#[test]
fn gather_and_mean_match_plain_loops() {
    let mut rng = Rng::new(10);
    for device in common::devices() {
        let (batch, rows, out_rows, width) = (2, 9, 5, 3);
        let x = rng.floats(batch * rows * width);
        let index: Vec<i32> = (0..batch * out_rows)
            .map(|_| rng.below(rows) as i32)
            .collect();
        let mut out = device.alloc::<f32>(batch * out_rows * width).unwrap();
        let (dx, di) = (device.upload(&x).unwrap(), device.upload(&index).unwrap());
        autofocus::gpu::tensor_ops::gather_rows(
            &device,
            &dx,
            &di,
            &mut out,
            (batch, rows, out_rows, width),
        )
        .unwrap();
        let want: Vec<f32> = (0..batch * out_rows * width)
            .map(|e| {
                let (row, col) = (e / width, e % width);
                x[((row / out_rows) * rows + index[row] as usize) * width + col]
            })
            .collect();
        assert_eq!(device.download(&out).unwrap(), want);

        // One index row shared by every image.
        let shared = device.upload(&index[..out_rows]).unwrap();
        let mut out = device.alloc::<f32>(batch * out_rows * width).unwrap();
        autofocus::gpu::tensor_ops::gather_rows(
            &device,
            &dx,
            &shared,
            &mut out,
            (batch, rows, out_rows, width),
        )
        .unwrap();
        let want: Vec<f32> = (0..batch * out_rows * width)
            .map(|e| {
                let (row, col) = (e / width, e % width);
                x[((row / out_rows) * rows + index[row % out_rows] as usize) * width + col]
            })
            .collect();
        assert_eq!(device.download(&out).unwrap(), want);

        let mut mean = device.alloc::<f32>(batch * width).unwrap();
        autofocus::gpu::tensor_ops::mean_tokens(&device, &dx, &mut mean, (batch, rows, width))
            .unwrap();
        let want: Vec<f32> = (0..batch * width)
            .map(|e| {
                (0..rows)
                    .map(|t| x[((e / width) * rows + t) * width + e % width])
                    .sum::<f32>()
                    / rows as f32
            })
            .collect();
        assert_slices_close("mean_tokens", &device.download(&mean).unwrap(), &want, 1e-6);
    }
}

/// The sums `column_sums` promises, bit for bit: passes adding chunks of
/// `COLUMN_SUM_CHUNK` rows, each in row order, until one row is left; and
/// how many passes.
fn chunked_column_sums(matrix: &[f32], rows: usize, cols: usize) -> (Vec<f32>, usize) {
    let chunk = autofocus::gpu::tensor_ops::COLUMN_SUM_CHUNK;
    let (mut level, mut rows, mut passes) = (matrix.to_vec(), rows, 0);
    loop {
        // No rows: one pass, writing zeros.
        let chunks = rows.div_ceil(chunk).max(1);
        level = (0..chunks * cols)
            .map(|e| {
                let (first, k) = ((e / cols) * chunk, e % cols);
                (first..(first + chunk).min(rows)).fold(0.0f32, |acc, r| acc + level[r * cols + k])
            })
            .collect();
        passes += 1;
        if chunks == 1 {
            return (level, passes);
        }
        rows = chunks;
    }
}

#[test]
fn column_sums_add_fixed_chunks_of_rows_in_order() {
    let mut rng = Rng::new(12);
    // One pass, a partial chunk, two column blocks (300 > 256 threads), and
    // 64·64 + 1 rows: three passes (4097 → 65 → 2 → 1).
    let shapes = [(0, 5), (1, 1), (64, 3), (65, 33), (130, 300), (4097, 2)];
    for device in common::devices() {
        for (rows, cols) in shapes {
            // Magnitudes from 2⁻⁸ to 2⁸, so that another order of the
            // additions gives other bits.
            let matrix: Vec<f32> = (0..rows * cols)
                .map(|_| rng.float() * 2f32.powi(rng.below(17) as i32 - 8))
                .collect();
            let input = device.upload(&matrix).unwrap();
            let mut out = device.alloc::<f32>(cols).unwrap();
            let before = device.counts();
            autofocus::gpu::tensor_ops::column_sums(&device, &input, &mut out, (rows, cols))
                .unwrap();
            let launches = (device.counts() - before).kernel_launches;
            let got = device.download(&out).unwrap();
            let (want, passes) = chunked_column_sums(&matrix, rows, cols);
            let what = format!("{rows}x{cols} on {device:?}");
            assert_eq!(got, want, "{what}");
            assert_eq!(launches, passes as u64, "{what}: one launch per pass");
            let exact: Vec<f32> = (0..cols)
                .map(|k| {
                    (0..rows)
                        .map(|r| f64::from(matrix[r * cols + k]))
                        .sum::<f64>() as f32
                })
                .collect();
            assert_slices_close(&what, &got, &exact, 1e-4);
        }
        // The sums' shape is checked.
        let input = device.upload(&[1.0f32; 6]).unwrap();
        let mut out = device.alloc::<f32>(2).unwrap();
        let err = autofocus::gpu::tensor_ops::column_sums(&device, &input, &mut out, (2, 3))
            .unwrap_err()
            .to_string();
        assert!(err.contains("column_sums") && err.contains("out"), "{err}");
    }
}

#[test]
fn bad_buffers_are_errors_naming_op_and_tensor() {
    let device = Device::emulator();
    let norm = DeviceLayerNorm {
        weight: device.upload(&[1.0f32; 4]).unwrap(),
        bias: device.upload(&[0.0f32; 4]).unwrap(),
    };
    let x = device.upload(&[0.0f32; 7]).unwrap();
    let mut out = device.alloc::<f32>(8).unwrap();
    let err = layer_norm(&device, &x, &norm, &mut out, 2)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layer_norm") && err.contains("`x`") && err.contains("[2, 4]"),
        "{err}"
    );
    let sel_err =
        autofocus::gpu::sort::stable_sort(&device, &x, &mut device.alloc::<i32>(6).unwrap(), 1, 7)
            .unwrap_err()
            .to_string();
    assert!(
        sel_err.contains("stable_sort") && sel_err.contains("`order`"),
        "{sel_err}"
    );
}

#[test]
fn cuda_is_a_clear_error_without_a_gpu() {
    if let Err(e) = Device::cuda(0) {
        let msg = e.to_string();
        assert!(msg.contains("cuda"), "{msg}");
    }
}

#[test]
fn patch_embed_matches_the_cpu_on_odd_sizes() {
    use autofocus::ops::BatchNorm;
    use autofocus::ops::patch_embed::PatchEmbed;
    use autofocus::ops::patch_embed::gpu::DevicePatchEmbed;
    let mut rng = Rng::new(11);
    let (mid, d) = (6, 10);
    let embed = PatchEmbed {
        proj1: linear_layer(&mut rng, 27, mid, true),
        bn: BatchNorm {
            weight: F32Buffer::owned(rng.floats(mid)),
            bias: F32Buffer::owned(rng.floats(mid)),
            running_mean: F32Buffer::owned(rng.floats(mid)),
            running_var: F32Buffer::owned(rng.floats(mid).iter().map(|v| 1.5 + v).collect()),
        },
        proj2: linear_layer(&mut rng, mid * 9, d, true),
        norm: LayerNorm {
            weight: F32Buffer::owned(rng.floats(d)),
            bias: F32Buffer::owned(rng.floats(d)),
        },
    };
    for device in common::devices() {
        let on_device = DevicePatchEmbed::<f32>::upload(&device, &embed).unwrap();
        for (batch, height, width) in [(2, 13, 10), (1, 4, 4), (1, 1, 7)] {
            let image = rng.floats(batch * 3 * height * width);
            let (want, grid) = embed.forward(&image, batch, (height, width)).unwrap();
            let dimage = device.upload(&image).unwrap();
            let (got, dgrid) = on_device
                .forward(&device, &dimage, batch, (height, width))
                .unwrap();
            assert_eq!(dgrid, grid);
            let what = format!("patch_embed {batch}×3×{height}×{width} on {device:?}");
            assert_slices_close(&what, &device.download(&got).unwrap(), &want, 1e-4);
        }
    }
}

/// Distinct neighbour clusters of each block of `s` queries (what the tiled
/// kernel stages), from one image's `n × nnc` nearest clusters.
fn union_sizes(nearest: &[u32], s: usize, nnc: usize) -> impl Iterator<Item = usize> + '_ {
    nearest.chunks(s * nnc).map(|block| {
        block
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    })
}

/// The tiled kernel (neighbourhoods of whole clusters) in every storage
/// type: random nearest clusters, a padded last cluster, batch > 1, shared
/// and per-image lists; features kept for all heads and recomputed per
/// head, each with tiles that hold a block's whole union and tiles too
/// small for it (the rest read from global memory). Every instance runs:
/// cluster sizes 6, 8 and 24 (compiled for) and 3, 4 and 5 (the run-time one).
fn check_tiled_attention<T: Element>(device: &Device, rng: &mut Rng) {
    // (features stored, union larger than the tile) seen.
    let mut covered = std::collections::BTreeSet::new();
    for (batch, h, w, n, heads, d, s, nnc, shared) in [
        (2, 9, 7, 61usize, 2, 32, 8usize, 6, false),
        (1, 8, 8, 64, 1, 16, 4, 5, true),
        (2, 10, 10, 99, 2, 64, 8, 12, false),
        (1, 5, 5, 23, 3, 7, 3, 2, false),
        (2, 9, 8, 70, 2, 33, 6, 4, false),
        (1, 11, 9, 97, 2, 8, 24, 2, true),
        (2, 7, 7, 47, 1, 5, 5, 3, false),
        (1, 17, 17, 288, 2, 32, 24, 6, false),
        (1, 13, 12, 150, 1, 8, 24, 6, true),
        (1, 30, 30, 800, 2, 32, 8, 6, false),
    ] {
        let mut case = AttentionCase::random(rng, (batch, h, w, n), heads, d, None);
        // Inputs the storage type holds exactly: only the output is rounded.
        for v in case.q.iter_mut().chain(case.kv.iter_mut()) {
            *v = T::from_f32(*v).to_f32();
        }
        let images = if shared { 1 } else { batch };
        let k = n.div_ceil(s);
        let nearest: Vec<u32> = (0..images * n * nnc).map(|_| rng.below(k) as u32).collect();
        let nbhd = Neighbourhood::from_clusters(&nearest, images, n, nnc, s);
        let dnbhd = DeviceNeighbourhood::upload_clustered(device, &nbhd, s).unwrap();
        let what = format!(
            "tiled attention n {n} s {s} nnc {nnc} d {d} on {device:?} {}",
            T::SUFFIX
        );
        let AttentionPlan::Tiled(plan) = attention_plan::<T>(nnc * s, Some(s), d) else {
            panic!("{what}: planned for the generic kernel");
        };
        let largest_union = nearest
            .chunks(n * nnc)
            .flat_map(|list| union_sizes(list, s, nnc))
            .max()
            .unwrap();
        covered.insert((plan.features_stored, largest_union > plan.tile_clusters));
        assert_slices_close(
            &what,
            &case.on_device::<T>(device, &dnbhd),
            &case.expected(&nbhd),
            tolerance::<T>(),
        );
    }
    assert_eq!(covered.len(), 4, "{}: plans covered {covered:?}", T::SUFFIX);
}

/// Every preset's stages, clustered (all four are at segmentation sizes),
/// run the tiled kernel in every storage type, within the shared memory a
/// launch may use on every GPU. The tile holds at least one query's own
/// neighbourhood (the least a block's union can be), except f32's at
/// cluster size 24 (m = 144): 4 clusters of 6.
#[test]
fn every_preset_plans_the_tiled_attention() {
    fn check<T: Element>(name: &str, stage: usize, m: usize, s: usize, d: usize) {
        let what = format!("{name} stage {stage} (m {m}, s {s}, d {d}) {}", T::SUFFIX);
        let AttentionPlan::Tiled(plan) = attention_plan::<T>(m, Some(s), d) else {
            panic!("{what}: planned for the generic kernel");
        };
        let least = if T::SUFFIX == "f32" && s == 24 {
            4
        } else {
            m / s
        };
        assert!(plan.tile_clusters >= least, "{what}: {plan:?}");
        assert!(
            plan.shared_bytes <= autofocus::gpu::MAX_SHARED_BYTES,
            "{what}"
        );
        // Features are recomputed only where keeping them leaves no room.
        assert_eq!(plan.features_stored, s != 24, "{what}: {plan:?}");
    }
    for (name, stage, m, s, d) in common::preset_stage_shapes() {
        check::<f32>(name, stage, m, s, d);
        check::<half::f16>(name, stage, m, s, d);
        check::<half::bf16>(name, stage, m, s, d);
    }
}

/// The tiled plan's cap of 2·nnc clusters holds a block's whole union on
/// the layouts the model makes (stage 0 of aff_tiny at 224² and of
/// aff_base_22kto1k_384 at 384²): a curve-made cluster's queries share most
/// of their nearest clusters. Random lists (the test above) go beyond it.
#[test]
fn model_layouts_unions_fit_the_tile_cap() {
    for (h, w, s, nnc, _, nearest) in common::model_stage0_layouts() {
        let unions: Vec<usize> = union_sizes(&nearest, s, nnc).collect();
        let largest = *unions.iter().max().unwrap();
        assert!(
            largest <= 2 * nnc,
            "{h}x{w} s {s}: a union of {largest} clusters"
        );
        // Not a bound that holds by construction: unions span nnc..2·nnc.
        assert!(
            unions.iter().any(|&u| u > nnc + 2),
            "{h}x{w} s {s}: {unions:?}"
        );
    }
}

#[test]
fn tiled_cluster_attention_matches_the_cpu() {
    let mut rng = Rng::new(12);
    for device in common::devices() {
        check_tiled_attention::<f32>(&device, &mut rng);
        check_tiled_attention::<half::f16>(&device, &mut rng);
        check_tiled_attention::<half::bf16>(&device, &mut rng);
        // Lists that are not whole clusters are refused for the tiled path.
        let loose = Neighbourhood {
            images: 1,
            tokens: 4,
            size: 2,
            idx: vec![0, 2, 1, 3, 0, 1, 2, 3],
            mask: None,
        };
        assert!(DeviceNeighbourhood::upload_clustered(&device, &loose, 2).is_err());
    }
}
