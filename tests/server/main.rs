//! `diracnet serve` end to end on 127.0.0.1: every input mode and error, batching under
//! concurrency, queue limits, deadlines, KServe v2, metrics, and SIGTERM draining.
//!
//! - `support.rs`: the in-process test server, its configuration and models, and readers of
//!   its answers (JSON, predictions, metrics);
//! - `classify.rs`: the classify routes, every input mode and error, the API key;
//! - `batching.rs`: batching under concurrency, the queue limit (429), deadlines (503);
//! - `kserve.rs`: the KServe v2 routes;
//! - `limits.rs`: admission before decoding, cancellation, connection timeouts and cap, body
//!   limits, the drain's `Connection: close` and its timeout, truncated JPEGs;
//! - `ops.rs`: `/metrics`, `/info`, `/openapi.json`, `/docs/`, and draining on SIGTERM;
//! - `page.rs`: the web page at `/` in headless Chromium.

#[path = "../common/mod.rs"]
mod common;

mod batching;
mod classify;
mod kserve;
mod limits;
mod ops;
mod page;
mod support;
