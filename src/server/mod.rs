//! `diracnet serve`: the HTTP server.
//!
//! Life of the process ([`run`]):
//!
//! 1. **Bind** and serve at once: `/healthz` answers 200, `/readyz` 503 while models load.
//! 2. **Load** every model (fetch → convert → candle), start its [`batcher::Batcher`] (one
//!    compute thread per model), **warm up** at batch 1 and at the maximum batch, then report
//!    ready and log the address and the models.
//! 3. **Serve** until SIGTERM/SIGINT (the `shutdown` future).
//! 4. **Drain**: readiness turns 503 and new inference requests get 503 at once; requests in
//!    flight and images already queued are answered; then the listener closes and `run`
//!    returns — all within the shutdown timeout.
//!
//! Modules: [`batcher`] (queue, batching task, compute thread), [`routes`] (router, health,
//! info, metrics, docs), [`classify`] (`POST /classify`), [`kserve`] (Open Inference Protocol),
//! [`metrics`], [`error`].

pub mod batcher;
pub mod classify;
pub mod error;
pub mod kserve;
pub mod metrics;
pub mod routes;

use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use candle_core::Device;
use tokio::{net::TcpListener, sync::Notify};

use crate::{
    classify::{Classifier, LoadError},
    device::{self, DeviceError, DeviceSpec},
    model::{Backend, ConvImpl, ModelError, Precision, INPUT_SIZE},
    registry::ModelSpec,
    weights::WeightsOptions,
};
use batcher::{BatchConfig, Batcher};
use metrics::Metrics;

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
            max_pixels: crate::preprocess::DEFAULT_MAX_PIXELS,
            cors_origins: Vec::new(),
            api_key: None,
            shutdown_timeout: Duration::from_secs(defaults::SHUTDOWN_TIMEOUT_S),
        }
    }
}

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The device could not be opened.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The device, conv implementation and dtype do not go together.
    #[error(transparent)]
    Backend(#[from] ModelError),
    /// A model could not be loaded.
    #[error("model {name}: {source}")]
    Load {
        /// Serving name.
        name: String,
        /// Why.
        source: LoadError,
    },
    /// Two models share a name.
    #[error("two models are named {0:?}; rename one with NAME=SOURCE")]
    DuplicateName(String),
    /// Warm-up failed.
    #[error("warm-up of model {name} failed: {reason}")]
    Warmup {
        /// Serving name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Io(#[from] std::io::Error),
}

/// A model being served: the network and its batcher.
pub struct ServedModel {
    /// The loaded network, labels and provenance.
    pub classifier: Arc<Classifier>,
    /// Its queue.
    pub batcher: Batcher,
}

/// State shared by every handler.
pub struct AppState {
    /// The configuration.
    pub config: ServeConfig,
    /// Set once every model is loaded and warmed up.
    models: OnceLock<Vec<ServedModel>>,
    device: OnceLock<String>,
    shutting_down: AtomicBool,
    inflight: AtomicUsize,
    drained: Notify,
    /// Metrics registry.
    pub metrics: Metrics,
}

impl AppState {
    fn new(config: ServeConfig) -> Self {
        let metrics = Metrics::new(config.batch.max_batch_size);
        Self {
            config,
            models: OnceLock::new(),
            device: OnceLock::new(),
            shutting_down: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            drained: Notify::new(),
            metrics,
        }
    }

    /// The served models, once ready.
    pub fn models(&self) -> Option<&[ServedModel]> {
        self.models.get().map(Vec::as_slice)
    }

    /// The device the models run on (`cpu`, `cuda:0`), once loaded.
    pub fn device_name(&self) -> Option<&str> {
        self.device.get().map(String::as_str)
    }

    /// True once a shutdown signal arrived.
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Why the server is not ready, if it is not.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if self.shutting_down() {
            Some("shutting_down")
        } else if self.models.get().is_none() {
            Some("loading")
        } else {
            None
        }
    }

    /// Marks an inference request in flight until the guard drops; refuses new ones while
    /// shutting down.
    pub fn begin_inference(self: &Arc<Self>) -> Option<InflightGuard> {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        let guard = InflightGuard(self.clone());
        // Checked after counting, so the drain never misses a request that got past here.
        (!self.shutting_down()).then_some(guard)
    }

    /// Decodes and preprocesses `images` (one after another, on the blocking pool, so the
    /// async workers stay free), recording each image's time in
    /// `diracnet_preprocess_duration_seconds`. Returns the network inputs and the total time.
    pub async fn preprocess<B>(
        &self,
        model: &str,
        images: Vec<B>,
    ) -> Result<(Vec<Vec<f32>>, Duration), error::ApiError>
    where
        B: AsRef<[u8]> + Send + 'static,
    {
        let max_pixels = self.config.max_pixels;
        let (inputs, times) = tokio::task::spawn_blocking(move || {
            let mut times = Vec::with_capacity(images.len());
            let inputs = images
                .iter()
                .map(|b| {
                    let started = Instant::now();
                    let input = crate::preprocess::preprocess(b.as_ref(), max_pixels);
                    times.push(started.elapsed());
                    input
                })
                .collect::<Result<Vec<_>, _>>();
            (inputs, times)
        })
        .await
        .map_err(|e| error::ApiError::internal(format!("preprocessing task failed: {e}")))?;
        for &t in &times {
            self.metrics.preprocess_duration(model, t);
        }
        Ok((inputs?, times.iter().sum()))
    }

    /// Turns an inference route's outcome into its response: records the latency of a success
    /// or the reason of a refusal, and labels the response with the served model for the
    /// request counter.
    pub fn finish_inference(
        &self,
        model: String,
        route: &str,
        arrived: Instant,
        result: Result<axum::response::Response, error::ApiError>,
    ) -> axum::response::Response {
        use axum::response::IntoResponse;
        let mut response = match result {
            Ok(r) => {
                self.metrics
                    .request_duration(&model, route, arrived.elapsed());
                r
            }
            Err(e) => {
                if let Some(reason) = e.reject_reason() {
                    self.metrics.rejected(&model, reason);
                }
                e.into_response()
            }
        };
        response
            .extensions_mut()
            .insert(classify::ModelLabel(model));
        response
    }
}

