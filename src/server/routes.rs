//! The router: every route and where it is handled, the OpenAPI document, and the middleware
//! around them (request ids, access log, CORS, body limit, API key, request metrics).
//!
//! A new inference route goes into the `inference` router (behind the API key), its handler
//! into [`ApiDoc`]'s paths.

use std::{sync::Arc, time::Instant};

use axum::{
    extract::{DefaultBodyLimit, MatchedPath, Request, State},
    http::{header, HeaderValue, Method, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use tower_http::{
    cors::{AllowOrigin, Any, CorsLayer},
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer},
};
use tracing::Level;
use utoipa::OpenApi;

use super::{
    classify,
    error::ApiError,
    health::{self, healthz, info, metrics, models_v1, readyz},
    infer::InferenceSummary,
    kserve, AppState,
};

/// The OpenAPI description of the HTTP API.
#[derive(OpenApi)]
#[openapi(
    info(title = "diracnet", description = "Image classification with the pretrained folded DiracNets."),
    paths(
        classify::classify, classify::classify_model, health::healthz, health::readyz, health::info,
        health::models_v1, health::metrics,
        kserve::server_metadata, kserve::live, kserve::ready, kserve::model_metadata,
        kserve::model_ready, kserve::infer,
    ),
    components(schemas(
        classify::ClassifyJson, classify::ClassifyResponse, classify::ImageResult,
        classify::PredictionBody, super::error::ErrorBody, health::Health, health::Info,
        health::ModelInfo, health::Batching, health::ModelList, kserve::InferRequest, kserve::InferResponse, kserve::RequestInput,
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
        .get::<InferenceSummary>()
        .map_or("", |m| m.model.as_str());
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

async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
