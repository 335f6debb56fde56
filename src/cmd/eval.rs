//! `diracnet eval`: top-1 / top-5 accuracy of each model on a labelled folder of images, to
//! check the published figures yourself. Streams ([`diracnet::stream`]): memory stays flat
//! over any number of images, and an image that cannot be read is counted, not fatal.

use std::{
    fs::File,
    io::{BufWriter, IsTerminal, Write},
    path::PathBuf,
    time::Instant,
};

use anyhow::{bail, Context, Result};
use clap::Args;
use diracnet::{
    classifier::Classifier,
    eval::{self, Samples, Tally},
    prediction::Prediction,
    preprocess::DEFAULT_MAX_PIXELS,
    stream::{self, Stream},
};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::{output::Stdout, ModelArgs};

/// `diracnet eval` flags.
#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    models: ModelArgs,
    /// Images per forward pass.
    #[arg(long, env = "DIRACNET_BATCH", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    batch: u32,
    /// Evaluate only this many images, spread evenly over the set (every class of a
    /// class-ordered folder still takes part).
    #[arg(long, env = "DIRACNET_LIMIT")]
    limit: Option<usize>,
    /// Ground truth for a flat folder, in the format of ImageNet's `LOC_val_solution.csv`
    /// (`ImageId,PredictionString`; the class is the first word of PredictionString; the
    /// image is `ImageId.<ext>` in DIR). Without it, DIR is an ImageFolder tree.
    #[arg(long, env = "DIRACNET_GROUND_TRUTH")]
    ground_truth: Option<PathBuf>,
    /// Write one JSON line per image here: path, target, its rank, the top 5 (or the error).
    #[arg(long, env = "DIRACNET_PREDICTIONS")]
    predictions: Option<PathBuf>,
    /// Print one JSON object per model instead of text.
    #[arg(long)]
    json: bool,
    /// Refuse images with more pixels than this (decompression bombs).
    #[arg(long, env = "DIRACNET_MAX_PIXELS", default_value_t = DEFAULT_MAX_PIXELS)]
    max_pixels: u64,
    /// The images: one folder per class, named by its WordNet id (`n01440764`, ImageNet
    /// models) or class index (`0`, `1`, ...), or a flat folder with --ground-truth.
    dir: PathBuf,
}

/// The JSON summary of one model's run (`--json`).
#[derive(Serialize)]
struct Summary {
    model: String,
    images: usize,
    failed: usize,
    top1: f64,
    top5: f64,
    top1_error: f64,
    top5_error: f64,
    img_per_s: f64,
    seconds: f64,
    /// Ground-truth rows without an image, images without a row (`--ground-truth`).
    #[serde(skip_serializing_if = "Option::is_none")]
    missing: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unlisted: Option<usize>,
    /// The authors' figures, as fractions like the others, where the registry has them.
    published_top1_error: Option<f64>,
    published_top5_error: Option<f64>,
}

/// One line of `--predictions`.
#[derive(Serialize)]
struct PredictionLine<'a> {
    model: &'a str,
    path: &'a str,
    target: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    target_label: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rank: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top5: Option<Vec<Prediction>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

