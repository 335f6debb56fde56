//! `diracnet` — the command-line edge: parses flags (each with a `DIRACNET_*` env twin), sets up
//! logging, and calls the library. Errors become one clear message and exit code 1.

use std::{
    io::IsTerminal,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Args, Parser, Subcommand, ValueEnum};
use diracnet::{
    classify::{Classifier, Prediction},
    device::{self, DeviceSpec},
    model::{Architecture, Backend, ConvImpl, DiracNet, Precision, INPUT_SIZE},
    npy, preprocess,
    registry::{ModelSpec, Registry},
    server,
    weights::{self, cache, convert, WeightsOptions},
};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "diracnet",
    version,
    about = "Image classification with the pretrained folded DiracNets (Zagoruyko & Komodakis, 2017) on candle",
    after_help = "Examples:\n  diracnet serve --model diracnet18 --port 8080\n  diracnet classify cat.jpg\n  diracnet classify --model diracnet34 --top-k 3 --json a.jpg b.png\n  diracnet fetch --model diracnet18 --model diracnet34\n  diracnet convert diracnet18v2folded-a2174e15.pth dn18.safetensors\n  diracnet preprocess cat.jpg -o cat.npy\n\nEvery flag can also be set through the environment variable shown in its help."
)]
struct Cli {
    /// Log output format.
    #[arg(long, global = true, env = "DIRACNET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax, e.g. `info`, `diracnet=debug`).
    #[arg(long, global = true, env = "DIRACNET_LOG", default_value = "info")]
    log: String,

    /// CPU threads for inference [default: the available cores].
    #[arg(long, global = true, env = "DIRACNET_THREADS", value_parser = clap::value_parser!(u32).range(1..=1024))]
    threads: Option<u32>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve models over HTTP: /classify, KServe v2, health, metrics, OpenAPI (/docs).
    #[command(
        after_help = "Examples:\n  diracnet serve\n  diracnet serve --model diracnet18 --model diracnet34 --port 9000\n  DIRACNET_API_KEY=secret diracnet serve --max-batch-size 8 --max-batch-delay-ms 5\n  curl -T cat.jpg -H 'Content-Type: image/jpeg' localhost:8080/classify"
    )]
    Serve(Box<ServeArgs>),
    /// Download and convert models into the cache; print each safetensors path.
    #[command(
        after_help = "Examples:\n  diracnet fetch\n  diracnet fetch --model diracnet34 --cache-dir /data\n  diracnet fetch --model mine=./checkpoint.pth"
    )]
    Fetch {
        #[command(flatten)]
        models: ModelArgs,
    },
    /// Convert a `.pth` (zip or legacy; folded or unfolded) into folded safetensors.
    #[command(
        after_help = "Example:\n  diracnet convert diracnet18-v2_checkpoint.pth dn18.safetensors"
    )]
    Convert {
        /// Input `.pth` file.
        input: PathBuf,
        /// Output `.safetensors` file.
        output: PathBuf,
    },
    /// Preprocess an image exactly as the authors' evaluation did; write a float32 `.npy`
    /// of shape [1, 3, 224, 224].
    #[command(after_help = "Example:\n  diracnet preprocess cat.jpg -o cat.npy")]
    Preprocess {
        /// Image file (JPEG, PNG, BMP, WebP, GIF, TIFF).
        image: PathBuf,
        /// Output `.npy` file.
        #[arg(short, long)]
        output: PathBuf,
        /// Refuse images with more pixels than this (decompression bombs).
        #[arg(long, env = "DIRACNET_MAX_PIXELS", default_value_t = preprocess::DEFAULT_MAX_PIXELS)]
        max_pixels: u64,
    },
    /// Classify images, or preprocessed `.npy` tensors [N, 3, 224, 224].
    #[command(
        after_help = "Examples:\n  diracnet classify cat.jpg dog.png\n  diracnet classify --model diracnet34 --json --logits cat.jpg\n  diracnet classify --offline --cache-dir /data batch.npy"
    )]
    Classify {
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
        #[arg(long, env = "DIRACNET_MAX_PIXELS", default_value_t = preprocess::DEFAULT_MAX_PIXELS)]
        max_pixels: u64,
        /// Images or `.npy` files.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
    /// List the models of the built-in registry.
    Models,
    /// Measure the model's raw throughput on random input (no HTTP, no preprocessing).
    #[command(
        after_help = "Examples:\n  diracnet bench --model random:18 --batch 8 --json\n  diracnet bench --model diracnet34 --batch 1 --seconds 10\n\n`random:18` and `random:34` are DiracNet-18/34-shaped random weights (speed does not depend on\nthe values)."
    )]
    Bench(BenchArgs),
}

