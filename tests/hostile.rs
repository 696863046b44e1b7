//! Hostile inputs: small, well-formed files that declare huge sizes, and a
//! few thousand deterministic mutations of every format the crate reads.
//! Each must load or fail with a clean error: never a panic, an abort or an
//! allocation beyond a memory cap. The mutations run in a child process
//! (this test binary again) under a 4 GiB address-space limit, so an abort
//! or an allocation failure is caught and reported with the mutation that
//! caused it.
//!
//! The regression corpus (one file per root cause found so far) is built
//! here; nothing large is shipped.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use autofocus::io::image::{Preprocess, load_image};
use autofocus::io::pth::{EntryChoice, PthCheckpoint};
use autofocus::io::{SafetensorsFile, TensorSource};
use autofocus::{AffConfig, AutoFocusFormer, Error};

// ------------------------------------------------------------ inputs ----

fn tiny_weights() -> PathBuf {
    common::data_dir().join("tiny-128.weights.safetensors")
}

fn tiny_pth() -> PathBuf {
    common::data_dir().join("tiny-128.pth")
}

fn tiny_config_json() -> String {
    SafetensorsFile::open(tiny_weights())
        .unwrap()
        .metadata("config")
        .unwrap()
        .to_string()
}

fn png_bytes(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn jpeg_bytes(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 99]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

/// Pickle opcodes for the values a `torch.save` state dict holds.
struct Pickle(Vec<u8>);

impl Pickle {
    fn new() -> Self {
        Self(b"\x80\x02".to_vec())
    }
    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.0.push(b'X');
        self.0.extend((s.len() as u32).to_le_bytes());
        self.0.extend(s.as_bytes());
        self
    }
    /// LONG1 with 8 bytes: any u64.
    fn int(&mut self, v: u64) -> &mut Self {
        self.0.extend([0x8a, 8]);
        self.0.extend(v.to_le_bytes());
        self
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.0.push(b'c');
        self.0.extend(format!("{module}\n{name}\n").as_bytes());
        self
    }
    fn tuple(&mut self, values: &[u64]) -> &mut Self {
        self.op(b"(");
        for &v in values {
            self.int(v);
        }
        self.op(b"t")
    }
    /// `{"model": {name: tensor}}` with one f32 tensor view of storage "0".
    fn state_dict(name: &str, numel: u64, offset: u64, size: &[u64], stride: &[u64]) -> Vec<u8> {
        let mut p = Self::new();
        p.op(b"}(").str("model").op(b"}(").str(name);
        p.global("torch._utils", "_rebuild_tensor_v2").op(b"(");
        p.op(b"(").str("storage").global("torch", "FloatStorage");
        p.str("0").str("cpu").int(numel).op(b"tQ");
        p.int(offset).tuple(size).tuple(stride).op(b"\x89");
        p.global("collections", "OrderedDict").op(b")R");
        p.op(b"tRu").op(b"u.");
        p.0
    }
}

/// A `torch.save`-style zip: `archive/data.pkl` and `archive/data/<key>`.
fn pth_bytes(pickle: &[u8], storages: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", stored).unwrap();
    zip.write_all(pickle).unwrap();
    for (key, bytes) in storages {
        zip.start_file(format!("archive/data/{key}"), stored)
            .unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

// ------------------------------------------------ regression corpus ----

fn assert_too_large(err: &Error, what: &str) {
    let text = err.to_string();
    assert!(
        matches!(err, Error::TooLarge { .. }) && text.contains(what),
        "expected a size error naming {what}: {text}"
    );
}

/// 1: a valid 1×60000 PNG would be resized to 256×15360000.
#[test]
fn an_extreme_aspect_ratio_is_refused_before_resizing() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "thin.png", &png_bytes(1, 60_000));
    let pre = Preprocess {
        size: 224,
        crop: true,
    };
    let err = load_image(&path, pre).unwrap_err();
    assert_too_large(&err, "thin.png");
    assert!(err.to_string().contains("1×60000"), "{err}");
    // An ordinary image still loads; an empty one is an error, not a division by zero.
    let ok = write(dir.path(), "ok.png", &png_bytes(40, 30));
    assert_eq!(load_image(&ok, pre).unwrap().len(), 3 * 224 * 224);
    assert!(pre.apply(&image::RgbImage::new(0, 5)).is_err());
}

