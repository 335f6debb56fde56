//! `diracnet serve`: the HTTP server.
//!
//! Life of the process ([`run`]):
//!
//! 1. **Bind** and serve at once: `/healthz` answers 200, `/readyz` 503 while models load.
//! 2. **Load** every model, **warm it up** at batch 1 and at the maximum batch, start its
//!    [`Batcher`](crate::batcher::Batcher) (one compute thread per model), then report ready
//!    ([`startup`]).
//! 3. **Serve** until SIGTERM/SIGINT (the `shutdown` future: [`shutdown::signal`] for
//!    `diracnet serve`).
//! 4. **Drain** ([`shutdown`]): readiness turns 503, new inference requests get 503 at once, and
//!    every response carries `Connection: close`; requests in flight and images already queued
//!    are answered; then the listener closes, each connection closes after its response, and
//!    `run` returns — all within the shutdown timeout, or `run` fails saying what it cut.
//!
//! The files:
//!
//! | file | what |
//! |---|---|
//! | [`config`] | [`ServeConfig`] and its [`defaults`] |
//! | [`state`] | [`AppState`]: what every handler shares |
//! | [`startup`], [`shutdown`] | steps 2 and 4 |
//! | [`connections`] | the accept loop: connection cap, header and idle timeouts, graceful close |
//! | [`routes`] | the router, the OpenAPI document, the middleware (request ids, CORS, API key, request metrics and log) |
//! | [`body`] | request bodies read whole within `--max-body-bytes` and `--body-timeout-s` |
//! | [`preprocessing`] | the preprocessing pool and its memory budget |
//! | [`infer`] | **the one inference path**: drain guard → parse → announce → preprocess → batch → answer → metrics |
//! | [`classify`], [`kserve`] | the inference protocols: `POST /classify`, KServe v2 (parsing and formatting only) |
//! | [`health`] | health, readiness, `/info`, `/metrics` |
//! | [`page`] | the web page at `/` (HTML, script and style compiled in) |
//! | [`encoding`] | base64 image payloads |
//! | [`metrics`], [`error`] | Prometheus metrics; errors as JSON with the status naming the cause |
//!
//! A new inference route is a new [`infer::Protocol`]: how to read its request and how to write
//! its answer, plus one line in [`routes::router`].

pub mod body;
pub mod classify;
pub mod config;
pub mod connections;
pub mod encoding;
pub mod error;
pub mod health;
pub mod infer;
pub mod kserve;
pub mod metrics;
pub mod page;
pub mod preprocessing;
pub mod routes;
pub mod shutdown;
pub mod startup;
pub mod state;

pub use config::{defaults, ServeConfig};
pub use connections::bind;
pub use metrics::Metrics;
pub use state::{AppState, ServedModel};

use std::{future::Future, sync::Arc};

use tokio::net::TcpListener;

use crate::{classifier::LoadError, device::DeviceError, model::ModelError};

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
    #[error("model {name}: {cause}")]
    Load {
        /// Serving name.
        name: String,
        /// Why.
        cause: LoadError,
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
    /// A model's compute thread could not be started.
    #[error("model {name}: cannot start its compute thread: {cause}")]
    ComputeThread {
        /// Serving name.
        name: String,
        /// Why.
        cause: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Io(std::io::Error),
    /// The drain after SIGTERM ran out of time: what was still open was cut.
    #[error(
        "shutdown timeout ({timeout:?}) reached: {requests} inference requests in flight and \
         {connections} connections open were cut"
    )]
    DrainTimedOut {
        /// The `--shutdown-timeout-s` in force.
        timeout: std::time::Duration,
        /// Inference requests still in flight.
        requests: usize,
        /// Connections still open.
        connections: usize,
    },
}

// By hand, not `#[from]`, which would also make the error its `source()` and print it twice in
// an error chain: each error here prints its cause and does not wrap it.
impl From<std::io::Error> for ServeError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// Serves on `listener` until `shutdown` completes, then drains and returns; an error if the
/// drain ran out of time with requests still in flight ([`ServeError::DrainTimedOut`]).
pub async fn run(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let addr = listener.local_addr()?;
    let state = Arc::new(AppState::new(config)?);
    let app = routes::router(state.clone());
    let c = &state.config;
    let connections = connections::serve(
        listener,
        app,
        connections::Limits {
            max_connections: c.max_connections,
            header_timeout: c.header_timeout,
            idle_timeout: c.idle_timeout,
        },
    );
    tracing::info!(%addr, "listening; loading models");

    tokio::pin!(shutdown);
    let loaded = tokio::select! {
        r = startup::load_models(&state) => Some(r),
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
            state.set_models(models);
            shutdown.await;
        }
        Some(Err(e)) => {
            connections.shut_down().await;
            return Err(e);
        }
        None => {}
    }

    tracing::info!("shutdown signal received: draining");
    state.drain().begin();
    let timeout = state.config.shutdown_timeout;
    let drain = async {
        state.drain().idle().await;
        for m in state.models().unwrap_or_default() {
            m.batcher.close();
        }
        connections.shut_down().await;
    };
    if tokio::time::timeout(timeout, drain).await.is_err() {
        return Err(ServeError::DrainTimedOut {
            timeout,
            requests: state.drain().in_flight(),
            connections: connections.open(),
        });
    }
    tracing::info!("drained; bye");
    Ok(())
}
