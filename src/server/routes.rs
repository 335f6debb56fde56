//! The router: routes, health, info, metrics, API docs, and the middleware around them
//! (request ids, access log, CORS, body limit, API key, request metrics).

use std::{sync::Arc, time::Instant};

use axum::{
    extract::{DefaultBodyLimit, MatchedPath, Request, State},
    http::{header, HeaderValue, Method, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde::Serialize;
use tower_http::{
    cors::{AllowOrigin, Any, CorsLayer},
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer},
};
use tracing::Level;
use utoipa::OpenApi;

use super::{
    classify::{self, ModelLabel},
    error::ApiError,
    kserve, AppState,
};

/// The OpenAPI description of the HTTP API.
#[derive(OpenApi)]
#[openapi(
    info(title = "diracnet", description = "Image classification with the pretrained folded DiracNets."),
    paths(
        classify::classify, classify::classify_model, healthz, readyz, info, models_v1, metrics,
        kserve::server_metadata, kserve::live, kserve::ready, kserve::model_metadata,
        kserve::model_ready, kserve::infer,
    ),
    components(schemas(
        classify::ClassifyJson, classify::ClassifyResponse, classify::ImageResult,
        classify::PredictionBody, super::error::ErrorBody, Health, Info, ModelInfo, Batching,
        ModelList, kserve::InferRequest, kserve::InferResponse, kserve::RequestInput,
        kserve::RequestOutput, kserve::ResponseOutput, kserve::ServerMetadata,
        kserve::ModelMetadata, kserve::TensorMetadata,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "classify", description = "Top-k classification"),
        (name = "health", description = "Liveness, readiness, information, metrics"),
        (name = "kserve", description = "KServe v2 / Open Inference Protocol"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Builds the application router.
pub fn router(state: Arc<AppState>) -> Router {
    let inference = Router::new()
        // PUT too: `curl -T image.jpg` uploads with PUT.
        .route(
            "/classify",
            post(classify::classify).put(classify::classify),
        )
        .route(
            "/models/{name}/classify",
            post(classify::classify_model).put(classify::classify_model),
        )
        .route("/v2/models/{name}/infer", post(kserve::infer))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));

    let open = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/info", get(info))
        .route("/v1/models", get(models_v1))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
        .route("/v2", get(kserve::server_metadata))
        .route("/v2/health/live", get(kserve::live))
        .route("/v2/health/ready", get(kserve::ready))
        .route("/v2/models/{name}", get(kserve::model_metadata))
        .route("/v2/models/{name}/ready", get(kserve::model_ready))
        .merge(
            utoipa_swagger_ui::SwaggerUi::new("/docs").url("/docs/openapi.json", ApiDoc::openapi()),
        );

    let mut app = inference
        .merge(open)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        // Access log at debug: 503s from /readyz while loading are not errors.
        .layer(
            TraceLayer::new_for_http()
                .on_response(DefaultOnResponse::new().level(Level::DEBUG))
                .on_failure(DefaultOnFailure::new().level(Level::DEBUG)),
        )
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid));
    if let Some(cors) = cors_layer(&state.config.cors_origins) {
        app = app.layer(cors);
    }
    app.with_state(state)
}

fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let base = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION])
        .expose_headers([
            header::HeaderName::from_static("x-request-id"),
            header::HeaderName::from_static("x-preprocess-time-ms"),
            header::HeaderName::from_static("x-queue-time-ms"),
            header::HeaderName::from_static("x-inference-time-ms"),
        ]);
    if origins.iter().any(|o| o == "*") {
        return Some(base.allow_origin(Any));
    }
    let list: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    Some(base.allow_origin(AllowOrigin::list(list)))
}

/// Counts every response by model, route and status code.
async fn track(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let started = Instant::now();
    let response = next.run(request).await;
    let model = response
        .extensions()
        .get::<ModelLabel>()
        .map_or("", |m| m.0.as_str());
    state
        .metrics
        .request(model, &route, response.status().as_u16());
    tracing::debug!(
        route,
        status = response.status().as_u16(),
        ms = started.elapsed().as_secs_f64() * 1e3,
        "request"
    );
    response
}

/// Inference routes need `Authorization: Bearer <key>` when an API key is set.
async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
            let mut r = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong API key (Authorization: Bearer <key>)",
            )
            .into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route {} {}",
        request.method(),
        request.uri().path()
    ))
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

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
    /// Where the weights came from (URL or path).
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
    /// Compute dtype: `f32`, `f16` or `bf16`.
    pub dtype: String,
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
}

/// Model list.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelList {
    /// Served models.
    pub models: Vec<ModelInfo>,
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
                source: c.weights.source.clone(),
                source_sha256: c.weights.source_sha256.clone(),
                depth: a.depth(),
                widths: a.widths.clone(),
                blocks: a.blocks.clone(),
                classes: a.classes,
                labels: c.labels.is_some(),
                input_shape: [3, crate::model::INPUT_SIZE, crate::model::INPUT_SIZE],
                queue_depth: m.batcher.queue_depth(),
                conv_impl: c.model.backend().conv_description(),
                dtype: c.model.backend().dtype_name().to_string(),
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

async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
