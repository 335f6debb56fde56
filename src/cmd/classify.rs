//! `diracnet classify`: images, folders of images, or `.npy` arrays through each model; a
//! table, JSON, JSON lines or CSV on stdout, streamed as batches finish
//! ([`diracnet::stream`]: memory stays flat over any number of files). A file that fails gives
//! a row with its error and the run goes on; the exit status says whether any failed.

use std::{io::IsTerminal, path::PathBuf, time::Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use diracnet::{
    classifier::Classifier,
    prediction::Prediction,
    preprocess::DEFAULT_MAX_PIXELS,
    stream::{self, Row, Stream},
};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::{output::Stdout, ModelArgs};

/// `diracnet classify` flags.
#[derive(Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    models: ModelArgs,
    /// How many classes to report per image.
    #[arg(long, short = 'k', env = "DIRACNET_TOP_K", default_value_t = 5)]
    top_k: usize,
    /// Output: `table` (for people), `json` (one array), `jsonl` (one object per line, as
    /// results come), `csv` (one row per class reported).
    #[arg(long, env = "DIRACNET_FORMAT", value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Same as `--format json`.
    #[arg(long, conflicts_with = "format")]
    json: bool,
    /// Include the raw logits (`json` and `jsonl`).
    #[arg(long)]
    logits: bool,
    /// Images per forward pass.
    #[arg(long, env = "DIRACNET_BATCH", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    batch: u32,
    /// Refuse images with more pixels than this (decompression bombs).
    #[arg(long, env = "DIRACNET_MAX_PIXELS", default_value_t = DEFAULT_MAX_PIXELS)]
    max_pixels: u64,
    /// Images, folders (walked recursively for image files: jpg, jpeg, png, bmp, webp, gif,
    /// tif, tiff), or `.npy` arrays: float32/float64 `[N, 3, 224, 224]` preprocessed inputs,
    /// or uint8 RGB pixels `[H, W, 3]` / `[N, H, W, 3]`.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

/// `--format`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
    Jsonl,
    Csv,
}

/// One answer: an input's predictions by one model, or why there are none.
#[derive(Serialize)]
struct ClassifyResult<'a> {
    input: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    predictions: Option<Vec<Prediction>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logits: Option<&'a [f32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

/// Loads every model, then streams the inputs through them all.
pub async fn run(args: &ClassifyArgs) -> Result<()> {
    let format = if args.json { Format::Json } else { args.format };
    if args.top_k == 0 {
        bail!("--top-k must be at least 1");
    }
    if args.logits && !matches!(format, Format::Json | Format::Jsonl) {
        bail!("--logits needs --format json or jsonl");
    }
    let entries = stream::walk(&args.inputs);
    super::warn_without_jpeg_simd();
    if entries.is_empty() {
        bail!("no image files found in the inputs");
    }
    // A typo fails now, before any download; other bad inputs become rows.
    if entries.iter().all(|e| !e.path.exists()) {
        bail!("no such file: {}", entries[0].path.display());
    }
    let specs = args.models.specs()?;
    let backend = args.models.backend()?;
    let opts = args.models.weights_options();
    let mut models = Vec::new();
    for spec in &specs {
        models.push(super::load_model(spec, &opts, &backend).await?);
    }
    tokio::task::block_in_place(|| classify(args, format, &models, entries))
}

/// Runs the stream through `models`, writing as each chunk finishes.
fn classify(
    args: &ClassifyArgs,
    format: Format,
    models: &[Classifier],
    entries: Vec<stream::Entry>,
) -> Result<()> {
    let total = entries.len();
    let progress = progress_bar(total as u64);
    let stream = Stream::start(
        entries,
        stream::Options::for_batches(args.batch as usize, args.max_pixels),
    )
    .context("starting the preprocessing threads")?;
    let mut out = Writer::new(format, progress.clone());
    let (mut images, mut failed) = (0usize, 0usize);
    let started = Instant::now();
    for chunk in stream {
        let good = stream::images(&chunk);
        let mut logits = Vec::with_capacity(models.len());
        for clf in models {
            // In passes of `--batch` (a `.npy` may bring many images in one input).
            logits.push(clf.logits_in_batches(&good, args.batch as usize)?);
        }
        let mut next = 0;
        for row in &chunk {
            images += 1;
            match &row.image {
                Ok(_) => {
                    for (clf, rows) in models.iter().zip(&logits) {
                        let l = &rows[next];
                        let k = args.top_k.min(clf.classes());
                        out.result(
                            row,
                            (models.len() > 1).then_some(clf.name.as_str()),
                            Ok((clf.predictions(l, k), args.logits.then_some(l.as_slice()))),
                        )?;
                    }
                    next += 1;
                }
                Err(e) => {
                    failed += 1;
                    tracing::warn!(input = %row.name, error = %e, "input skipped");
                    out.result(row, None, Err(e))?;
                }
            }
        }
        if let (Some(bar), Some(last)) = (&progress, chunk.last()) {
            bar.set_position(last.entry as u64 + 1);
        }
    }
    if let Some(bar) = &progress {
        bar.finish_and_clear();
    }
    out.finish()?;
    tracing::info!(
        images,
        failed,
        seconds = started.elapsed().as_secs_f64(),
        "classified"
    );
    if failed > 0 {
        bail!("{failed} of {images} inputs failed (see their rows)");
    }
    Ok(())
}

