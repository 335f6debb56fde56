//! The router: every route and where it is handled, the OpenAPI document, and the middleware
//! around them (request ids, access log, CORS, body limit, API key, request metrics, security
//! headers).
//!
//! A new inference route goes into the `inference` router (behind the API key), its handler
//! into [`ApiDoc`]'s paths.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    extract::{DefaultBodyLimit, MatchedPath, Request, State},
    http::{header, HeaderName, HeaderValue, Method, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use sha2::{Digest, Sha256};
use tower_http::{
    cors::{AllowOrigin, Any, CorsLayer},
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer},
};
use tracing::Level;
use utoipa::OpenApi;

use super::{
    body, classify,
    error::{ApiError, ErrorType},
    health::{self, healthz, info, metrics, models_v1, readyz},
    infer::InferenceSummary,
    kserve, page, AppState,
};

/// The OpenAPI description of the HTTP API.
#[derive(OpenApi)]
#[openapi(
    info(title = "diracnet", description = "Image classification with the pretrained folded DiracNets."),
    paths(
        classify::classify, classify::classify_model, health::healthz, health::readyz, health::info,
        health::models_v1, health::metrics,
        kserve::server_metadata, kserve::live, kserve::ready, kserve::model_metadata,
        kserve::model_ready, kserve::infer, kserve::version_metadata, kserve::version_ready,
        kserve::infer_version, kserve::all_stats, kserve::model_stats, kserve::version_stats,
    ),
    components(schemas(
        classify::ClassifyJson, classify::ClassifyMultipart, classify::ImageFile, classify::ClassifyResponse, classify::ImageResult,
        classify::PredictionBody, super::error::ErrorBody, health::Health, health::Info,
        health::ModelInfo, health::PublishedAccuracy, health::Batching, health::ModelList, kserve::InferRequest, kserve::InferResponse, kserve::RequestInput,
        kserve::RequestOutput, kserve::ResponseOutput, kserve::ServerMetadata,
        kserve::ModelMetadata, kserve::TensorMetadata, kserve::StatsResponse,
        kserve::ModelStatistics, kserve::InferenceStatistics, kserve::BatchStatistics,
        super::metrics::Duration64,
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
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(kserve::infer_version),
        )
        // Route layers run outermost last: the key is checked before the body is read.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            body::read_whole_body,
        ))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));

    let open = Router::new()
        .route("/", get(page::index))
        .route("/ui/app.js", get(page::script))
        .route("/ui/app.css", get(page::style))
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
        .route("/v2/models/stats", get(kserve::all_stats))
        .route("/v2/models/{name}/stats", get(kserve::model_stats))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(kserve::version_metadata),
        )
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(kserve::version_ready),
        )
        .route(
            "/v2/models/{name}/versions/{version}/stats",
            get(kserve::version_stats),
        )
        .merge(
            Router::from(
                utoipa_swagger_ui::SwaggerUi::new("/docs")
                    .url("/docs/openapi.json", ApiDoc::openapi()),
            )
            .layer(middleware::map_response(docs_headers)),
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
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        // Before the layer above, which keeps any id it finds.
        .layer(middleware::map_request(drop_invalid_request_id));
    if let Some(cors) = cors_layer(&state.config.cors_origins) {
        app = app.layer(cors);
    }
    app.layer(middleware::map_response(nosniff))
        .with_state(state)
}

/// Longest `x-request-id` taken from a client.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Whether a client's `x-request-id` is kept: 1 to [`MAX_REQUEST_ID_LEN`] visible ASCII
/// characters (0x21–0x7E). Anything else is replaced by a fresh UUID, so that ids stay short
/// and safe to echo and to log.
pub fn valid_request_id(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&id.len()) && id.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// Removes an `x-request-id` that [`valid_request_id`] refuses (and any repeats of the header),
/// so that the request-id layer generates one.
async fn drop_invalid_request_id(mut request: Request) -> Request {
    let name = HeaderName::from_static("x-request-id");
    let headers = request.headers_mut();
    let kept = headers
        .get(&name)
        .filter(|v| valid_request_id(v.as_bytes()))
        .cloned();
    headers.remove(&name);
    if let Some(id) = kept {
        headers.insert(name, id);
    }
    request
}

/// Every response: browsers must not guess a content type other than the one declared.
async fn nosniff(mut response: Response) -> Response {
    response.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// The Swagger UI: never framed by another page (clickjacking), no referrer sent on.
async fn docs_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("frame-ancestors 'none'"),
    );
    response
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

