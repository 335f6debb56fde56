//! `diracnet classify`: images, or preprocessed `.npy` tensors, through each model; a table or
//! JSON on stdout.

use std::{path::PathBuf, time::Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use diracnet::{
    classifier::Classifier,
    device, npy,
    prediction::Prediction,
    preprocess::{self, DEFAULT_MAX_PIXELS},
};
use serde::Serialize;

use super::ModelArgs;

/// Images per forward pass: the throughput knee on the CPU; it bounds memory for long lists.
const BATCH: usize = 8;

/// `diracnet classify` flags.
#[derive(Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    models: ModelArgs,
    /// How many classes to report per image.
    #[arg(long, short = 'k', env = "DIRACNET_TOP_K", default_value_t = 5)]
    top_k: usize,
    /// Print one JSON array instead of a table.
    #[arg(long)]
    json: bool,
    /// Include the raw logits (JSON output).
    #[arg(long)]
    logits: bool,
    /// Refuse images with more pixels than this (decompression bombs).
    #[arg(long, env = "DIRACNET_MAX_PIXELS", default_value_t = DEFAULT_MAX_PIXELS)]
    max_pixels: u64,
    /// Images or `.npy` files.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

/// One line of the answer.
#[derive(Serialize)]
struct ClassifyResult {
    input: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    predictions: Vec<Prediction>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logits: Option<Vec<f32>>,
}

/// Reads every input (a bad one fails before any download), then runs each model over them.
pub async fn run(args: &ClassifyArgs) -> Result<()> {
    if args.top_k == 0 {
        bail!("--top-k must be at least 1");
    }
    let specs = args.models.specs()?;
    let backend = args.models.backend()?;
    let opts = args.models.weights_options();

    // Inputs first: a bad image fails fast, before any download.
    let mut rows: Vec<(String, Vec<f32>)> = Vec::new();
    for path in &args.inputs {
        let name = path.display().to_string();
        if path.extension().and_then(|e| e.to_str()) == Some("npy") {
            let batch = npy::read_inputs(path)?;
            for (i, row) in batch.input_rows().into_iter().flatten().enumerate() {
                rows.push((format!("{name}[{i}]"), row.to_vec()));
            }
        } else {
            let bytes = std::fs::read(path).with_context(|| format!("reading {name}"))?;
            let x =
                preprocess::preprocess(&bytes, args.max_pixels).with_context(|| name.clone())?;
            rows.push((name, x));
        }
    }

    let multi = specs.len() > 1;
    let mut results = Vec::new();
    for spec in &specs {
        let started = Instant::now();
        let clf = Classifier::load(spec, &opts, &backend)
            .await
            .with_context(|| format!("model {}", spec.name))?;
        tracing::info!(
            model = %clf.name,
            device = %device::describe(backend.device()),
            conv = %backend.conv_description(),
            dtype = backend.dtype_name(),
            seconds = started.elapsed().as_secs_f64(),
            "model loaded"
        );
        let k = args.top_k.min(clf.classes());
        let started = Instant::now();
        let images: Vec<&[f32]> = rows.iter().map(|(_, x)| x.as_slice()).collect();
        let logits = clf.logits_in_batches(&images, BATCH)?;
        tracing::info!(
            images = images.len(),
            seconds = started.elapsed().as_secs_f64(),
            "classified"
        );
        for ((input, _), l) in rows.iter().zip(logits) {
            results.push(ClassifyResult {
                input: input.clone(),
                model: multi.then(|| clf.name.clone()),
                predictions: clf.predictions(&l, k),
                logits: args.logits.then_some(l),
            });
        }
    }

    if args.json {
        println!("{}", serde_json::to_string(&results)?);
    } else {
        for r in &results {
            match &r.model {
                Some(m) => println!("{} ({m})", r.input),
                None => println!("{}", r.input),
            }
            for p in &r.predictions {
                println!(
                    "  {:>6.2}%  {:>4}  {}",
                    100.0 * p.score,
                    p.index,
                    p.label.as_deref().unwrap_or("-")
                );
            }
        }
    }
    Ok(())
}
