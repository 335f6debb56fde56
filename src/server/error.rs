//! HTTP errors: every failure is a JSON body `{"error": "...", "type": "..."}` with the status
//! that names its cause. 500 is reserved for our own bugs.

use std::time::Duration;

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::Serialize;

use crate::{batcher::JobError, preprocess::PreprocessError};

/// An error answered to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable snake_case cause, e.g. `queue_full`.
    pub kind: &'static str,
    /// Human-readable message.
    pub message: String,
    /// When the client should try again (`Retry-After`, whole seconds), for 429 and 503.
    pub retry_after: Option<Duration>,
}

/// The [`ApiError::kind`] of an error response, kept in the response's extensions so that the
/// request log line can name it without parsing the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorType(pub &'static str);

/// The JSON error body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    #[schema(example = "the queue of model diracnet18 is full")]
    pub error: String,
    /// Stable cause: bad_request, unauthorized, not_found, payload_too_large,
    /// unsupported_media_type, not_an_image, too_many_pixels, decode_failed, queue_full,
    /// timeout, not_ready, shutting_down, internal.
    #[serde(rename = "type")]
    #[schema(example = "queue_full")]
    pub kind: String,
}

/// The error answers any inference route may give, for its OpenAPI `responses`: each body is
/// an [`ErrorBody`].
pub struct InferenceErrors;

impl utoipa::IntoResponses for InferenceErrors {
    fn responses() -> std::collections::BTreeMap<
        String,
        utoipa::openapi::RefOr<utoipa::openapi::response::Response>,
    > {
        use utoipa::openapi::{
            content::ContentBuilder, response::ResponseBuilder, Ref, ResponsesBuilder,
        };
        let error = |description: &str| {
            ResponseBuilder::new().description(description).content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
        };
        ResponsesBuilder::new()
            .response(
                "400",
                error("Malformed request, or an image that does not decode"),
            )
            .response("401", error("Missing or wrong API key (with --api-key)"))
            .response("404", error("Unknown model"))
            .response(
                "408",
                error("The body did not arrive within --body-timeout-s"),
            )
            .response(
                "413",
                error("Body, image count or image size over its limit"),
            )
            .response("415", error("Not an image, or an unsupported content type"))
            .response("429", error("Queue full; retry after Retry-After seconds"))
            .response(
                "503",
                error("Not ready, shutting down, or the deadline passed before computing"),
            )
            .build()
            .into()
    }
}

impl ApiError {
    /// An error with this status, kind and message.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400: malformed request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 404: unknown model or route.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 413: body over the byte limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than {limit} bytes"),
        )
    }

    /// 413: more images in one request than the queue can ever hold.
    pub fn too_many_images(n: usize, max: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_images",
            format!("{n} images in one request; at most {max} (the queue size)"),
        )
    }

    /// 415: content type we do not take.
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            message,
        )
    }

    /// 503: models still loading.
    pub fn not_ready() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "models are still loading",
        )
        .with_retry_after(Duration::from_secs(5))
    }

    /// 503: shutdown under way.
    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        )
        .with_retry_after(Duration::from_secs(1))
    }

    /// Sets `Retry-After` (rounded up to whole seconds, at least 1).
    #[must_use]
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The request's deadline passed before its images were computed (503).
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", message)
    }

    /// 500: a bug of ours.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// The `rejected_requests_total` reason this error counts as, if any.
    pub fn reject_reason(&self) -> Option<&'static str> {
        match self.kind {
            "queue_full" | "timeout" | "shutting_down" | "not_ready" => Some(self.kind),
            _ if self.status.is_client_error() => Some("bad_input"),
            _ => None,
        }
    }
}

impl From<PreprocessError> for ApiError {
    fn from(e: PreprocessError) -> Self {
        let status = match e {
            PreprocessError::TooManyPixels { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            PreprocessError::NotAnImage { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::BAD_REQUEST,
        };
        Self::new(status, e.kind(), e.to_string())
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            // The inference path replaces the hint with the model's estimate.
            JobError::QueueFull(_) => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", e.to_string())
                    .with_retry_after(Duration::from_secs(1))
            }
            JobError::Timeout(_) => Self::timeout(e.to_string()),
            JobError::ShuttingDown(_) => Self::shutting_down(),
            JobError::Inference(_) => Self::internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
            kind: self.kind.to_string(),
        };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(after) = self.retry_after {
            let seconds = after.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&seconds.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp.extensions_mut().insert(ErrorType(self.kind));
        resp
    }
}
