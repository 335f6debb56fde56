//! Request bodies: read whole, within a size and a time, before an inference handler runs.
//!
//! * A `Content-Length` over `--max-body-bytes` is refused (413) before a byte of the body is
//!   read; a body without one (chunked) is refused as soon as it passes the limit.
//! * The whole body must arrive within `--body-timeout-s` of the handler being reached, however
//!   it is sent: a client that sends a byte every two seconds cannot hold the request open for
//!   ever (408). The bound is on the whole body, not on the gap between bytes.
//!
//! The request counts as in flight for the drain from here on: a body still arriving holds the
//! shutdown open (within its timeout), and once draining a new request gets 503 before its body
//! is read.
//!
//! These answers carry `Connection: close`: the rest of the body is never read, so the connection
//! cannot carry another request. The middleware sits behind the API key check, so an
//! unauthorised client never gets its body read at all.

use std::{pin::Pin, sync::Arc};

use axum::{
    body::{Body, Bytes, HttpBody},
    extract::{Request, State},
    http::{header, HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::{error::ApiError, AppState};

/// Reads the request body whole (see the module docs), then runs the handler with it.
pub async fn read_whole_body(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    // In flight from now: a request whose body is still arriving holds the drain open (up to
    // the body timeout). Once draining, a new request is refused before its body is read.
    let Some(_in_flight) = state.begin_inference() else {
        return closing(ApiError::shutting_down());
    };
    let max = state.config.max_body_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return closing(ApiError::too_large(max));
    }
    let (parts, body) = request.into_parts();
    let capacity = declared.map_or(0, |n| n as usize);
    let read = tokio::time::timeout(state.config.body_timeout, collect(body, max, capacity));
    match read.await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(e)) => closing(e),
        Err(_) => closing(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body did not arrive within {} s",
                state.config.body_timeout.as_secs_f64()
            ),
        )),
    }
}

/// The body's bytes, at most `max` of them (413 beyond).
async fn collect(mut body: Body, max: usize, capacity: usize) -> Result<Bytes, ApiError> {
    let mut bytes = Vec::with_capacity(capacity.min(max));
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > max {
                return Err(ApiError::too_large(max));
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(bytes))
}

/// `error` as a response that closes the connection.
fn closing(error: ApiError) -> Response {
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}
