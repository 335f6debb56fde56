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
    /// Require `Authorization: Bearer <key>` on inference routes (health and metrics stay open).
    #[arg(long, env = "DIRACNET_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Longest drain after SIGTERM/SIGINT, in seconds (below Kubernetes' 30 s grace).
    #[arg(long, env = "DIRACNET_SHUTDOWN_TIMEOUT_S", default_value_t = defaults::SHUTDOWN_TIMEOUT_S)]
    shutdown_timeout_s: u64,
}

/// Binds, then serves until SIGTERM/SIGINT and drains.
pub async fn run(args: ServeArgs) -> Result<()> {
    if !(args.max_batch_delay_ms.is_finite() && args.max_batch_delay_ms >= 0.0) {
        bail!("--max-batch-delay-ms must be a non-negative number");
    }
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
        api_key: args.api_key.filter(|k| !k.is_empty()),
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout_s),
    };
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.host, args.port))?;
    server::run(config, listener, shutdown::signal()).await?;
    Ok(())
}