/// Evaluates each `--model` on DIR in turn.
pub async fn run(args: &EvalArgs) -> Result<()> {
    if !args.dir.is_dir() {
        bail!("{} is not a folder", args.dir.display());
    }
    let backend = args.models.backend()?;
    let opts = args.models.weights_options();
    let mut out = Stdout::new();
    // One file for every model's lines (each names its model).
    let mut predictions = match &args.predictions {
        Some(path) => Some(BufWriter::new(
            File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => None,
    };
    super::warn_without_jpeg_simd();
    for spec in args.models.specs()? {
        let clf = super::load_model(&spec, &opts, &backend).await?;
        let samples = samples(args, &clf)?;
        let summary =
            tokio::task::block_in_place(|| evaluate(args, &clf, samples, predictions.as_mut()))?;
        if args.json {
            out.line(serde_json::to_string(&summary)?)?;
        } else {
            print_summary(&mut out, &summary)?;
        }
    }
    if let Some(mut w) = predictions {
        w.flush().context("writing --predictions")?;
    }
    out.flush()
}

/// The images and their classes, as the flags say, cut to `--limit`.
fn samples(args: &EvalArgs, clf: &Classifier) -> Result<Samples> {
    let (labels, classes) = (clf.labels.as_ref(), clf.classes());
    let samples = match &args.ground_truth {
        Some(csv) => eval::with_ground_truth(&args.dir, csv, labels, classes)?,
        None => eval::image_folder(&args.dir, labels, classes)?,
    };
    if samples.entries.is_empty() {
        bail!("no images found under {}", args.dir.display());
    }
    Ok(match args.limit {
        Some(limit) => eval::spread(samples, limit.max(1)),
        None => samples,
    })
}

/// Runs `clf` over `samples`, counting; writes `--predictions` lines to `predictions` as it
/// goes.
fn evaluate(
    args: &EvalArgs,
    clf: &Classifier,
    samples: Samples,
    mut predictions: Option<&mut BufWriter<File>>,
) -> Result<Summary> {
    let total = samples.entries.len();
    let (missing, unlisted) = (samples.missing, samples.unlisted);
    let targets = samples.targets;
    let batch = args.batch as usize;
    let progress = progress_bar(total as u64);
    let stream = Stream::start(
        samples.entries,
        stream::Options::for_batches(batch, args.max_pixels),
    )
    .context("starting the preprocessing threads")?;
    let mut tally = Tally::default();
    let started = Instant::now();
    for chunk in stream {
        let good = stream::images(&chunk);
        let logits = clf.logits_in_batches(&good, batch)?;
        let mut logits = logits.iter();
        for row in &chunk {
            let target = targets[row.entry];
            let line = match &row.image {
                Ok(_) => {
                    let Some(l) = logits.next() else {
                        bail!("the model returned fewer rows than images");
                    };
                    let rank = tally.add(l, target);
                    PredictionLine {
                        model: &clf.name,
                        path: &row.name,
                        target,
                        target_label: clf.labels.as_ref().and_then(|ls| ls.get(target)),
                        rank: Some(rank),
                        top5: Some(clf.predictions(l, 5)),
                        error: None,
                    }
                }
                Err(e) => {
                    tally.failed += 1;
                    tracing::warn!(path = %row.name, error = %e, "image skipped");
                    PredictionLine {
                        model: &clf.name,
                        path: &row.name,
                        target,
                        target_label: None,
                        rank: None,
                        top5: None,
                        error: Some(e),
                    }
                }
            };
            if let Some(w) = predictions.as_mut() {
                serde_json::to_writer(&mut *w, &line)?;
                w.write_all(b"\n")?;
            }
        }
        if let Some(bar) = &progress {
            bar.inc(chunk.len() as u64);
            bar.set_message(format!(
                "top-1 {:.2} %, top-5 {:.2} %",
                100.0 * tally.top1_accuracy(),
                100.0 * tally.top5_accuracy()
            ));
        }
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let seconds = started.elapsed().as_secs_f64();
    let (top1, top5) = (tally.top1_accuracy(), tally.top5_accuracy());
    Ok(Summary {
        model: clf.name.clone(),
        images: tally.images,
        failed: tally.failed,
        top1,
        top5,
        top1_error: 1.0 - top1,
        top5_error: 1.0 - top5,
        img_per_s: tally.images as f64 / seconds.max(1e-9),
        seconds,
        missing: args.ground_truth.as_ref().map(|_| missing),
        unlisted: args.ground_truth.as_ref().map(|_| unlisted),
        published_top1_error: clf.published.map(|p| p.top1_error / 100.0),
        published_top5_error: clf.published.map(|p| p.top5_error / 100.0),
    })
}

/// A bar on stderr when it is a terminal.
fn progress_bar(total: u64) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} images, {per_sec}, eta {eta} {msg}")
    {
        bar.set_style(style);
    }
    Some(bar)
}

fn print_summary(out: &mut Stdout, s: &Summary) -> Result<()> {
    let published = |p: Option<f64>| match p {
        Some(p) => format!(" (published: {:.2} %)", 100.0 * p),
        None => String::new(),
    };
    out.line(format!(
        "{}: {} images ({} failed) in {:.1} s, {:.1} img/s",
        s.model, s.images, s.failed, s.seconds, s.img_per_s
    ))?;
    out.line(format!(
        "  top-1 accuracy {:6.2} %, error {:6.2} %{}",
        100.0 * s.top1,
        100.0 * s.top1_error,
        published(s.published_top1_error)
    ))?;
    out.line(format!(
        "  top-5 accuracy {:6.2} %, error {:6.2} %{}",
        100.0 * s.top5,
        100.0 * s.top5_error,
        published(s.published_top5_error)
    ))?;
    if let (Some(missing), Some(unlisted)) = (s.missing, s.unlisted) {
        if missing + unlisted > 0 {
            out.line(format!(
                "  ground truth: {missing} listed images not found, {unlisted} images not listed"
            ))?;
        }
    }
    Ok(())
}