/// `diracnet serve` flags.
#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    models: ModelArgs,
    /// Address to bind (never read from HOSTNAME, which Docker sets to the container id).
    #[arg(long, env = "DIRACNET_HOST", default_value = "0.0.0.0")]
    host: String,
    /// Port to listen on.
    #[arg(long, env = "DIRACNET_PORT", default_value_t = 8080)]
    port: u16,
    /// Largest batch per forward pass.
    #[arg(long, env = "DIRACNET_MAX_BATCH_SIZE", default_value_t = server::defaults::MAX_BATCH_SIZE, value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_batch_size: u32,
    /// Longest wait for a batch to fill once the model is free, in milliseconds.
    #[arg(long, env = "DIRACNET_MAX_BATCH_DELAY_MS", default_value_t = server::defaults::MAX_BATCH_DELAY_MS)]
    max_batch_delay_ms: f64,
    /// Images that may wait per model; beyond, requests get 429.
    #[arg(long, env = "DIRACNET_MAX_QUEUE", default_value_t = server::defaults::MAX_QUEUE, value_parser = clap::value_parser!(u32).range(1..))]
    max_queue: u32,
    /// Deadline of a request, in milliseconds; one still queued then gets 503.
    #[arg(long, env = "DIRACNET_REQUEST_TIMEOUT_MS", default_value_t = server::defaults::REQUEST_TIMEOUT_MS)]
    request_timeout_ms: u64,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, env = "DIRACNET_MAX_BODY_BYTES", default_value_t = server::defaults::MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Refuse images with more pixels than this (413).
    #[arg(long, env = "DIRACNET_MAX_PIXELS", default_value_t = preprocess::DEFAULT_MAX_PIXELS)]
    max_pixels: u64,
    /// Allowed CORS origin (repeat, or `*`); none: no CORS headers.
    #[arg(
        long = "cors-origin",
        env = "DIRACNET_CORS_ORIGIN",
        value_delimiter = ','
    )]
    cors_origins: Vec<String>,
    /// Require `Authorization: Bearer <key>` on inference routes (health and metrics stay open).
    #[arg(long, env = "DIRACNET_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Longest drain after SIGTERM/SIGINT, in seconds (below Kubernetes' 30 s grace).
    #[arg(long, env = "DIRACNET_SHUTDOWN_TIMEOUT_S", default_value_t = server::defaults::SHUTDOWN_TIMEOUT_S)]
    shutdown_timeout_s: u64,
}

/// `diracnet bench` flags.
#[derive(Args)]
struct BenchArgs {
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
}

/// Options of every subcommand that loads a model.
#[derive(Args)]
struct ModelArgs {
    /// Model: registry name, http(s)/file URL, or .pth/.safetensors path; `NAME=SOURCE` to rename.
    /// Repeat for several.
    #[arg(
        long = "model",
        short = 'm',
        env = "DIRACNET_MODEL",
        value_delimiter = ',',
        default_value = "diracnet18"
    )]
    models: Vec<String>,
    /// Cache folder for downloads and converted weights
    /// [default: $XDG_CACHE_HOME/diracnet or ~/.cache/diracnet].
    #[arg(long, env = "DIRACNET_CACHE")]
    cache_dir: Option<PathBuf>,
    /// Never use the network; a model missing from the caches is an error.
    #[arg(long, env = "DIRACNET_OFFLINE", value_parser = clap::builder::BoolishValueParser::new())]
    offline: bool,
    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long, env = "DIRACNET_DEVICE", default_value = "auto")]
    device: DeviceSpec,
    /// Convolutions: `fast` (CPU: NHWC, packed weights, Winograd 3×3), `candle` (candle's
    /// conv2d, any device), or `auto` (fast on CPU, candle on CUDA).
    #[arg(long, env = "DIRACNET_CONV_IMPL", default_value = "auto")]
    conv_impl: ConvImpl,
    /// Compute dtype: auto (f16 on CUDA, f32 on CPU), f32, f16 or bf16. f16/bf16 need
    /// `--conv-impl candle` on the CPU.
    #[arg(long, env = "DIRACNET_DTYPE", default_value = "auto")]
    dtype: Precision,
}

