//! The golden cases of `../shared/golden` (spec §12): each stage checked on
//! its own from the golden inputs of that stage (teacher-forced), then the
//! whole model end to end. Indices and positions must match exactly, f32
//! values within `1e-4 · max(1, max|ref|)`.

mod common;

use autofocus::model::{ModelKind, StageLayout, Tokens};
use autofocus::{AnyTensor, Trace, TraceLevel};
use common::{Case, assert_close, assert_exact};

fn golden_tokens(case: &Case, pos: &str, feat: &str) -> Tokens {
    let (pos, feat) = (case.f32(pos), case.f32(feat));
    let &[b, n, c] = feat.shape() else {
        panic!("{}: feat shape", case.name)
    };
    Tokens {
        batch: b,
        tokens: n,
        channels: c,
        pos: pos.into_data(),
        feat: feat.into_data(),
    }
}

/// Compares one traced tensor with its golden twin: integers and positions
/// exactly, other values within tolerance.
fn compare(case: &Case, key: &str, got: &AnyTensor) {
    let what = format!("{} {key}", case.name);
    match got {
        AnyTensor::I32(t) => {
            let want = case.i32(key);
            assert_eq!(t.shape(), want.shape(), "{what}: shape");
            assert_exact(&what, t.data(), want.data());
        }
        AnyTensor::F32(t) => {
            let want = case.f32(key);
            assert_eq!(t.shape(), want.shape(), "{what}: shape");
            if key.ends_with("pos") {
                assert_exact(&what, t.data(), want.data());
            } else {
                assert_close(&what, t.data(), &want);
            }
        }
        AnyTensor::I64(_) => panic!("{what}: unexpected i64"),
    }
}

/// The published `pe_idx` encodes each neighbour's offset in a table of
/// half-width `W = img_size/4 − 1` as `(dy+W)·(2W+1) + (dx+W)`, unclamped (an
/// offset beyond W, as in images larger than `img_size`, lands on another
/// row's code); our neighbourhoods must give offsets with the same codes.
fn check_offsets(case: &Case, s: usize, layout: &StageLayout) {
    let key = format!("stage{s}.nbhd.pe_idx");
    let pe = case.i32(&key);
    let half = (case.model.config().img_size / 4 - 1) as i32;
    let width = 2 * half + 1;
    let (b, n) = (layout.batch, layout.tokens);
    let m = layout.nbhd().size;
    assert_eq!(pe.shape(), &[b, n, m], "{} {key}: shape", case.name);
    for img in 0..b {
        let pos = &layout.pos[img * n * 2..];
        for i in 0..n {
            for (slot, &j) in layout.nbhd().of(img, i).iter().enumerate() {
                let want = pe.data()[(img * n + i) * m + slot];
                let j = j as usize;
                let (dx, dy) = (
                    (pos[2 * j] - pos[2 * i]) as i32,
                    (pos[2 * j + 1] - pos[2 * i + 1]) as i32,
                );
                assert_eq!(
                    (dy + half) * width + (dx + half),
                    want,
                    "{} {key}: image {img} token {i} slot {slot}, offset ({dx}, {dy})",
                    case.name
                );
            }
        }
    }
}

const LAYOUT_KEYS: [&str; 8] = [
    "global_attn",
    "cluster.reorder",
    "cluster.pos",
    "cluster.mean_pos",
    "cluster.member_idx",
    "cluster.mask",
    "nearest_clusters",
    "nbhd.idx",
];