/// Health and metrics probes, polled every few seconds by orchestrators and scrapers.
const PROBE_ROUTES: [&str; 5] = [
    "/healthz",
    "/readyz",
    "/metrics",
    "/v2/health/live",
    "/v2/health/ready",
];

/// Milliseconds, to the microsecond.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Counts every response by model, route and status code, and logs one line per request:
/// method, route, status, model, images, the timings of an inference request, the total time,
/// the error type of a 4xx/5xx and the request id.
async fn track(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = request.method().clone();
    // Set (and bounded) by the request-id layers outside this one.
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let started = Instant::now();
    let mut response = next.run(request).await;
    let total_ms = ms(started.elapsed());
    let status = response.status().as_u16();
    let summary = response.extensions().get::<InferenceSummary>();
    let model = summary.map_or("", |m| m.model.as_str());
    state.metrics.request(model, &route, status);
    if let Some(s) = summary.filter(|s| !s.model.is_empty()) {
        let ok = response.status().is_success();
        state
            .metrics
            .inference_request(&s.model, ok, started.elapsed(), s.timings);
    }
    let model = Some(model).filter(|m| !m.is_empty());
    let images = summary.map(|s| s.images).filter(|&n| n > 0);
    let timings = summary.and_then(|s| s.timings);
    let preprocess_ms = timings.map(|t| ms(t.0));
    let queue_ms = timings.map(|t| ms(t.1));
    let inference_ms = timings.map(|t| ms(t.2));
    let error_type = response.extensions().get::<ErrorType>().map(|e| e.0);
    macro_rules! request_line {
        ($level:expr) => {
            tracing::event!(
                $level,
                method = %method,
                route,
                status,
                model,
                images,
                preprocess_ms,
                queue_ms,
                inference_ms,
                total_ms,
                error_type,
                request_id,
                "request"
            )
        };
    }
    // Probes (every few seconds from Kubernetes, Docker, Prometheus) log at DEBUG so that they
    // do not flood the INFO log; every other request gets its INFO line.
    if PROBE_ROUTES.contains(&route.as_str()) {
        request_line!(Level::DEBUG);
    } else {
        request_line!(Level::INFO);
    }
    // Once draining, every connection closes after its response, so a keep-alive client sends
    // its next request to a server that is staying (rather than losing it to a reset).
    if state.shutting_down() {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
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
            .and_then(|v| bearer_token(v.as_bytes()));
        if !given.is_some_and(|g| same_secret(g, key.as_bytes())) {
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

/// The token of an `Authorization: Bearer <token>` header; the scheme is case-insensitive
/// (RFC 7235), blanks around the token are ignored.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let scheme_len = b"bearer".len();
    if value.len() <= scheme_len
        || !value[..scheme_len].eq_ignore_ascii_case(b"bearer")
        || value[scheme_len] != b' '
    {
        return None;
    }
    Some(value[scheme_len..].trim_ascii())
}

/// Compares a given key with ours in time that depends on neither their contents nor their
/// lengths: it compares their SHA-256 digests (always 32 bytes) without an early exit.
fn same_secret(given: &[u8], key: &[u8]) -> bool {
    let (a, b) = (Sha256::digest(given), Sha256::digest(key));
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_bounded_visible_ascii() {
        assert!(valid_request_id(b"my-id-42"));
        assert!(valid_request_id(&[b'a'; MAX_REQUEST_ID_LEN]));
        assert!(!valid_request_id(&[b'a'; MAX_REQUEST_ID_LEN + 1]));
        assert!(!valid_request_id(b""));
        for bad in [&b"a b"[..], b"a\tb", b"caf\xc3\xa9", b"a\x7f"] {
            assert!(!valid_request_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for ok in [&b"Bearer k"[..], b"bearer k", b"BEARER k", b"Bearer   k "] {
            assert_eq!(bearer_token(ok), Some(&b"k"[..]), "{ok:?}");
        }
        for bad in [&b"Basic k"[..], b"Bearerk", b"Bearer", b"k", b"Bearer\tk"] {
            assert_eq!(bearer_token(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn secrets_compare_by_digest() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cre", b"s3cret"));
        assert!(!same_secret(b"s3cret!", b"s3cret"));
        assert!(!same_secret(b"", b"s3cret"));
        assert!(!same_secret(b"S3cret", b"s3cret"));
    }
}
