//! What every handler shares: the configuration, the served models once they are loaded, the
//! drain, and the metrics.

use std::sync::{Arc, OnceLock};

use super::{
    preprocessing::Preprocessing,
    shutdown::{Drain, InflightGuard},
    Metrics, ServeConfig,
};
use crate::{batcher::Batcher, classifier::Classifier};

/// A model being served: the network and its batcher.
#[derive(Clone)]
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
    drain: Arc<Drain>,
    /// Metrics registry.
    pub metrics: Metrics,
    /// The preprocessing pool and its memory budget.
    pub preprocessing: Preprocessing,
}

impl AppState {
    /// State for `config`, with no model loaded yet. Fails only if the preprocessing threads
    /// cannot be started.
    pub fn new(config: ServeConfig) -> std::io::Result<Self> {
        let metrics = Metrics::new(config.batch.max_batch_size);
        let preprocessing = Preprocessing::new(
            config.preprocess_threads,
            config.preprocess_memory,
            config.max_pixels,
        )?;
        Ok(Self {
            config,
            models: OnceLock::new(),
            device: OnceLock::new(),
            drain: Arc::new(Drain::default()),
            metrics,
            preprocessing,
        })
    }

    /// The served models, once ready.
    pub fn models(&self) -> Option<&[ServedModel]> {
        self.models.get().map(Vec::as_slice)
    }

    /// Publishes the loaded models: the server is ready (unless draining).
    pub(super) fn set_models(&self, models: Vec<ServedModel>) {
        let _ = self.models.set(models);
    }

    /// The device the models run on (`cpu`, `cuda:0`), once loaded.
    pub fn device_name(&self) -> Option<&str> {
        self.device.get().map(String::as_str)
    }

    /// Records the device the models run on.
    pub(super) fn set_device_name(&self, name: String) {
        let _ = self.device.set(name);
    }

    /// The drain: requests in flight, and whether shutdown has begun.
    pub fn drain(&self) -> &Drain {
        &self.drain
    }

    /// Admits an inference request (held until the guard drops); `None` while shutting down.
    pub fn begin_inference(&self) -> Option<InflightGuard> {
        self.drain.enter()
    }

    /// True once a shutdown signal arrived.
    pub fn shutting_down(&self) -> bool {
        self.drain.is_draining()
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
}