fn teacher_forced(case: &Case) {
    let model = &case.model;
    let grid = case.grid();
    let stages = model.config().num_stages();
    for s in 0..stages {
        let tokens = golden_tokens(
            case,
            &format!("stage{s}.in.pos"),
            &format!("stage{s}.in.feat"),
        );

        // Layout: clustering, reordering, neighbourhoods.
        let mut trace = Trace::new(TraceLevel::All);
        let layout = model.stage_layout(s, &tokens, grid).unwrap();
        model.run_stage(s, &tokens, grid, Some(&mut trace)).unwrap();
        for key in LAYOUT_KEYS
            .iter()
            .map(|k| format!("stage{s}.{k}"))
            .chain([format!("stage{s}.nbhd.mask"), format!("stage{s}.blocks.in")])
        {
            match (trace.tensors().get(&key), case.has(&key)) {
                (Some(got), true) => compare(case, &key, got),
                (None, false) => {}
                (got, has) => panic!(
                    "{} {key}: traced {}, golden {has}",
                    case.name,
                    got.is_some()
                ),
            }
        }
        check_offsets(case, s, &layout);

        // Each block from the golden output of the one before.
        let depth = model.config().depths[s];
        for j in 0..depth {
            let input = if j == 0 {
                format!("stage{s}.blocks.in")
            } else {
                format!("stage{s}.block{}.out", j - 1)
            };
            let mut feat = case.f32(&input).into_data();
            model.run_block(s, j, &mut feat, &layout).unwrap();
            let key = format!("stage{s}.block{j}.out");
            assert_close(
                &format!("{} {key} (teacher-forced)", case.name),
                &feat,
                &case.f32(&key),
            );
        }

        // The merge from the golden output of the last block.
        if s + 1 < stages {
            let pos_key = if case.has(&format!("stage{s}.cluster.pos")) {
                format!("stage{s}.cluster.pos")
            } else {
                format!("stage{s}.in.pos")
            };
            let before = golden_tokens(case, &pos_key, &format!("stage{s}.block{}.out", depth - 1));
            let mut trace = Trace::new(TraceLevel::All);
            let out = model.merge(s, &before, &layout, Some(&mut trace)).unwrap();
            for key in ["importance", "merge.reserve_num", "merge.pos", "merge.feat"] {
                let key = format!("stage{s}.{key}");
                compare(case, &key, &trace.tensors()[&key]);
            }
            assert_exact(
                &format!("{} stage{s} merged pos", case.name),
                &out.pos,
                case.f32(&format!("stage{s}.out.pos")).data(),
            );
        }
    }

    // The head from the golden output of the last stage.
    let last = stages - 1;
    let tokens = golden_tokens(
        case,
        &format!("stage{last}.out.pos"),
        &format!("stage{last}.out.feat"),
    );
    let mut trace = Trace::new(TraceLevel::All);
    model.head(&tokens, Some(&mut trace)).unwrap();
    for key in ["final.norm", "logits"] {
        compare(case, key, &trace.tensors()[key]);
    }
}

fn end_to_end(case: &Case) {
    let case_name = &case.name;
    let image = case.f32("input.image");
    let mut trace = Trace::new(TraceLevel::All);
    let logits = case.model.forward_traced(&image, Some(&mut trace)).unwrap();
    assert_close(
        &format!("{case_name} logits"),
        logits.data(),
        &case.f32("logits"),
    );
    let mut checked = 0;
    for key in case.golden_keys() {
        if key.starts_with("grad.") || key == "input.image" || key.ends_with("pe_idx") {
            continue;
        }
        let got = trace
            .tensors()
            .get(&key)
            .unwrap_or_else(|| panic!("{case_name}: {key} was not traced"));
        compare(case, &key, got);
        checked += 1;
    }
    assert!(checked > 40, "{case_name}: only {checked} tensors compared");
}

/// Every classification case of `tests/data` and `../shared/golden`, stage
/// by stage from the golden inputs.
#[test]
fn every_classification_case_teacher_forced() {
    let checked = common::for_each_golden_case(ModelKind::Classifier, teacher_forced);
    // The bundled cases are always there.
    assert!(checked.iter().any(|c| c == "tiny-128"), "{checked:?}");
}

/// Every classification case end to end, every golden tensor compared.
#[test]
fn every_classification_case_end_to_end() {
    common::for_each_golden_case(ModelKind::Classifier, end_to_end);
}

/// Every segmentation-backbone case (`res2..res5`, their positions and the
/// grid): features within 1e-4, positions exact.
#[test]
fn every_backbone_case_end_to_end() {
    common::for_each_golden_case(ModelKind::Backbone, |case| {
        let image = case.f32("input.image");
        let mut trace = Trace::new(TraceLevel::All);
        case.model
            .features_traced(&image, Some(&mut trace))
            .unwrap();
        let mut checked = 0;
        for key in case.golden_keys() {
            if key == "input.image" {
                continue;
            }
            let got = trace
                .tensors()
                .get(&key)
                .unwrap_or_else(|| panic!("{}: {key} was not traced", case.name));
            compare(case, &key, got);
            checked += 1;
        }
        assert!(
            checked >= 9,
            "{}: only {checked} tensors compared",
            case.name
        );
    });
}
