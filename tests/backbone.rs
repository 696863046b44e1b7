//! Segmentation backbones (spec §10): the published backbone's outputs, the
//! checkpoint layouts it comes in, and dense maps of its features.

mod common;

use std::collections::HashMap;

use autofocus::io::{SafetensorsFile, TensorSource, write_safetensors};
use autofocus::model::StageResult;
use autofocus::ops::dense::DenseOptions;
use autofocus::{AnyTensor, AutoFocusFormer, Error, Tensor};
use common::{Case, assert_close};

fn seg_path(kind: &str) -> std::path::PathBuf {
    common::data_dir().join(format!("seg-tiny-130x190.{kind}.safetensors"))
}

#[test]
fn classification_stages_hand_on_their_last_block_before_merging() {
    let case = Case::load("tiny-128").unwrap();
    let (tokens, grid) = case.model.embed(&case.f32("input.image"), None).unwrap();
    let results: Vec<StageResult> = case.model.run_stages(tokens, grid, None).unwrap();
    for (s, r) in results.iter().enumerate() {
        let last = case.model.config().depths[s] - 1;
        let key = format!("stage{s}.block{last}.out");
        assert_close(&key, &r.before_merge.feat, &case.f32(&key));
    }
    let err = case.model.features(&case.f32("input.image")).unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
}

#[test]
fn a_mask2former_checkpoint_loads_its_backbone_and_ignores_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let source = SafetensorsFile::open(seg_path("weights")).unwrap();
    let mut tensors: Vec<(String, AnyTensor)> = source
        .names()
        .into_iter()
        .map(|n| {
            (
                format!("backbone.{n}"),
                AnyTensor::F32(source.tensor_f32(&n).unwrap()),
            )
        })
        .collect();
    tensors.push((
        "sem_seg_head.predictor.class_embed.weight".into(),
        AnyTensor::F32(Tensor::new(vec![3, 2], vec![0.0; 6]).unwrap()),
    ));
    let path = dir.path().join("mask2former.safetensors");
    let meta = HashMap::from([(
        "config".to_string(),
        source.metadata("config").unwrap().to_string(),
    )]);
    write_safetensors(&path, &tensors, meta).unwrap();
    let prefixed = AutoFocusFormer::load(&path, None).unwrap();
    let plain = AutoFocusFormer::load(seg_path("weights"), None).unwrap();
    let image = SafetensorsFile::open(seg_path("golden"))
        .unwrap()
        .tensor_f32("input.image")
        .unwrap();
    let (a, b) = (
        prefixed.features(&image).unwrap(),
        plain.features(&image).unwrap(),
    );
    for (x, y) in a.stages.iter().zip(&b.stages) {
        assert_eq!(x.feat, y.feat);
    }
}

#[test]
fn dense_maps_scatter_tokens_and_fill_the_gaps() {
    let model = AutoFocusFormer::load(seg_path("weights"), None).unwrap();
    let image = SafetensorsFile::open(seg_path("golden"))
        .unwrap()
        .tensor_f32("input.image")
        .unwrap();
    let features = model.features(&image).unwrap();
    let (h, w) = features.grid;
    for s in 0..4 {
        let t = &features.stages[s];
        let dense = features.to_dense(s, DenseOptions::default()).unwrap();
        assert_eq!(dense.shape(), &[t.batch, t.channels, h, w]);
        assert!(dense.data().iter().all(|v| v.is_finite()));
        // Every token's own cell holds exactly its features.
        for img in 0..t.batch {
            for i in 0..t.tokens {
                let (x, y) = (
                    t.pos[(img * t.tokens + i) * 2] as usize,
                    t.pos[(img * t.tokens + i) * 2 + 1] as usize,
                );
                for ch in 0..t.channels {
                    let got = dense.data()[((img * t.channels + ch) * h + y) * w + x];
                    assert_eq!(
                        got,
                        t.feat[(img * t.tokens + i) * t.channels + ch],
                        "stage {s}"
                    );
                }
            }
        }
    }
    // Stage 0 covers the grid: its dense map is a pure scatter, no filling.
    assert_eq!(features.stages[0].tokens, h * w);
    // The kernel (on the emulator here) gives the same maps.
    let device = autofocus::gpu::Device::emulator();
    for s in 1..4 {
        let cpu = features.to_dense(s, DenseOptions::default()).unwrap();
        let kernel = features
            .to_dense_on(&device, s, DenseOptions::default())
            .unwrap();
        let scale = cpu.data().iter().fold(1.0f32, |m, v| m.max(v.abs()));
        for (a, b) in cpu.data().iter().zip(kernel.data()) {
            assert!((a - b).abs() <= 1e-5 * scale, "stage {s}: {a} vs {b}");
        }
    }
}

/// Segmentation checkpoints clamp relative offsets to ±511 (spec §5);
/// classifiers do not clamp at all.
#[test]
fn segmentation_offsets_are_clamped_at_511() {
    use autofocus::ops::neighbourhood::Neighbourhood;
    use autofocus::ops::rel_pos::{OffsetTable, neighbour_rows};
    let pos = [0.0, 0.0, 1.0, 900.0];
    let nbhd = Neighbourhood::global(2);
    let clamped = OffsetTable::new(1200, 2, Some(511));
    let rows = neighbour_rows(&clamped, &pos, &nbhd, 1).unwrap();
    // Slots: (0→0), (0→1), (1→0), (1→1).
    assert_eq!(rows[1] as usize, clamped.row(1, 511));
    assert_eq!(rows[2] as usize, clamped.row(-1, -511));
    let f = |table: &OffsetTable, row: u32| {
        (0..5)
            .map(|k| table.feature(k)[row as usize])
            .collect::<Vec<_>>()
    };
    let d = (1.0f32 + 511.0 * 511.0).sqrt();
    assert_eq!(f(&clamped, rows[1]), [1.0, 511.0, d, 511.0 / d, 1.0 / d]);
    let free = OffsetTable::new(1200, 2, None);
    let rows = neighbour_rows(&free, &pos, &nbhd, 1).unwrap();
    assert_eq!(f(&free, rows[1])[1], 900.0);

    // A backbone on an image taller than 2048 pixels runs with clamped offsets.
    let model = AutoFocusFormer::load(seg_path("weights"), None).unwrap();
    let tall = Tensor::new(
        vec![1, 3, 2200, 8],
        (0..3 * 2200 * 8).map(|i| (i as f32 * 0.01).sin()).collect(),
    )
    .unwrap();
    let features = model.features(&tall).unwrap();
    assert_eq!(features.grid, (550, 2));
    assert!(
        features
            .stages
            .iter()
            .all(|s| s.feat.iter().all(|v| v.is_finite()))
    );
}