/// A PNG declaring 100000×100000 pixels is stopped by the decoder's limits.
#[test]
fn a_huge_declared_image_is_refused_by_the_decoder() {
    let mut bytes = png_bytes(2, 2);
    // IHDR width and height (big-endian) at bytes 16..24; fix the CRC after.
    bytes[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    bytes[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "huge.png", &bytes);
    let pre = Preprocess {
        size: 224,
        crop: true,
    };
    let err = load_image(&path, pre).unwrap_err();
    assert_too_large(&err, "huge.png");
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn open_pth(dir: &Path, name: &str, bytes: &[u8]) -> Result<PthCheckpoint, Error> {
    PthCheckpoint::open(write(dir, name, bytes), EntryChoice::Model)
}

/// 2, 3: memo bombs and deep nesting inside a checkpoint's pickle.
#[test]
fn pickle_bombs_in_a_checkpoint_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut bomb = b"\x80\x02]q\x00K\x01a".to_vec();
    for level in 1..=12u8 {
        bomb.extend(b"](");
        for _ in 0..10 {
            bomb.extend([b'h', level - 1]);
        }
        bomb.extend([b'e', b'q', level]);
    }
    bomb.push(b'.');
    let err = open_pth(dir.path(), "bomb.pth", &pth_bytes(&bomb, &[])).unwrap_err();
    assert!(err.to_string().contains("values"), "{err}");

    let mut deep = b"\x80\x02N".to_vec();
    deep.extend(std::iter::repeat_n(0x85u8, 1_000_000));
    deep.push(b'.');
    let err = open_pth(dir.path(), "deep.pth", &pth_bytes(&deep, &[])).unwrap_err();
    assert!(err.to_string().contains("nested"), "{err}");
}

/// 4: stride-0 views with huge sizes, and sizes whose product wraps to 0.
#[test]
fn hostile_tensor_views_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let storage = vec![0u8; 16];
    let cases: [(&[u64], &[u64]); 3] = [
        (&[1 << 31, 1 << 31], &[0, 0]),
        (&[1 << 32, 1 << 32, 0], &[0, 0, 0]),
        (&[1 << 62, 8], &[0, 0]),
    ];
    for (i, (size, stride)) in cases.into_iter().enumerate() {
        let pickle = Pickle::state_dict("w", 4, 0, size, stride);
        let bytes = pth_bytes(&pickle, &[("0", storage.clone())]);
        let err = open_pth(dir.path(), &format!("view{i}.pth"), &bytes).unwrap_err();
        assert!(err.to_string().contains("tensor `w`"), "{err}");
    }
    // The same builder with an honest view reads.
    let pickle = Pickle::state_dict("w", 4, 0, &[2, 2], &[2, 1]);
    let ok = open_pth(dir.path(), "ok.pth", &pth_bytes(&pickle, &[("0", storage)])).unwrap();
    assert_eq!(ok.tensors()["w"].shape(), &[2, 2]);
}

/// 5: zip size fields that claim gigabytes.
#[test]
fn zip_entries_declaring_huge_sizes_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let pickle = Pickle::state_dict("w", 4, 0, &[4], &[1]);
    let honest = pth_bytes(&pickle, &[("0", vec![0u8; 16])]);
    for size in [0xFFFF_FFFFu32, 0x7FFF_FFFF, 1 << 30] {
        let mut bytes = honest.clone();
        // Every local and central header's uncompressed size.
        let mut at = 0;
        while at + 46 <= bytes.len() {
            match &bytes[at..at + 4] {
                b"PK\x03\x04" => bytes[at + 22..at + 26].copy_from_slice(&size.to_le_bytes()),
                b"PK\x01\x02" => bytes[at + 24..at + 28].copy_from_slice(&size.to_le_bytes()),
                _ => {}
            }
            at += 1;
        }
        assert!(
            open_pth(dir.path(), "sizes.pth", &bytes).is_err(),
            "size {size:#x}"
        );
    }
}

