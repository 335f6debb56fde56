//! `diracnet bench`: the model's raw throughput on random input (no HTTP, no preprocessing),
//! with the peak resident memory.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use diracnet::{
    classifier::Classifier,
    device,
    memory::peak_rss_mib,
    model::{profile, Architecture, DiracNet},
    registry::{ModelSpec, Registry},
    tensor::{INPUT_CHANNELS, INPUT_SIZE},
};

use super::ModelArgs;

/// `diracnet bench` flags.
#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    models: ModelArgs,
    /// Images per forward pass.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    batch: u32,
    /// Seconds to measure (at least 5 iterations run).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 2)]
    warmup: u32,
    /// Print one JSON line.
    #[arg(long)]
    json: bool,
    /// Also time each layer of the timed passes: milliseconds and share of a pass per op (the
    /// CPU only: a GPU runs its kernels asynchronously).
    #[arg(long)]
    profile: bool,
}

/// Times forward passes of `--batch` random images; prints the median img/s.
pub async fn run(args: &BenchArgs) -> Result<()> {
    let backend = args.models.backend()?;
    let device = backend.device().clone();
    let Some(name) = args.models.models.first() else {
        bail!("--model is required");
    };
    let model = match name.strip_prefix("random:") {
        Some(depth) => {
            let depth: usize = depth.parse().context("random:DEPTH needs 18 or 34")?;
            let arch =
                Architecture::imagenet(depth, 1000).context("random:DEPTH needs 18 or 34")?;
            let tensors = arch
                .random_weights(42)
                .into_iter()
                .map(|(k, t)| Ok((k, Tensor::from_vec(t.data, t.shape, &Device::Cpu)?)))
                .collect::<Result<_>>()?;
            DiracNet::from_tensors(&tensors, &backend)?
        }
        None => {
            let spec = ModelSpec::parse(name, &Registry::builtin()?)?;
            Classifier::load(&spec, &args.models.weights_options(), &backend)
                .await?
                .model
        }
    };
    if args.profile && !device.is_cpu() {
        bail!("--profile times the CPU's layers; a GPU runs its kernels asynchronously");
    }
    let b = args.batch as usize;
    let x = Tensor::randn(
        0f32,
        1.0,
        (b, INPUT_CHANNELS, INPUT_SIZE, INPUT_SIZE),
        &device,
    )?;
    for _ in 0..args.warmup {
        model.forward(&x)?.to_device(&Device::Cpu)?;
    }
    let mut rates = Vec::new();
    if args.profile {
        profile::start();
    }
    let started = Instant::now();
    while rates.len() < 5 || started.elapsed().as_secs_f64() < args.seconds {
        let t = Instant::now();
        model.forward(&x)?.to_device(&Device::Cpu)?;
        rates.push(b as f64 / t.elapsed().as_secs_f64());
    }
    let ops = if args.profile {
        profile::stop()
    } else {
        Vec::new()
    };
    let passes = rates.len() as f64;
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    let per_pass: f64 = ops.iter().map(|op| op.total.as_secs_f64()).sum::<f64>() / passes;
    let profile: Vec<_> = ops
        .iter()
        .map(|op| {
            let ms = op.total.as_secs_f64() * 1e3 / passes;
            serde_json::json!({
                "op": op.name,
                "calls_per_pass": op.calls as f64 / passes,
                "ms_per_pass": ms,
                "share": ms / (per_pass * 1e3),
            })
        })
        .collect();
    let mut report = serde_json::json!({
        "model": name,
        "batch": b,
        "threads": rayon::current_num_threads(),
        "device": device::describe(&device),
        "conv_impl": backend.conv_description(),
        "isa": backend.isa(),
        "dtype": backend.dtype_name(),
        "img_per_s_median": median,
        "img_per_s_min": rates[0],
        "img_per_s_max": rates[rates.len() - 1],
        "iterations": rates.len(),
        "peak_rss_mib": peak_rss_mib(),
    });
    if args.profile {
        report["profile"] = profile.clone().into();
    }
    if args.json {
        println!("{report}");
    } else {
        println!(
            "{name} batch {b}: {median:.1} img/s median ({:.1}–{:.1}), {:.1} ms per batch, {} iterations, peak RSS {} MiB",
            rates[0],
            rates[rates.len() - 1],
            1000.0 * b as f64 / median,
            rates.len(),
            report["peak_rss_mib"]
        );
        if args.profile {
            println!("{:>9} {:>6} {:>6}  op", "ms/pass", "share", "calls");
            for op in &profile {
                println!(
                    "{:>9.3} {:>5.1}% {:>6}  {}",
                    op["ms_per_pass"].as_f64().unwrap_or(0.0),
                    100.0 * op["share"].as_f64().unwrap_or(0.0),
                    op["calls_per_pass"],
                    op["op"].as_str().unwrap_or_default()
                );
            }
            println!(
                "{:>9.3} ms per pass in these ops (means; a pass's median: {:.3} ms)",
                per_pass * 1e3,
                1e3 * b as f64 / median
            );
        }
    }
    Ok(())
}
