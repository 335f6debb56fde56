//! `diracnet` — the command-line edge: parses flags (each with a `DIRACNET_*` env twin), sets up
//! logging and the thread pool, and dispatches to the subcommand's file in `src/cmd/`. Errors
//! become one clear message and exit code 1.

mod cmd;

use std::{io::IsTerminal, time::Duration};

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "diracnet",
    version,
    about = "Image classification with the pretrained folded DiracNets (Zagoruyko & Komodakis, 2017) on candle",
    after_help = "Examples:\n  diracnet serve --model diracnet18 --port 8080\n  diracnet classify cat.jpg\n  diracnet classify --model diracnet34 --top-k 3 --json a.jpg b.png\n  diracnet classify --format jsonl photos/ > results.jsonl\n  diracnet eval ~/imagenet/val\n  diracnet fetch --model diracnet18 --model diracnet34\n  diracnet convert diracnet18v2folded-a2174e15.pth dn18.safetensors\n  diracnet preprocess cat.jpg -o cat.npy\n\nEvery flag can also be set through the environment variable shown in its help."
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

    /// Best CPU kernel set to use: `auto` (the best this CPU runs, AMX included) or a cap, to
    /// compare kernel sets on one CPU (never more than the CPU has; every cap leaves AMX out).
    #[arg(long, global = true, env = "DIRACNET_CPU_ISA", value_enum, default_value_t = CpuIsa::Auto)]
    cpu_isa: CpuIsa,

    #[command(subcommand)]
    command: Command,
}

/// `--cpu-isa`.
#[derive(Clone, Copy, ValueEnum)]
enum CpuIsa {
    Auto,
    Avx512,
    Avx2,
    Portable,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve models over HTTP: a web page (/), /classify, KServe v2, health, metrics, OpenAPI
    /// (/docs).
    #[command(
        after_help = "Examples:\n  diracnet serve\n  diracnet serve --model diracnet18 --model diracnet34 --port 9000\n  DIRACNET_API_KEY=secret diracnet serve --max-batch-size 8 --max-batch-delay-ms 5\n  diracnet serve --api-key-file /run/secrets/api-key\n  curl -T cat.jpg -H 'Content-Type: image/jpeg' localhost:8080/classify\n\nEach request is logged in one INFO line (method, route, status, model, images, timings, error\ntype, request id); the probes /healthz, /readyz, /metrics and /v2/health/* at DEBUG. A client's\nx-request-id is kept when it is 1-128 visible ASCII characters, else replaced by a fresh UUID."
    )]
    Serve(Box<cmd::serve::ServeArgs>),
    /// Download and convert models into the cache; print each safetensors path.
    #[command(
        after_help = "Examples:\n  diracnet fetch\n  diracnet fetch --model diracnet34 --cache-dir /data\n  diracnet fetch --model mine=./checkpoint.pth"
    )]
    Fetch(cmd::fetch::FetchArgs),
    /// Convert a `.pth` (zip or legacy; folded or unfolded) into folded safetensors.
    #[command(
        after_help = "Example:\n  diracnet convert diracnet18-v2_checkpoint.pth dn18.safetensors"
    )]
    Convert(cmd::convert::ConvertArgs),
    /// Preprocess an image exactly as the authors' evaluation did; write a float32 `.npy`
    /// of shape [1, 3, 224, 224].
    #[command(after_help = "Example:\n  diracnet preprocess cat.jpg -o cat.npy")]
    Preprocess(cmd::preprocess::PreprocessArgs),
    /// Classify images, folders of images, or `.npy` arrays (preprocessed [N, 3, 224, 224], or
    /// uint8 RGB pixels); results stream as batches finish.
    #[command(
        after_help = "Examples:\n  diracnet classify cat.jpg dog.png\n  diracnet classify --model diracnet34 --json --logits cat.jpg\n  diracnet classify --format csv --top-k 1 ~/Pictures > labels.csv\n  diracnet classify --offline --cache-dir /data batch.npy pixels_uint8.npy\n\nA file that cannot be read or decoded gives a row with its error and the run goes on; the exit\nstatus is 1 if any input failed."
    )]
    Classify(cmd::classify::ClassifyArgs),
    /// Top-1 / top-5 accuracy on a labelled folder of images (ImageFolder, or flat with
    /// ImageNet's ground-truth CSV), to check the published figures.
    #[command(
        after_help = "Examples:\n  diracnet eval ~/imagenet/val\n  diracnet eval --ground-truth LOC_val_solution.csv --limit 5000 ~/ILSVRC/Data/CLS-LOC/val\n  diracnet eval --model diracnet34 --json --predictions preds.jsonl ~/imagenet/val\n\nImageFolder: DIR/<class>/<image>, the class folder named by its WordNet id (ImageNet models:\nn01440764, ...) or class index. Images that cannot be read are counted and skipped."
    )]
    Eval(cmd::eval::EvalArgs),
    /// List the models of the built-in registry.
    Models,
    /// Measure the model's raw throughput on random input (no HTTP, no preprocessing).
    #[command(
        after_help = "Examples:\n  diracnet bench --model random:18 --batch 8 --json\n  diracnet bench --model diracnet34 --batch 1 --seconds 10\n\n`random:18` and `random:34` are DiracNet-18/34-shaped random weights (speed does not depend on\nthe values)."
    )]
    Bench(cmd::bench::BenchArgs),
}

fn main() {
    diracnet::memory::keep_freed_buffers();
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log);
    init_threads(cli.threads);
    limit_isa(cli.cpu_isa);
    // `serve`'s async threads yield to the model's (`diracnet::priority`); threads that the
    // runtime's threads create inherit it, which the model's never are.
    let http_nice = match &cli.command {
        Command::Serve(args) => args.http_nice,
        _ => 0,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(move || {
            if http_nice > 0 {
                if let Err(e) = diracnet::priority::set_current_thread_nice(http_nice) {
                    tracing::warn!(error = %e, "could not lower the HTTP threads' priority");
                }
            }
        })
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(run(cli.command));
    // Do not wait on blocking work left running (e.g. a warm-up interrupted by SIGTERM).
    runtime.shutdown_timeout(Duration::from_millis(500));
    match result {
        Ok(()) => {}
        // The reader of stdout went away (`| head`): nothing left to say.
        Err(e) if cmd::output::is_closed(&e) => {}
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Caps the CPU kernel set (`--cpu-isa`), before anything detects it.
fn limit_isa(choice: CpuIsa) {
    use diracnet::model::cpu::Isa;
    let cap = match choice {
        CpuIsa::Auto => return,
        CpuIsa::Avx512 => Isa::Avx512,
        CpuIsa::Avx2 => Isa::Avx2Fma,
        CpuIsa::Portable => Isa::Portable,
    };
    Isa::limit(cap);
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
    // Colour only on a terminal: a log file or collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve(args) => cmd::serve::run(*args).await,
        Command::Fetch(args) => cmd::fetch::run(&args).await,
        Command::Convert(args) => cmd::convert::run(&args),
        Command::Preprocess(args) => cmd::preprocess::run(&args),
        Command::Classify(args) => cmd::classify::run(&args).await,
        Command::Eval(args) => cmd::eval::run(&args).await,
        Command::Models => cmd::models::run(),
        Command::Bench(args) => cmd::bench::run(&args).await,
    }
}