/// 6, 8: configurations with huge or zero values, stored or given.
#[test]
fn hostile_configurations_are_refused_before_allocating() {
    let base: serde_json::Value = serde_json::from_str(&tiny_config_json()).unwrap();
    let edits: [(&str, serde_json::Value); 9] = [
        ("embed_dim", serde_json::json!([1u64 << 40, 32, 64, 96])),
        ("embed_dim", serde_json::json!([16, 32, 64, 1u64 << 20])),
        ("mlp_ratio", serde_json::json!(1e30)),
        ("num_classes", serde_json::json!(1u64 << 40)),
        ("num_classes", serde_json::json!(0)),
        ("depths", serde_json::json!([1, 1, 1u64 << 40, 1])),
        ("cluster_size", serde_json::json!(1u64 << 40)),
        ("img_size", serde_json::json!(1u64 << 40)),
        ("nbhd_size", serde_json::json!([48, 48, 48, 1u64 << 50])),
    ];
    for (field, value) in edits {
        let mut json = base.clone();
        json[field] = value.clone();
        let text = json.to_string();
        let err = match AffConfig::from_json(&text) {
            Err(e) => e,
            Ok(config) => AutoFocusFormer::load(tiny_weights(), Some(config)).unwrap_err(),
        };
        assert!(
            matches!(err, Error::Config(_)) && err.to_string().contains(field),
            "{field} = {value}: {err}"
        );
    }
}

/// 7: bench options asking for more than the machine has.
#[test]
fn hostile_bench_options_are_one_line_errors() {
    let bin = env!("CARGO_BIN_EXE_autofocus");
    for args in [
        &["--size", "100000"][..],
        &["--batch", "100000", "--size", "128"],
        &["--threads", "100000"],
    ] {
        let out = Command::new(bin)
            .args([
                "bench", "--config", "aff_mini", "--iters", "1", "--warmup", "0",
            ])
            .args(args)
            .env("AUTOFOCUS_MEMORY_LIMIT_MIB", "4096")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} ran");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("limit"), "{args:?}: {err}");
    }
}

// ------------------------------------------------------- mutations ----

/// Set in the child: which format to mutate, and how many times.
const CHILD: &str = "AUTOFOCUS_HOSTILE_CHILD";
/// The child's address-space cap.
const MEMORY_CAP: u64 = 4 << 30;

/// Fixed seeds: the same mutations every run.
use common::SplitMix as Rng;

/// Sizes that have broken parsers: limits, wrap-around points, zero.
const HOSTILE: [u64; 9] = [
    0,
    1,
    0x7FFF_FFFF,
    0xFFFF_FFFF,
    1 << 32,
    1 << 40,
    (1 << 62) + 1,
    u64::MAX,
    60_000,
];

/// Replaces a run of ASCII digits (a size in a JSON header or a pickle's
/// text) with a hostile number.
fn mutate_digits(bytes: &mut Vec<u8>, range: std::ops::Range<usize>, rng: &mut Rng) -> bool {
    let runs: Vec<(usize, usize)> = {
        let mut runs = Vec::new();
        let mut i = range.start;
        while i < range.end {
            if bytes[i].is_ascii_digit() {
                let start = i;
                while i < range.end && bytes[i].is_ascii_digit() {
                    i += 1;
                }
                runs.push((start, i));
            } else {
                i += 1;
            }
        }
        runs
    };
    if runs.is_empty() {
        return false;
    }
    let (start, end) = runs[rng.below(runs.len())];
    let value = HOSTILE[rng.below(HOSTILE.len())].to_string();
    bytes.splice(start..end, value.bytes());
    true
}

