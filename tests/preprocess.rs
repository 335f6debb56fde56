//! `diracnet::preprocess` against the OpenCV references in `tests/fixtures/` (written by
//! `tests/fixtures/make_fixtures.py` with opencv-python; see `tests/fixtures/reference/README.md`).
//!
//! `cargo test --test preprocess -- --nocapture` prints the per-image agreement.

mod common;

use std::path::Path;

use candle_core::Tensor;
use diracnet::{
    preprocess::{decode_rgb8, normalize, preprocess, resize_crop, DEFAULT_MAX_PIXELS},
    tensor::INPUT_SIZE,
};
use image::RgbImage;

use crate::common::fixtures;

struct Entry {
    file: String,
    crop: String,
    width: u32,
    height: u32,
}

fn manifest() -> Vec<Entry> {
    let path = fixtures().join("images/manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("manifest.json");
    let entries = json.as_array().expect("manifest is a list");
    assert!(!entries.is_empty(), "empty manifest");
    entries
        .iter()
        .map(|e| {
            let field = |k: &str| {
                e[k].as_str()
                    .unwrap_or_else(|| panic!("{k} in {e}"))
                    .to_string()
            };
            let num = |k: &str| e[k].as_u64().unwrap_or_else(|| panic!("{k} in {e}")) as u32;
            Entry {
                file: field("file"),
                crop: field("crop"),
                width: num("width"),
                height: num("height"),
            }
        })
        .collect()
}

/// A `[224, 224, 3]` uint8 `.npy` as an image.
fn read_crop(path: &Path) -> RgbImage {
    let t = Tensor::read_npy(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let side = INPUT_SIZE;
    assert_eq!(t.dims(), [side, side, 3], "{}", path.display());
    let data = t
        .flatten_all()
        .and_then(|t| t.to_vec1::<u8>())
        .expect("u8 npy");
    RgbImage::from_raw(INPUT_SIZE as u32, INPUT_SIZE as u32, data).expect("224x224x3")
}

struct Agreement {
    max_abs: u8,
    mean_abs: f64,
    exact: usize,
    within_one: usize,
    total: usize,
}

fn compare(ours: &RgbImage, reference: &RgbImage) -> Agreement {
    let pairs = ours.as_raw().iter().zip(reference.as_raw());
    let diffs: Vec<u8> = pairs.map(|(&a, &b)| a.abs_diff(b)).collect();
    Agreement {
        max_abs: diffs.iter().copied().max().unwrap_or(0),
        mean_abs: diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len().max(1) as f64,
        exact: diffs.iter().filter(|&&d| d == 0).count(),
        within_one: diffs.iter().filter(|&&d| d <= 1).count(),
        total: diffs.len(),
    }
}

/// Bounds for every image: at least this fraction of values within ±1 level, and no value
/// further off than this. The resize agrees with IPP's float32 rounding on all but a few values
/// per crop, and JPEGs decode as libjpeg-turbo does (mozjpeg), so no format gets slack.
const MIN_WITHIN_ONE: f64 = 0.999;
const MAX_ABS: u8 = 1;

#[test]
fn crops_match_opencv_reference() {
    let dir = fixtures().join("images");
    let mut failures = Vec::new();
    let (mut differ, mut total) = (0, 0);
    for entry in manifest() {
        let bytes = std::fs::read(dir.join(&entry.file)).expect("fixture image");
        let img = decode_rgb8(&bytes, DEFAULT_MAX_PIXELS)
            .unwrap_or_else(|e| panic!("{}: {e} ({})", entry.file, e.kind()));
        assert_eq!(
            img.dimensions(),
            (entry.width, entry.height),
            "{}: decoded (displayed) size",
            entry.file
        );
        let ours = resize_crop(&img);
        let reference = read_crop(&dir.join(&entry.crop));
        let a = compare(&ours, &reference);
        println!(
            "{:<26} {:>3}x{:<3} max |d| {}  mean |d| {:.4}  exact {:>6}/{} ({:.4} %)  within ±1 {:.4} %",
            entry.file,
            entry.width,
            entry.height,
            a.max_abs,
            a.mean_abs,
            a.exact,
            a.total,
            100.0 * a.exact as f64 / a.total as f64,
            100.0 * a.within_one as f64 / a.total as f64,
        );
        differ += a.total - a.exact;
        total += a.total;
        if (a.within_one as f64) < MIN_WITHIN_ONE * a.total as f64 || a.max_abs > MAX_ABS {
            failures.push(format!(
                "{}: {}/{} within ±1, max |d| {} (bounds {MIN_WITHIN_ONE}, {MAX_ABS})",
                entry.file, a.within_one, a.total, a.max_abs
            ));
        }
    }
    println!("all images: {differ} of {total} values differ from opencv-python");
    assert!(failures.is_empty(), "{failures:#?}");
}

/// `reference/inputs.npy` is numpy's normalisation of the reference crops of these images.
const INPUT_ORDER: [&str; 2] = ["chelsea.jpg", "camera_gray.png"];

fn reference_inputs() -> Vec<f32> {
    let path = fixtures().join("reference/inputs.npy");
    let t = Tensor::read_npy(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let side = INPUT_SIZE;
    assert_eq!(t.dims(), [INPUT_ORDER.len(), 3, side, side]);
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f32 npy")
}

#[test]
fn normalize_matches_numpy_bit_for_bit() {
    let inputs = reference_inputs();
    let per_image = 3 * INPUT_SIZE * INPUT_SIZE;
    for (i, file) in INPUT_ORDER.iter().enumerate() {
        let crop = read_crop(&fixtures().join(format!("images/{file}.crop.npy")));
        let ours = normalize(&crop);
        let expected = &inputs[i * per_image..(i + 1) * per_image];
        assert_eq!(ours.len(), expected.len());
        let differing = ours
            .iter()
            .zip(expected)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        println!(
            "{file}: normalize vs numpy, {differing} of {} values differ in any bit",
            ours.len()
        );
        assert_eq!(differing, 0, "{file}");
    }
}

#[test]
fn preprocess_end_to_end_matches_reference_inputs() {
    let inputs = reference_inputs();
    let per_image = 3 * INPUT_SIZE * INPUT_SIZE;
    // one 8-bit level is 1 / (255 * std) ≤ 0.0176 after normalisation
    let level = 1.0 / (255.0 * 0.224) + 1e-6;
    for (i, file) in INPUT_ORDER.iter().enumerate() {
        let bytes = std::fs::read(fixtures().join("images").join(file)).expect("fixture image");
        let ours = preprocess(&bytes, DEFAULT_MAX_PIXELS).expect("preprocess");
        let expected = &inputs[i * per_image..(i + 1) * per_image];
        assert_eq!(ours.len(), per_image);
        let max = ours
            .iter()
            .zip(expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        let same = ours.iter().zip(expected).filter(|(a, b)| a == b).count();
        println!(
            "{file}: preprocess vs inputs.npy, max |d| {max:.5}, {same}/{per_image} identical"
        );
        assert!(max <= f32::from(MAX_ABS) * level, "{file}: max |d| {max}");
        assert!(
            same as f64 >= MIN_WITHIN_ONE * per_image as f64,
            "{file}: {same} identical"
        );
    }
}

/// libjpeg reports fatal errors by unwinding through C; they must come back as typed errors.
#[test]
fn corrupt_jpegs_are_errors_not_panics() {
    let good = std::fs::read(fixtures().join("images/chelsea.jpg")).expect("fixture");
    // Header intact, entropy-coded data garbled: libjpeg decodes what it can (as OpenCV does)
    // or fails; either way no panic, and a success has the header's size.
    let mut garbled = good.clone();
    let mid = garbled.len() / 2;
    garbled[mid..].iter_mut().for_each(|b| *b = 0xFF);
    if let Ok(img) = decode_rgb8(&garbled, DEFAULT_MAX_PIXELS) {
        assert_eq!(img.dimensions(), (449, 300));
    }
    for cut in [3, 20, 200, good.len() / 3] {
        match decode_rgb8(&good[..cut], DEFAULT_MAX_PIXELS) {
            Ok(img) => assert_eq!(img.dimensions(), (449, 300), "cut at {cut}"),
            Err(e) => assert!(
                matches!(e.kind(), "decode_failed" | "not_an_image"),
                "cut at {cut}: {e}"
            ),
        }
    }
    // A JPEG signature followed by a broken marker segment: libjpeg's fatal path.
    let bad = [0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x02, 0xFF, 0xD9];
    let e = decode_rgb8(&bad, DEFAULT_MAX_PIXELS).unwrap_err();
    assert_eq!(e.kind(), "decode_failed", "{e}");
}
