//! `diracnet serve`: the HTTP server ([`diracnet::server`]).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use diracnet::{
    batcher::BatchConfig,
    preprocess,
    server::{self, defaults, shutdown, ServeConfig},
};

use super::ModelArgs;

/// `diracnet serve` flags.
#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    models: ModelArgs,
    /// Address to bind (never read from HOSTNAME, which Docker sets to the container id).
    #[arg(long, env = "DIRACNET_HOST", default_value = "0.0.0.0")]
    host: String,
    /// Port to listen on.
    #[arg(long, env = "DIRACNET_PORT", default_value_t = 8080)]
    port: u16,
    /// Largest batch per forward pass.
    #[arg(long, env = "DIRACNET_MAX_BATCH_SIZE", default_value_t = defaults::MAX_BATCH_SIZE, value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_batch_size: u32,
    /// Longest wait for a batch to fill once the model is free, in milliseconds.
    #[arg(long, env = "DIRACNET_MAX_BATCH_DELAY_MS", default_value_t = defaults::MAX_BATCH_DELAY_MS)]
    max_batch_delay_ms: f64,
    /// Images that may wait per model; beyond, requests get 429.
    #[arg(long, env = "DIRACNET_MAX_QUEUE", default_value_t = defaults::MAX_QUEUE, value_parser = clap::value_parser!(u32).range(1..))]
    max_queue: u32,
    /// Deadline of a request, in milliseconds; one still queued then gets 503.
    #[arg(long, env = "DIRACNET_REQUEST_TIMEOUT_MS", default_value_t = defaults::REQUEST_TIMEOUT_MS)]
    request_timeout_ms: u64,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, env = "DIRACNET_MAX_BODY_BYTES", default_value_t = defaults::MAX_BODY_BYTES)]
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
    /// Require `Authorization: Bearer <key>` on inference routes (health and metrics stay open;
    /// the scheme may be written in any case).
    #[arg(long, env = "DIRACNET_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Read the API key from this file (a mounted secret); surrounding whitespace, such as a
    /// trailing newline, is ignored. An empty file is an error.
    #[arg(
        long,
        env = "DIRACNET_API_KEY_FILE",
        value_name = "PATH",
        conflicts_with = "api_key"
    )]
    api_key_file: Option<std::path::PathBuf>,
    /// Longest drain after SIGTERM/SIGINT, in seconds (below Kubernetes' 30 s grace).
    #[arg(long, env = "DIRACNET_SHUTDOWN_TIMEOUT_S", default_value_t = defaults::SHUTDOWN_TIMEOUT_S)]
    shutdown_timeout_s: u64,
    /// Threads that decode and preprocess images [default: one per core].
    #[arg(long, env = "DIRACNET_PREPROCESS_THREADS", value_parser = clap::value_parser!(u32).range(1..=1024))]
    preprocess_threads: Option<u32>,
    /// Memory budget of the images being decoded at once, in MiB (each image is admitted
    /// against it from its header, before decoding; one larger than the budget decodes alone).
    #[arg(long, env = "DIRACNET_PREPROCESS_MEMORY_MIB", default_value_t = defaults::PREPROCESS_MEMORY_MIB, value_parser = clap::value_parser!(u32).range(16..=1 << 22))]
    preprocess_memory_mib: u32,
    /// Open connections at most. Beyond, new ones wait in the listen backlog while room is
    /// made: a connection idle for a second or more is closed, and one answer every 250 µs
    /// carries `Connection: close`.
    #[arg(long, env = "DIRACNET_MAX_CONNECTIONS", default_value_t = defaults::MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Connections the kernel may hold, not yet accepted, beyond `--max-connections` (the
    /// kernel caps it at `net.core.somaxconn`); beyond it, new connections are refused.
    #[arg(long, env = "DIRACNET_LISTEN_BACKLOG", default_value_t = defaults::LISTEN_BACKLOG, value_parser = clap::value_parser!(u32).range(1..=65535))]
    listen_backlog: u32,
    /// Longest time to receive a request's headers, in seconds, from their first byte.
    #[arg(long, env = "DIRACNET_HEADER_TIMEOUT_S", default_value_t = defaults::HEADER_TIMEOUT_S, value_parser = clap::value_parser!(u64).range(1..))]
    header_timeout_s: u64,
    /// Longest time to receive a whole request body, in seconds (408 beyond), however it is
    /// sent.
    #[arg(long, env = "DIRACNET_BODY_TIMEOUT_S", default_value_t = defaults::BODY_TIMEOUT_S, value_parser = clap::value_parser!(u64).range(1..))]
    body_timeout_s: u64,
    /// Nice value of the HTTP threads (0-19; 0 = the model's): higher lets the model keep the
    /// cores while a flood of requests is answered or refused.
    #[arg(long, env = "DIRACNET_HTTP_NICE", default_value_t = defaults::HTTP_NICE, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub http_nice: i32,
    /// A connection with no request under way is closed after this many seconds.
    #[arg(long, env = "DIRACNET_IDLE_TIMEOUT_S", default_value_t = defaults::IDLE_TIMEOUT_S, value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout_s: u64,
}

/// Binds, then serves until SIGTERM/SIGINT and drains.
pub async fn run(args: ServeArgs) -> Result<()> {
    if !(args.max_batch_delay_ms.is_finite() && args.max_batch_delay_ms >= 0.0) {
        bail!("--max-batch-delay-ms must be a non-negative number");
    }
    super::warn_without_jpeg_simd();
    let config = ServeConfig {
        models: args.models.specs()?,
        weights: args.models.weights_options(),
        device: args.models.device,
        conv: args.models.conv_impl,
        precision: args.models.dtype,
        batch: BatchConfig {
            max_batch_size: args.max_batch_size as usize,
            max_batch_delay: Duration::from_secs_f64(args.max_batch_delay_ms / 1000.0),
            max_queue: args.max_queue as usize,
        },
        request_timeout: Duration::from_millis(args.request_timeout_ms),
        max_body_bytes: args.max_body_bytes,
        max_pixels: args.max_pixels,
        cors_origins: args.cors_origins,
        api_key: match &args.api_key_file {
            Some(path) => Some(read_api_key(path)?),
            None => args.api_key.filter(|k| !k.is_empty()),
        },
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout_s),
        preprocess_threads: args
            .preprocess_threads
            .map_or_else(defaults::preprocess_threads, |n| n as usize),
        preprocess_memory: u64::from(args.preprocess_memory_mib) << 20,
        max_connections: args.max_connections as usize,
        header_timeout: Duration::from_secs(args.header_timeout_s),
        body_timeout: Duration::from_secs(args.body_timeout_s),
        idle_timeout: Duration::from_secs(args.idle_timeout_s),
    };
    let listener = server::bind(&args.host, args.port, args.listen_backlog)
        .await
        .with_context(|| format!("binding {}:{}", args.host, args.port))?;
    server::run(config, listener, shutdown::signal()).await?;
    Ok(())
}

/// The key in an `--api-key-file`, without surrounding whitespace; an empty one is an error.
fn read_api_key(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --api-key-file {}", path.display()))?;
    let key = text.trim();
    if key.is_empty() {
        bail!(
            "--api-key-file {}: the file is empty (no key to require)",
            path.display()
        );
    }
    Ok(key.to_string())
}
