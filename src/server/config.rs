//! `serve`'s configuration: [`ServeConfig`] and its [`defaults`], which the command line shows
//! and the deployment files repeat.

use std::time::Duration;

use crate::{
    batcher::BatchConfig,
    device::DeviceSpec,
    model::{ConvImpl, Precision},
    preprocess::DEFAULT_MAX_PIXELS,
    registry::ModelSpec,
    weights::WeightsOptions,
};

/// Everything `serve` is configured with.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Models to serve; the first is the default for `/classify`.
    pub models: Vec<ModelSpec>,
    /// Cache and network options for the weights.
    pub weights: WeightsOptions,
    /// Where the models run.
    pub device: DeviceSpec,
    /// How the convolutions run (`auto`: fast on CPU, candle on CUDA).
    pub conv: ConvImpl,
    /// Compute dtype (`auto`: f16 on CUDA, f32 on CPU).
    pub precision: Precision,
    /// Batching knobs (shared by every model).
    pub batch: BatchConfig,
    /// Deadline of an inference request, from its arrival.
    pub request_timeout: Duration,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Largest image accepted, in pixels (413 beyond).
    pub max_pixels: u64,
    /// Origins allowed by CORS (`*` for any); empty: no CORS headers.
    pub cors_origins: Vec<String>,
    /// Bearer token required on inference routes, if set.
    pub api_key: Option<String>,
    /// Bound on the drain after SIGTERM.
    pub shutdown_timeout: Duration,
    /// Threads that decode and preprocess images.
    pub preprocess_threads: usize,
    /// Memory budget of the images being decoded at once, in bytes.
    pub preprocess_memory: u64,
    /// Open connections at most; beyond, new ones wait in the listen backlog while room is
    /// made ([`super::connections`]).
    pub max_connections: usize,
    /// Longest time to receive a request's headers, from its first byte.
    pub header_timeout: Duration,
    /// Longest time to receive a whole request body, from the end of its headers.
    pub body_timeout: Duration,
    /// A connection with no request under way is closed after this long.
    pub idle_timeout: Duration,
}

/// `serve`'s defaults, shared by [`ServeConfig::new`] and the command line.
pub mod defaults {
    /// Largest batch per forward pass.
    pub const MAX_BATCH_SIZE: u32 = 32;
    /// Longest wait for a batch to fill, milliseconds.
    pub const MAX_BATCH_DELAY_MS: f64 = 2.0;
    /// Images that may wait per model.
    pub const MAX_QUEUE: u32 = 256;
    /// Deadline of a request, milliseconds.
    pub const REQUEST_TIMEOUT_MS: u64 = 30_000;
    /// Largest request body, bytes.
    pub const MAX_BODY_BYTES: usize = 16 << 20;
    /// Longest drain after SIGTERM, seconds (below Kubernetes' 30 s grace period).
    pub const SHUTDOWN_TIMEOUT_S: u64 = 25;
    /// Memory budget of the images being decoded at once, MiB.
    pub const PREPROCESS_MEMORY_MIB: u32 = 1024;
    /// Open connections at most.
    pub const MAX_CONNECTIONS: u32 = 512;
    /// Nice value of `serve`'s HTTP threads (the model's keep 0): see [`crate::priority`].
    pub const HTTP_NICE: i32 = 15;
    /// Connections the kernel holds for us, not yet accepted (capped by `net.core.somaxconn`).
    pub const LISTEN_BACKLOG: u32 = 1024;
    /// Longest time to receive a request's headers, seconds.
    pub const HEADER_TIMEOUT_S: u64 = 10;
    /// Longest time to receive a request's body, seconds.
    pub const BODY_TIMEOUT_S: u64 = 30;
    /// Keep-alive idle timeout, seconds.
    pub const IDLE_TIMEOUT_S: u64 = 60;

    /// Preprocessing threads: one per core this process may use.
    pub fn preprocess_threads() -> usize {
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
    }
}

impl ServeConfig {
    /// Serves `models`, fetched with `weights`, with every other setting at `serve`'s default
    /// ([`defaults`]; device, conv and dtype `auto`; no CORS, no API key).
    pub fn new(models: Vec<ModelSpec>, weights: WeightsOptions) -> Self {
        Self {
            models,
            weights,
            device: DeviceSpec::Auto,
            conv: ConvImpl::Auto,
            precision: Precision::Auto,
            batch: BatchConfig {
                max_batch_size: defaults::MAX_BATCH_SIZE as usize,
                max_batch_delay: Duration::from_secs_f64(defaults::MAX_BATCH_DELAY_MS / 1000.0),
                max_queue: defaults::MAX_QUEUE as usize,
            },
            request_timeout: Duration::from_millis(defaults::REQUEST_TIMEOUT_MS),
            max_body_bytes: defaults::MAX_BODY_BYTES,
            max_pixels: DEFAULT_MAX_PIXELS,
            cors_origins: Vec::new(),
            api_key: None,
            shutdown_timeout: Duration::from_secs(defaults::SHUTDOWN_TIMEOUT_S),
            preprocess_threads: defaults::preprocess_threads(),
            preprocess_memory: u64::from(defaults::PREPROCESS_MEMORY_MIB) << 20,
            max_connections: defaults::MAX_CONNECTIONS as usize,
            header_timeout: Duration::from_secs(defaults::HEADER_TIMEOUT_S),
            body_timeout: Duration::from_secs(defaults::BODY_TIMEOUT_S),
            idle_timeout: Duration::from_secs(defaults::IDLE_TIMEOUT_S),
        }
    }
}
