//! Preprocessing benchmark: the time of each step of [`diracnet::preprocess`] on one image —
//! decoding, `Scale(256)` + `CenterCrop(224)`, normalisation — each on one thread, then of
//! `preprocess` itself, the server's path (which decodes a JPEG on one thread while a second
//! resizes the rows already decoded). Medians of many runs.
//!
//! ```sh
//! cargo run --release --example preprocess                          # tests/fixtures/images/chelsea.jpg
//! cargo run --release --example preprocess -- --image my.jpg --seconds 3
//! ```

use std::{
    hint::black_box,
    path::PathBuf,
    time::{Duration, Instant},
};

use diracnet::preprocess::{self, DEFAULT_MAX_PIXELS};

/// Median milliseconds of `f` over `seconds` (at least 20 runs).
fn time<T>(seconds: f64, mut f: impl FnMut() -> T) -> f64 {
    black_box(f());
    let mut runs = Vec::new();
    let start = Instant::now();
    while runs.len() < 20 || start.elapsed() < Duration::from_secs_f64(seconds) {
        let t = Instant::now();
        black_box(f());
        runs.push(t.elapsed().as_secs_f64() * 1e3);
    }
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

fn main() {
    diracnet::memory::keep_freed_buffers(); // as `diracnet serve` does
    let mut image = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/images/chelsea.jpg"
    ));
    let mut seconds = 2.0;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--image" => image = PathBuf::from(value),
            "--seconds" => seconds = value.parse().expect("--seconds S"),
            other => panic!("unknown flag {other}; see the doc comment of bench/preprocess.rs"),
        }
    }
    let bytes = std::fs::read(&image).expect("--image file");
    let rgb = preprocess::decode_rgb8(&bytes, DEFAULT_MAX_PIXELS).expect("a decodable image");
    let crop = preprocess::resize_crop(&rgb);
    println!(
        "{} ({}x{}, {} bytes), median over {seconds} s per line:",
        image.display(),
        rgb.width(),
        rgb.height(),
        bytes.len()
    );
    let decode = time(seconds, || {
        preprocess::decode_rgb8(&bytes, DEFAULT_MAX_PIXELS).map(|i| i.len())
    });
    let resize = time(seconds, || preprocess::resize_crop(&rgb));
    let normalize = time(seconds, || preprocess::normalize(&crop));
    let all = time(seconds, || {
        preprocess::preprocess(&bytes, DEFAULT_MAX_PIXELS).map(|v| v.len())
    });
    println!("decode       {decode:7.3} ms");
    println!("resize+crop  {resize:7.3} ms");
    println!("normalize    {normalize:7.3} ms");
    println!("preprocess   {all:7.3} ms (all three, as the server runs them)");
}