/// A bar on stderr when it is a terminal.
fn progress_bar(total: u64) -> Option<ProgressBar> {
    if total < 2 || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} inputs, eta {eta}") {
        bar.set_style(style);
    }
    Some(bar)
}

/// The chosen format, written a result at a time.
struct Writer {
    format: Format,
    out: Stdout,
    /// Results written so far (for the JSON array's commas).
    written: usize,
    /// Lines go out through the bar's `suspend`, so that they do not tear it.
    bar: Option<ProgressBar>,
}

impl Writer {
    fn new(format: Format, bar: Option<ProgressBar>) -> Self {
        Self {
            format,
            out: Stdout::new(),
            written: 0,
            bar,
        }
    }

    fn emit(&mut self, text: String) -> Result<()> {
        match &self.bar {
            Some(bar) => bar.suspend(|| self.out.line(text)),
            None => self.out.line(text),
        }
    }

    /// One input's answer from one model (`model` named when there are several), or its error.
    fn result(
        &mut self,
        row: &Row,
        model: Option<&str>,
        answer: Result<(Vec<Prediction>, Option<&[f32]>), &String>,
    ) -> Result<()> {
        let (predictions, logits, error) = match answer {
            Ok((p, l)) => (Some(p), l, None),
            Err(e) => (None, None, Some(e.as_str())),
        };
        let result = ClassifyResult {
            input: &row.name,
            model,
            predictions,
            logits,
            error,
        };
        match self.format {
            Format::Jsonl => self.emit(serde_json::to_string(&result)?)?,
            // One array on one line, as the results come: `[a` `,b` ... `]`.
            Format::Json => {
                let sep = if self.written == 0 { "[" } else { "," };
                let text = format!("{sep}{}", serde_json::to_string(&result)?);
                match &self.bar {
                    Some(bar) => bar.suspend(|| self.out.write(&text))?,
                    None => self.out.write(&text)?,
                }
            }
            Format::Csv => {
                if self.written == 0 {
                    self.emit("input,model,rank,index,label,score,error".into())?;
                }
                let (input, model) = (csv_field(result.input), csv_field(model.unwrap_or("")));
                match (&result.predictions, result.error) {
                    (Some(predictions), _) => {
                        for (rank, p) in predictions.iter().enumerate() {
                            self.emit(format!(
                                "{input},{model},{},{},{},{},",
                                rank + 1,
                                p.index,
                                csv_field(p.label.as_deref().unwrap_or("")),
                                p.score
                            ))?;
                        }
                    }
                    (None, error) => {
                        self.emit(format!(
                            "{input},{model},,,,,{}",
                            csv_field(error.unwrap_or(""))
                        ))?;
                    }
                }
            }
            Format::Table => {
                let head = match model {
                    Some(m) => format!("{} ({m})", row.name),
                    None => row.name.clone(),
                };
                match (&result.predictions, result.error) {
                    (Some(predictions), _) => {
                        let mut text = head;
                        for p in predictions {
                            text.push_str(&format!(
                                "\n  {:>6.2}%  {:>4}  {}",
                                100.0 * p.score,
                                p.index,
                                p.label.as_deref().unwrap_or("-")
                            ));
                        }
                        self.emit(text)?;
                    }
                    (None, error) => {
                        self.emit(format!("{head}\n  error: {}", error.unwrap_or("")))?;
                    }
                }
            }
        }
        self.written += 1;
        Ok(())
    }

    /// Closes the JSON array, flushes.
    fn finish(&mut self) -> Result<()> {
        if self.format == Format::Json {
            let close = if self.written == 0 { "[]" } else { "]" };
            self.out.line(close)?;
        }
        self.out.flush()
    }
}

/// A CSV field (RFC 4180): quoted when it holds a comma, a quote or a line break; quotes
/// doubled.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