/// One to four random edits: byte flips, hostile 32- and 64-bit values,
/// truncation, duplicated or deleted chunks.
fn mutate_bytes(bytes: &mut Vec<u8>, rng: &mut Rng) {
    for _ in 0..1 + rng.below(4) {
        if bytes.is_empty() {
            return;
        }
        let at = rng.below(bytes.len());
        match rng.below(7) {
            0 => bytes[at] ^= 1 << rng.below(8),
            1 => bytes[at] = [0, 0xFF, 0x7F, 0x80][rng.below(4)],
            2 if at + 4 <= bytes.len() => {
                let v = HOSTILE[rng.below(HOSTILE.len())] as u32;
                bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            3 if at + 8 <= bytes.len() => {
                let v = HOSTILE[rng.below(HOSTILE.len())];
                bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            4 => bytes.truncate(at),
            5 => {
                let len = rng.below(64).min(bytes.len() - at);
                let chunk = bytes[at..at + len].to_vec();
                let to = rng.below(bytes.len());
                bytes.splice(to..to, chunk);
            }
            _ => {
                let len = rng.below(16).min(bytes.len() - at);
                bytes.drain(at..at + len);
            }
        }
    }
}

/// A safetensors file mutated in its JSON header (sizes, offsets, the
/// stored config; the length prefix kept consistent) or in its bytes.
fn mutate_safetensors(base: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut bytes = base.to_vec();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    if rng.below(3) > 0 {
        let mut header = bytes[8..8 + header_len].to_vec();
        for _ in 0..1 + rng.below(3) {
            let len = header.len();
            mutate_digits(&mut header, 0..len, rng);
        }
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend(header);
        out.extend(&bytes[8 + header_len..]);
        out
    } else {
        mutate_bytes(&mut bytes, rng);
        bytes
    }
}

/// Where the data of the stored zip entry whose name ends with `suffix`
/// lies, from the central directory (`torch.save` leaves the sizes out of
/// the local headers) and the entry's local header.
fn entry_range(zip: &[u8], suffix: &str) -> Option<std::ops::Range<usize>> {
    let u16_at =
        |at: usize| Some(u16::from_le_bytes(zip.get(at..at + 2)?.try_into().ok()?) as usize);
    let u32_at =
        |at: usize| Some(u32::from_le_bytes(zip.get(at..at + 4)?.try_into().ok()?) as usize);
    let mut at = 0;
    while at + 46 <= zip.len() {
        if &zip[at..at + 4] == b"PK\x01\x02" {
            let name_len = u16_at(at + 28)?;
            let name = zip.get(at + 46..at + 46 + name_len)?;
            if name.ends_with(suffix.as_bytes()) {
                let size = u32_at(at + 20)?;
                let local = u32_at(at + 42)?;
                let start = local + 30 + u16_at(local + 26)? + u16_at(local + 28)?;
                return Some(start..(start + size).min(zip.len()));
            }
        }
        at += 1;
    }
    None
}

/// A `.pth` checkpoint's entries, to be mutated and zipped again.
fn zip_entries(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    (0..zip.len())
        .map(|i| {
            let mut entry = zip.by_index(i).unwrap();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
            (entry.name().unwrap().to_string(), data)
        })
        .collect()
}

fn zip_again(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in entries {
        zip.start_file(name.as_str(), stored).unwrap();
        zip.write_all(data).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

/// A `.pth` mutated in its pickle (an integer operand of BININT1, BININT2
/// or BININT made a hostile LONG1: sizes, strides, offsets, storage sizes,
/// memo keys; or random bytes), in a storage (truncated), or in the raw
/// zip bytes.
fn mutate_pth(base: &[u8], entries: &[(String, Vec<u8>)], rng: &mut Rng) -> Vec<u8> {
    let mut entries = entries.to_vec();
    let pickle = entries
        .iter()
        .position(|(n, _)| n.ends_with("/data.pkl"))
        .unwrap();
    match rng.below(4) {
        0 | 1 => {
            for _ in 0..1 + rng.below(3) {
                let pkl = &mut entries[pickle].1;
                let ints: Vec<usize> = (0..pkl.len())
                    .filter(|&i| matches!(pkl[i], b'K' | b'M' | b'J'))
                    .collect();
                let at = ints[rng.below(ints.len())];
                let width = match pkl[at] {
                    b'K' => 1,
                    b'M' => 2,
                    _ => 4,
                };
                let mut long = vec![0x8a, 8];
                long.extend(HOSTILE[rng.below(HOSTILE.len())].to_le_bytes());
                let end = (at + 1 + width).min(pkl.len());
                pkl.splice(at..end, long);
            }
        }
        2 => {
            let pkl = &mut entries[pickle].1;
            mutate_bytes(pkl, rng);
        }
        _ => {
            let mut bytes = base.to_vec();
            mutate_bytes(&mut bytes, rng);
            return bytes;
        }
    }
    if rng.below(4) == 0 {
        let i = rng.below(entries.len());
        let len = entries[i].1.len();
        entries[i].1.truncate(rng.below(len + 1));
    }
    zip_again(&entries)
}

/// Runs one mutated input through its loader; `Ok` or `Err` are both fine.
fn load(format: &str, path: &Path) {
    let _ = match format {
        "safetensors" => AutoFocusFormer::load(path, None).map(drop),
        "pth" => PthCheckpoint::open(path, EntryChoice::Model).and_then(|c| {
            let config = AffConfig::from_json(&tiny_config_json())?;
            AutoFocusFormer::from_source(&c, Some(config)).map(drop)
        }),
        "png" | "jpeg" => load_image(
            path,
            Preprocess {
                size: 64,
                crop: true,
            },
        )
        .map(drop),
        "config" => std::fs::read_to_string(path)
            .map_err(|e| Error::io(path, e))
            .and_then(|json| AffConfig::from_json(&json))
            .and_then(|config| AutoFocusFormer::load(tiny_weights(), Some(config)).map(drop)),
        other => panic!("unknown format {other}"),
    };
}

/// The child: mutates `format` `count` times and loads each, under the cap.
/// Prints each mutation before it runs, so an abort names it.
#[test]
fn hostile_child() {
    let Ok(spec) = std::env::var(CHILD) else {
        return; // only runs as the child of `mutations_*`
    };
    let (format, count) = spec.split_once(':').unwrap();
    let count: usize = count.parse().unwrap();
    let cap = libc::rlimit {
        rlim_cur: MEMORY_CAP,
        rlim_max: MEMORY_CAP,
    };
    // SAFETY: sets this process's own address-space limit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &cap) }, 0);
    let dir = tempfile::tempdir().unwrap();
    let base: Vec<u8> = match format {
        "safetensors" => std::fs::read(tiny_weights()).unwrap(),
        "pth" => std::fs::read(tiny_pth()).unwrap(),
        "png" => png_bytes(23, 17),
        "jpeg" => jpeg_bytes(23, 17),
        "config" => tiny_config_json().into_bytes(),
        other => panic!("unknown format {other}"),
    };
    let entries = if format == "pth" {
        zip_entries(&base)
    } else {
        Vec::new()
    };
    let mut rng = Rng(0xA5F0 ^ format.len() as u64 ^ (format.as_bytes()[0] as u64) << 16);
    let mut panics = Vec::new();
    let path = dir.path().join(format!("input.{format}"));
    for i in 0..count {
        let bytes = match format {
            "safetensors" => mutate_safetensors(&base, &mut rng),
            "pth" => mutate_pth(&base, &entries, &mut rng),
            "config" => {
                let mut b = base.clone();
                let len = b.len();
                if !mutate_digits(&mut b, 0..len, &mut rng) {
                    mutate_bytes(&mut b, &mut rng);
                }
                b
            }
            _ => {
                let mut b = base.clone();
                mutate_bytes(&mut b, &mut rng);
                b
            }
        };
        std::fs::write(&path, &bytes).unwrap();
        eprintln!("mutation {i}");
        if std::panic::catch_unwind(|| load(format, &path)).is_err() {
            panics.push(i);
        }
    }
    println!("{format}: {count} mutations loaded, panics at {panics:?}");
    assert!(
        panics.is_empty(),
        "{format}: panics at mutations {panics:?}"
    );
}

/// Runs `count` mutations of `format` in a child process under the cap.
fn mutations(format: &str, count: usize) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "hostile_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, format!("{format}:{count}"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().rev().find(|l| l.starts_with("mutation "));
    assert!(
        out.status.success(),
        "{format}: the child failed ({}) at {last:?}:\n{}",
        out.status,
        stderr.lines().rev().take(15).collect::<Vec<_>>().join("\n")
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("{format}: {count} mutations loaded")),
        "{stdout}"
    );
}

#[test]
fn mutations_of_safetensors_weights() {
    mutations("safetensors", 2000);
}

#[test]
fn mutations_of_pth_checkpoints() {
    mutations("pth", 2000);
}

#[test]
fn mutations_of_png_images() {
    mutations("png", 3000);
}

#[test]
fn mutations_of_jpeg_images() {
    mutations("jpeg", 3000);
}

#[test]
fn mutations_of_configurations() {
    mutations("config", 2000);
}

/// The mutator finds the checkpoint's pickle (so it mutates the pickle, not
/// only the zip around it).
#[test]
fn the_tiny_pth_holds_a_pickle_the_mutator_finds() {
    let bytes = std::fs::read(tiny_pth()).unwrap();
    let range = entry_range(&bytes, "/data.pkl").unwrap();
    assert!(bytes[range.clone()].starts_with(b"\x80\x02"), "{range:?}");
    assert_eq!(bytes[range.end - 1], b'.', "{range:?}");
    let source = PthCheckpoint::open(tiny_pth(), EntryChoice::Model).unwrap();
    assert!(!source.names().is_empty());
}