/// Counts one inference request in flight.
pub struct InflightGuard(Arc<AppState>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.drained.notify_waiters();
        }
    }
}

/// Serves on `listener` until `shutdown` completes, then drains and returns.
pub async fn run(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let addr = listener.local_addr()?;
    let state = Arc::new(AppState::new(config));
    let app = routes::router(state.clone());
    let stop = Arc::new(Notify::new());
    let stop_wait = stop.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop_wait.notified().await })
            .await
    });
    tracing::info!(%addr, "listening; loading models");

    tokio::pin!(shutdown);
    let loaded = tokio::select! {
        r = load_models(&state) => Some(r),
        () = &mut shutdown => None,
    };
    match loaded {
        Some(Ok(models)) => {
            let names: Vec<&str> = models.iter().map(|m| m.classifier.name.as_str()).collect();
            tracing::info!(
                %addr,
                models = ?names,
                device = state.device_name().unwrap_or("?"),
                "ready"
            );
            let _ = state.models.set(models);
            shutdown.await;
        }
        Some(Err(e)) => {
            stop.notify_one();
            let _ = server.await;
            return Err(e);
        }
        None => {}
    }

    // Drain.
    tracing::info!("shutdown signal received: draining");
    state.shutting_down.store(true, Ordering::SeqCst);
    let timeout = state.config.shutdown_timeout;
    let drain = async {
        loop {
            let notified = state.drained.notified();
            if state.inflight.load(Ordering::SeqCst) == 0 {
                break;
            }
            notified.await;
        }
        if let Some(models) = state.models() {
            for m in models {
                m.batcher.close();
            }
        }
        stop.notify_one();
        server.await
    };
    match tokio::time::timeout(timeout, drain).await {
        Ok(Ok(Ok(()))) => tracing::info!("drained; bye"),
        Ok(Ok(Err(e))) => return Err(e.into()),
        Ok(Err(e)) => tracing::error!(error = %e, "server task failed"),
        Err(_) => tracing::warn!(?timeout, "shutdown timeout reached with requests in flight"),
    }
    Ok(())
}

async fn load_models(state: &Arc<AppState>) -> Result<Vec<ServedModel>, ServeError> {
    let config = &state.config;
    let device: Device = config.device.open()?;
    let backend = Backend::new(device, config.conv, config.precision)?;
    let device = backend.device();
    let _ = state.device.set(device::describe(device));
    tracing::info!(
        device = %device::describe(device),
        requested = %config.device,
        conv = %backend.conv_description(),
        dtype = backend.dtype_name(),
        threads = rayon::current_num_threads(),
        "backend"
    );
    let mut served: Vec<ServedModel> = Vec::new();
    for spec in &config.models {
        if served.iter().any(|m| m.classifier.name == spec.name) {
            return Err(ServeError::DuplicateName(spec.name.clone()));
        }
        let started = Instant::now();
        let classifier = Classifier::load(spec, &config.weights, &backend)
            .await
            .map_err(|source| ServeError::Load {
                name: spec.name.clone(),
                source,
            })?;
        let classifier = Arc::new(classifier);
        warm_up(&classifier, config.batch.max_batch_size).await?;
        let a = classifier.model.architecture();
        tracing::info!(
            model = %spec.name,
            source = %classifier.weights.source,
            depth = a.depth(),
            classes = a.classes,
            seconds = started.elapsed().as_secs_f64(),
            "model loaded and warmed up"
        );
        state.metrics.init_model(&spec.name);
        let batcher = Batcher::spawn(
            classifier.clone(),
            config.batch,
            state.metrics.observer(&spec.name),
        );
        served.push(ServedModel {
            classifier,
            batcher,
        });
    }
    Ok(served)
}

/// One forward pass at batch 1 and one at the largest batch, so the first requests do not pay
/// for allocator growth or kernel selection.
async fn warm_up(classifier: &Arc<Classifier>, max_batch: usize) -> Result<(), ServeError> {
    let c = classifier.clone();
    let result = tokio::task::spawn_blocking(move || {
        let image = vec![0f32; 3 * INPUT_SIZE * INPUT_SIZE];
        for n in [1, max_batch.max(1)] {
            let batch: Vec<&[f32]> = (0..n).map(|_| image.as_slice()).collect();
            c.logits(&batch).map_err(|e| e.to_string())?;
        }
        Ok::<(), String>(())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    result.map_err(|reason| ServeError::Warmup {
        name: classifier.name.clone(),
        reason,
    })
}

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
