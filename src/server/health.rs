//! Health and information: `/healthz` (liveness), `/readyz` (readiness), `/info` and
//! `/v1/models` (what is served, how), `/metrics` (Prometheus).

use std::sync::Arc;

use axum::{
    extract::State,
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::Serialize;

use super::AppState;
use crate::tensor::INPUT_SIZE;

/// Liveness/readiness body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok`, `ready` or `not_ready`.
    pub status: &'static str,
    /// Why not ready: `loading` or `shutting_down`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
}

/// Liveness: 200 while the process serves.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok",
        reason: None,
    })
}

/// Readiness: 200 when every model is loaded and warmed up and no shutdown is under way.
#[utoipa::path(get, path = "/readyz", tag = "health", responses(
    (status = 200, body = Health), (status = 503, description = "Loading or shutting down", body = Health)))]
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match state.not_ready_reason() {
        None => Json(Health {
            status: "ready",
            reason: None,
        })
        .into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                status: "not_ready",
                reason: Some(reason),
            }),
        )
            .into_response(),
    }
}

/// A served model.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelInfo {
    /// Serving name.
    pub name: String,
    /// Where the weights came from: the URL, or a local file's name (never its directory).
    pub source: String,
    /// sha256 of the source `.pth`, when there was one.
    pub source_sha256: Option<String>,
    /// Network depth.
    pub depth: usize,
    /// Channels per group.
    pub widths: Vec<usize>,
    /// Blocks per group.
    pub blocks: Vec<usize>,
    /// Number of classes.
    pub classes: usize,
    /// Whether class names are known.
    pub labels: bool,
    /// Input tensor shape per image.
    pub input_shape: [usize; 3],
    /// Images waiting in its queue.
    pub queue_depth: usize,
    /// Convolution implementation, e.g. `fast (winograd f4x4, avx2+fma)` or `candle`.
    pub conv_impl: String,
    /// CPU kernel set of the fast path: `avx512`, `avx2+fma` or `portable` (f32), or
    /// `avx512_bf16` or `amx_bf16` (`--dtype bf16`); null without the fast path.
    pub isa: Option<&'static str>,
    /// Compute dtype: `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// The authors' published accuracy (registry models that have it), to compare with
    /// `diracnet eval`; null otherwise.
    pub published: Option<PublishedAccuracy>,
}

/// The accuracy the authors published: ILSVRC2012 val, single 224 crop.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PublishedAccuracy {
    /// Top-1 error, percent.
    pub top1_error: f64,
    /// Top-5 error, percent.
    pub top5_error: f64,
}

/// Batching settings.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Batching {
    /// Largest batch.
    pub max_batch_size: usize,
    /// Longest wait for a batch to fill, ms.
    pub max_batch_delay_ms: f64,
    /// Queue capacity, images.
    pub max_queue: usize,
    /// Request deadline, ms.
    pub request_timeout_ms: u128,
}

/// Server information.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Info {
    /// `diracnet`.
    pub name: &'static str,
    /// Server version.
    pub version: &'static str,
    /// Device the models run on.
    pub device: Option<String>,
    /// CPU threads for inference.
    pub threads: usize,
    /// Whether every model is ready.
    pub ready: bool,
    /// Served models (empty while loading).
    pub models: Vec<ModelInfo>,
    /// Batching settings.
    pub batching: Batching,
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Largest image, pixels.
    pub max_pixels: u64,
    /// Whether JPEGs decode with libjpeg-turbo's SIMD code; false when the build lacked `nasm`
    /// (decoding about 3× slower).
    pub jpeg_simd: bool,
}

/// Model list.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelList {
    /// Served models.
    pub models: Vec<ModelInfo>,
}

/// What `/info` tells of a weights source: a URL as is, a local path as its file name only, so
/// that the server's directory layout is not disclosed to every client.
pub fn public_source(source: &str) -> String {
    if source.starts_with("http://") || source.starts_with("https://") {
        return source.to_string();
    }
    let path = source.strip_prefix("file://").unwrap_or(source);
    std::path::Path::new(path)
        .file_name()
        .map_or_else(String::new, |f| f.to_string_lossy().into_owned())
}

fn model_infos(state: &AppState) -> Vec<ModelInfo> {
    state
        .models()
        .unwrap_or_default()
        .iter()
        .map(|m| {
            let c = &m.classifier;
            let a = c.model.architecture();
            ModelInfo {
                name: c.name.clone(),
                source: public_source(&c.weights.source),
                source_sha256: c.weights.source_sha256.clone(),
                depth: a.depth(),
                widths: a.widths.clone(),
                blocks: a.blocks.clone(),
                classes: a.classes,
                labels: c.labels.is_some(),
                input_shape: [3, INPUT_SIZE, INPUT_SIZE],
                queue_depth: m.batcher.queue_depth(),
                conv_impl: c.model.backend().conv_description(),
                isa: c.model.backend().isa(),
                dtype: c.model.backend().dtype_name().to_string(),
                published: c.published.map(|p| PublishedAccuracy {
                    top1_error: p.top1_error,
                    top5_error: p.top5_error,
                }),
            }
        })
        .collect()
}

/// Models with depth, classes, device, batching settings and version.
#[utoipa::path(get, path = "/info", tag = "health", responses((status = 200, body = Info)))]
pub async fn info(State(state): State<Arc<AppState>>) -> Json<Info> {
    let c = &state.config;
    Json(Info {
        name: "diracnet",
        version: env!("CARGO_PKG_VERSION"),
        device: state.device_name().map(String::from),
        threads: rayon::current_num_threads(),
        ready: state.not_ready_reason().is_none(),
        models: model_infos(&state),
        batching: Batching {
            max_batch_size: c.batch.max_batch_size,
            max_batch_delay_ms: c.batch.max_batch_delay.as_secs_f64() * 1000.0,
            max_queue: c.batch.max_queue,
            request_timeout_ms: c.request_timeout.as_millis(),
        },
        max_body_bytes: c.max_body_bytes,
        max_pixels: c.max_pixels,
        jpeg_simd: crate::preprocess::jpeg_simd(),
    })
}

/// The served models.
#[utoipa::path(get, path = "/v1/models", tag = "health", responses((status = 200, body = ModelList)))]
pub async fn models_v1(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        models: model_infos(&state),
    })
}

/// Prometheus metrics, text format.
#[utoipa::path(get, path = "/metrics", tag = "health", responses(
    (status = 200, description = "Prometheus text exposition format", content_type = "text/plain")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    // Queue depths are read at scrape time, exactly.
    for m in state.models().unwrap_or_default() {
        state
            .metrics
            .set_queue_depth(&m.classifier.name, m.batcher.queue_depth());
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::public_source;

    #[test]
    fn sources_hide_local_directories() {
        let url = "https://example.org/w/diracnet18v2folded-a2174e15.pth";
        assert_eq!(public_source(url), url);
        assert_eq!(
            public_source("/home/me/models/diracnet18.safetensors"),
            "diracnet18.safetensors"
        );
        assert_eq!(public_source("./dn.pth"), "dn.pth");
        assert_eq!(public_source("file:///srv/m/dn.pth"), "dn.pth");
        assert_eq!(public_source("dn.pth"), "dn.pth");
    }
}
