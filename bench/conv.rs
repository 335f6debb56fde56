//! Per-layer conv benchmark: each 3×3 layer shape of DiracNet-18/34, at several batch sizes,
//! through each fast-path implementation — Winograd F(4×4, 3×3) and the direct (im2col +
//! GEMM) conv — on the kernel set `--cpu-isa` allows. Median milliseconds of many runs, and
//! the rate in GFLOP/s of direct-conv arithmetic (2·9·c_in·c_out per output pixel), so the two
//! columns compare like for like. Before each run the caches are flushed (`--warm` keeps
//! them), as the other layers of a forward pass flush a layer's weights. The per-layer
//! picture behind the choice in `src/model/cpu/mod.rs`
//! ([`diracnet::model::cpu::Conv3x3::direct_wins`]), which whole passes settled.
//!
//! ```sh
//! cargo run --release --example conv                               # batches 1, 8, 32
//! cargo run --release --example conv -- --batches 1,2,4 --seconds 1 --cpu-isa avx2 --warm
//! cargo run --release --example conv -- --cpu-isa avx512   # bf16 on AVX512-BF16, AMX left out
//! ```

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use candle_core::{Device, Tensor};
use diracnet::model::cpu::{
    bf16::{avx512_bf16, Kernel},
    DirectConv, DirectConvBf16, Isa, WinogradConv,
};

/// Median milliseconds of `f` over `seconds` (at least 10 runs), each run after `flush`
/// (untimed) when one is given.
fn time<T>(seconds: f64, flush: Option<&[f32]>, mut f: impl FnMut() -> T) -> f64 {
    black_box(f());
    let mut runs = Vec::new();
    let start = Instant::now();
    while runs.len() < 10 || start.elapsed() < Duration::from_secs_f64(seconds) {
        if let Some(buf) = flush {
            // Evict the layer's weights from every cache, as the other layers of a forward
            // pass do: read a buffer larger than the last-level cache.
            black_box(buf.iter().step_by(16).sum::<f32>());
        }
        let t = Instant::now();
        black_box(f());
        runs.push(t.elapsed().as_secs_f64() * 1e3);
    }
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

/// 256 MiB: larger than any last-level cache the benchmark runs on.
const FLUSH_FLOATS: usize = 64 << 20;

fn values(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| (((i as u32 ^ seed).wrapping_mul(2654435761) >> 8) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

fn main() {
    let mut batches = vec![1, 8, 32];
    let mut seconds = 0.5;
    let mut warm = false;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--batches" => {
                batches = value()
                    .split(',')
                    .map(|b| b.parse().expect("--batches: numbers, comma-separated"))
                    .collect()
            }
            "--seconds" => seconds = value().parse().expect("--seconds: a number"),
            "--warm" => warm = true,
            "--cpu-isa" => {
                let isa = Isa::from_name(&value()).expect("--cpu-isa: avx512, avx2 or portable");
                Isa::limit(isa);
            }
            other => panic!("unknown argument {other} (--batches, --seconds, --warm, --cpu-isa)"),
        }
    }
    println!(
        "kernels: {} (bf16: {}), threads: {}, caches: {}",
        Isa::detect().name(),
        Kernel::detect().name(),
        rayon::current_num_threads(),
        if warm {
            "warm (weights cached between runs)"
        } else {
            "cold (flushed before each run, as in a forward pass)"
        }
    );
    // bf16 columns where the CPU runs the bf16 kernel (`--dtype bf16`).
    let bf16 = avx512_bf16() && Isa::detect() == Isa::Avx512;
    print!(
        "{:>5} {:>5} {:>5} {:>4} | {:>9} {:>7} | {:>9} {:>7} | faster",
        "side", "c_in", "c_out", "n", "wino ms", "GFLOP/s", "direct ms", "GFLOP/s"
    );
    if bf16 {
        print!(
            "   | {:>9} {:>7} | {:>9} {:>7} | faster in bf16",
            "wino16 ms", "GFLOP/s", "dir16 ms", "GFLOP/s"
        );
    }
    println!();
    // (side, c_in, c_out): every distinct 3×3 layer of DiracNet-18 and -34.
    let shapes = [
        (56, 64, 64),
        (28, 64, 128),
        (28, 128, 128),
        (14, 128, 256),
        (14, 256, 256),
        (7, 256, 512),
        (7, 512, 512),
    ];
    for (side, ci, co) in shapes {
        let w = values(co * ci * 9, 1);
        let b = values(co, 2);
        let wino = WinogradConv::new(&w, &b, co, ci);
        let direct = DirectConv::new(&w, &b, co, ci);
        let bf16s = bf16.then(|| (wino.clone().bf16(), DirectConvBf16::new(&w, &b, co, ci)));
        for &n in &batches {
            let x = Tensor::from_vec(
                values(n * side * side * ci, 3),
                (n, side, side, ci),
                &Device::Cpu,
            )
            .expect("input tensor");
            let flush = (!warm).then(|| vec![1f32; FLUSH_FLOATS]);
            let tw = time(seconds, flush.as_deref(), || {
                x.apply_op1_no_bwd(&wino).expect("winograd")
            });
            let td = time(seconds, flush.as_deref(), || {
                x.apply_op1_no_bwd(&direct).expect("direct")
            });
            let gflop = 2.0 * 9.0 * (ci * co * side * side * n) as f64 / 1e9;
            print!(
                "{side:>5} {ci:>5} {co:>5} {n:>4} | {tw:>9.3} {:>7.0} | {td:>9.3} {:>7.0} | {:<8}",
                gflop / tw * 1e3,
                gflop / td * 1e3,
                if td < tw { "direct" } else { "winograd" }
            );
            if let Some((wino16, direct16)) = &bf16s {
                let tw = time(seconds, flush.as_deref(), || {
                    x.apply_op1_no_bwd(wino16).expect("winograd bf16")
                });
                let td = time(seconds, flush.as_deref(), || {
                    x.apply_op1_no_bwd(direct16).expect("direct bf16")
                });
                print!(
                    " | {tw:>9.3} {:>7.0} | {td:>9.3} {:>7.0} | {}",
                    gflop / tw * 1e3,
                    gflop / td * 1e3,
                    if td < tw { "direct" } else { "winograd" }
                );
            }
            println!();
        }
    }
}