impl ModelArgs {
    fn specs(&self) -> Result<Vec<ModelSpec>> {
        let registry = Registry::builtin()?;
        self.models
            .iter()
            .map(|m| Ok(ModelSpec::parse(m, &registry)?))
            .collect()
    }

    /// Opens the device and resolves the conv implementation and dtype for it.
    fn backend(&self) -> Result<Backend> {
        Ok(Backend::new(
            self.device.open()?,
            self.conv_impl,
            self.dtype,
        )?)
    }

    fn weights_options(&self) -> WeightsOptions {
        let root = self
            .cache_dir
            .clone()
            .unwrap_or_else(cache::default_cache_dir);
        WeightsOptions::new(root, self.offline, std::io::stderr().is_terminal())
    }
}

fn main() {
    diracnet::memory::keep_freed_buffers();
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log);
    init_threads(cli.threads);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(run(cli.command));
    // Do not wait on blocking work left running (e.g. a warm-up interrupted by SIGTERM).
    runtime.shutdown_timeout(Duration::from_millis(500));
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Sizes the CPU thread pool that runs the model (the fast path's ops and candle's).
fn init_threads(threads: Option<u32>) {
    let n = threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |n| n as usize,
    );
    // candle's own CPU ops size their work by RAYON_NUM_THREADS. Set here, in `main`, before
    // any other thread exists.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    if let Err(e) = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
    {
        tracing::warn!(error = %e, "could not size the thread pool");
    }
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve(args) => serve(*args).await,
        Command::Fetch { models } => fetch(&models).await,
        Command::Convert { input, output } => convert_cmd(&input, &output),
        Command::Preprocess {
            image,
            output,
            max_pixels,
        } => preprocess_cmd(&image, &output, max_pixels),
        Command::Classify {
            models,
            top_k,
            json,
            logits,
            max_pixels,
            inputs,
        } => classify_cmd(&models, top_k, json, logits, max_pixels, &inputs).await,
        Command::Models => list_models(),
        Command::Bench(args) => bench(&args).await,
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    if !(args.max_batch_delay_ms.is_finite() && args.max_batch_delay_ms >= 0.0) {
        bail!("--max-batch-delay-ms must be a non-negative number");
    }
    let config = server::ServeConfig {
        models: args.models.specs()?,
        weights: args.models.weights_options(),
        device: args.models.device,
        conv: args.models.conv_impl,
        precision: args.models.dtype,
        batch: server::batcher::BatchConfig {
            max_batch_size: args.max_batch_size as usize,
            max_batch_delay: Duration::from_secs_f64(args.max_batch_delay_ms / 1000.0),
            max_queue: args.max_queue as usize,
        },
        request_timeout: Duration::from_millis(args.request_timeout_ms),
        max_body_bytes: args.max_body_bytes,
        max_pixels: args.max_pixels,
        cors_origins: args.cors_origins,
        api_key: args.api_key.filter(|k| !k.is_empty()),
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout_s),
    };
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.host, args.port))?;
    server::run(config, listener, server::shutdown_signal()).await?;
    Ok(())
}

async fn fetch(args: &ModelArgs) -> Result<()> {
    let opts = args.weights_options();
    for spec in args.specs()? {
        let w = weights::resolve(&spec, &opts)
            .await
            .with_context(|| format!("model {}", spec.name))?;
        println!("{}\t{}", spec.name, w.path.display());
    }
    Ok(())
}

fn convert_cmd(input: &Path, output: &Path) -> Result<()> {
    let sha256 = weights::fetch::sha256_file(input)
        .with_context(|| format!("reading {}", input.display()))?;
    let provenance = convert::Provenance {
        source: input.display().to_string(),
        sha256,
    };
    let c = convert::convert_pth(input, output, &provenance)?;
    let a = &c.architecture;
    println!(
        "{}: {} {} checkpoint → {} (DiracNet-{}, widths {:?}, blocks {:?}, {} classes)",
        input.display(),
        c.container,
        c.layout,
        output.display(),
        a.depth(),
        a.widths,
        a.blocks,
        a.classes
    );
    Ok(())
}

fn preprocess_cmd(image: &Path, output: &Path, max_pixels: u64) -> Result<()> {
    let bytes = std::fs::read(image).with_context(|| format!("reading {}", image.display()))?;
    let x =
        preprocess::preprocess(&bytes, max_pixels).with_context(|| image.display().to_string())?;
    npy::write_f32(output, &[1, 3, INPUT_SIZE, INPUT_SIZE], &x)?;
    println!("{}", output.display());
    Ok(())
}

#[derive(Serialize)]
struct ClassifyResult {
    input: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    predictions: Vec<Prediction>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logits: Option<Vec<f32>>,
}

async fn classify_cmd(
    args: &ModelArgs,
    top_k: usize,
    json: bool,
    with_logits: bool,
    max_pixels: u64,
    inputs: &[PathBuf],
) -> Result<()> {
    if top_k == 0 {
        bail!("--top-k must be at least 1");
    }
    let specs = args.specs()?;
    let backend = args.backend()?;
    let opts = args.weights_options();

    // Inputs first: a bad image fails fast, before any download.
    let mut rows: Vec<(String, Vec<f32>)> = Vec::new();
    let per = 3 * INPUT_SIZE * INPUT_SIZE;
    for path in inputs {
        let name = path.display().to_string();
        if path.extension().and_then(|e| e.to_str()) == Some("npy") {
            let a = npy::read_f32(path)?;
            match a.shape.as_slice() {
                [n, 3, INPUT_SIZE, INPUT_SIZE] => {
                    for (i, row) in a.data.chunks_exact(per).enumerate().take(*n) {
                        rows.push((format!("{name}[{i}]"), row.to_vec()));
                    }
                }
                s => bail!("{name}: shape {s:?}, expected [N, 3, {INPUT_SIZE}, {INPUT_SIZE}]"),
            }
        } else {
            let bytes = std::fs::read(path).with_context(|| format!("reading {name}"))?;
            let x = preprocess::preprocess(&bytes, max_pixels).with_context(|| name.clone())?;
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
        let k = top_k.min(clf.classes());
        let started = Instant::now();
        let images: Vec<&[f32]> = rows.iter().map(|(_, x)| x.as_slice()).collect();
        let mut logits = Vec::with_capacity(images.len());
        // Batches of 8: the throughput knee on CPU; bounds memory for long input lists.
        for chunk in images.chunks(8) {
            logits.extend(clf.logits(chunk)?);
        }
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
                logits: with_logits.then_some(l),
            });
        }
    }

    if json {
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

async fn bench(args: &BenchArgs) -> Result<()> {
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
    let b = args.batch as usize;
    let x = Tensor::randn(0f32, 1.0, (b, 3, INPUT_SIZE, INPUT_SIZE), &device)?;
    for _ in 0..args.warmup {
        model.forward(&x)?.to_device(&Device::Cpu)?;
    }
    let mut rates = Vec::new();
    let started = Instant::now();
    while rates.len() < 5 || started.elapsed().as_secs_f64() < args.seconds {
        let t = Instant::now();
        model.forward(&x)?.to_device(&Device::Cpu)?;
        rates.push(b as f64 / t.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    let report = serde_json::json!({
        "model": name,
        "batch": b,
        "threads": rayon::current_num_threads(),
        "device": device::describe(&device),
        "conv_impl": backend.conv_description(),
        "dtype": backend.dtype_name(),
        "img_per_s_median": median,
        "img_per_s_min": rates[0],
        "img_per_s_max": rates[rates.len() - 1],
        "iterations": rates.len(),
        "peak_rss_mib": peak_rss_mib(),
    });
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
    }
    Ok(())
}

/// Peak resident set size of this process (Linux), MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn list_models() -> Result<()> {
    let registry = Registry::builtin()?;
    for e in registry.entries() {
        println!(
            "{:<24} {:?}  {}\n{:<24} {}",
            e.name, e.kind, e.description, "", e.url
        );
    }
    Ok(())
}
