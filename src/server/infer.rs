//! The one inference path. Every inference route calls [`serve`] with its request, and [`serve`]
//! does everything between the protocol's parsing and its formatting:
//!
//! ```text
//! [body::read_whole_body: in flight for the drain (503 once shutting down), body read whole]
//!   → Protocol::precheck   what the router already parsed (the query string)
//!   → readiness            503 while loading
//!   → Protocol::parse      which model, which images, what to answer (the protocol's part)
//!   → reserve              places in the model's queue for the images: 429 at once when full,
//!                          before any image is decoded (base64 and JSON parsing come before);
//!                          the batcher waits up to max_batch_delay for reserved images
//!   → preprocess           image files → network inputs, one image at a time on the
//!                          preprocessing pool, each admitted against the memory budget
//!                          ([`super::preprocessing`]); stops between images when the client
//!                          has gone or the deadline has passed (503)
//!   → batch                queue, batch, compute, each image's logits; an image still queued
//!                          at the deadline is never computed (503)
//!   → Protocol::respond    the answer (the protocol's part)
//!   → outcome              latency or rejection reason in the metrics, the model label for the
//!                          request counter
//! ```
//!
//! A route is a [`Protocol`]: `POST /classify` ([`super::classify`]) and KServe v2's `infer`
//! ([`super::kserve`]) are the two today. Adding another (a web page's upload, an embedding
//! output) is writing its `parse` and `respond`.

use std::{
    future::Future,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use axum::{
    body::Bytes,
    http::{HeaderMap, HeaderValue},
    response::{IntoResponse, Response},
};

use super::{error::ApiError, AppState, ServeConfig, ServedModel};
use crate::{batcher::JobError, classifier::Classifier};

/// The images of one request, as its protocol delivered them.
#[derive(Debug)]
pub enum Inputs {
    /// Image files (JPEG, PNG, ...): decoded and preprocessed by [`serve`].
    Encoded(Vec<Bytes>),
    /// Network inputs already preprocessed by the client, [`crate::tensor::INPUT_LEN`] values
    /// each.
    Preprocessed(Vec<Vec<f32>>),
}

impl Inputs {
    /// Number of images.
    pub fn len(&self) -> usize {
        match self {
            Self::Encoded(files) => files.len(),
            Self::Preprocessed(rows) => rows.len(),
        }
    }

    /// True when there is no image.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A parsed inference request: the model, the images, and what the protocol needs to write its
/// answer (`A`: e.g. top-k, the outputs asked for).
pub struct Call<A> {
    /// The model to run (from [`Context::model`]).
    pub model: ServedModel,
    /// The images.
    pub inputs: Inputs,
    /// Handed to [`Protocol::respond`].
    pub answer: A,
}

/// What the model made of a request's images.
#[derive(Debug, Clone)]
pub struct Inferred {
    /// Logits, one row per image, in input order.
    pub logits: Vec<Vec<f32>>,
    /// Embeddings (the pooled features the classifier reads), one row per image.
    pub embeddings: Vec<Vec<f32>>,
    /// Decoding and preprocessing, all images together (zero for preprocessed input).
    pub preprocess: Duration,
    /// The longest wait of an image in the queue.
    pub queue: Duration,
    /// The longest forward pass an image ran in.
    pub inference: Duration,
}

impl Inferred {
    /// The timings as response headers: `x-preprocess-time-ms`, `x-queue-time-ms`,
    /// `x-inference-time-ms` (milliseconds, 3 decimals).
    pub fn insert_timing_headers(&self, headers: &mut HeaderMap) {
        for (name, d) in [
            ("x-preprocess-time-ms", self.preprocess),
            ("x-queue-time-ms", self.queue),
            ("x-inference-time-ms", self.inference),
        ] {
            if let Ok(v) = HeaderValue::from_str(&format!("{:.3}", d.as_secs_f64() * 1000.0)) {
                headers.insert(name, v);
            }
        }
    }
}

/// What a protocol may consult while it parses: the served models and the configuration.
pub struct Context<'a> {
    models: &'a [ServedModel],
    chosen: &'a OnceLock<String>,
    /// The server's configuration (body and queue limits).
    pub config: &'a ServeConfig,
}

impl Context<'_> {
    /// The model called `name`, or the first one; it becomes the request's model in the
    /// metrics (only a served model's name does: client input must not mint series).
    pub fn model(&self, name: Option<&str>) -> Result<ServedModel, ApiError> {
        let found = find_model(self.models, name)?;
        let _ = self.chosen.set(found.classifier.name.clone());
        Ok(found.clone())
    }
}

/// The model called `name`, or the first one.
pub fn find_model<'a>(
    models: &'a [ServedModel],
    name: Option<&str>,
) -> Result<&'a ServedModel, ApiError> {
    match name {
        None => models
            .first()
            .ok_or_else(|| ApiError::not_found("no model is served")),
        Some(n) => models
            .iter()
            .find(|m| m.classifier.name == n)
            .ok_or_else(|| {
                let known: Vec<&str> = models.iter().map(|m| m.classifier.name.as_str()).collect();
                ApiError::not_found(format!("unknown model {n:?}; served: {}", known.join(", ")))
            }),
    }
}

/// An inference route's protocol: how to read its requests and write its answers.
pub trait Protocol: Send + Sized {
    /// What [`Protocol::parse`] hands on to [`Protocol::respond`].
    type Answer: Send;

    /// The route as the metrics label it, e.g. `/classify`.
    fn route(&self) -> &'static str;

    /// Refuses what is wrong with the request before readiness is even looked at: the parts
    /// the router has already parsed (a malformed query string). By default nothing.
    fn precheck(&self) -> Result<(), ApiError> {
        Ok(())
    }

    /// Reads the request: which model (through [`Context::model`]), which images, and the
    /// options of the answer, checked against the model. Runs after the body was read, before any
    /// image is decoded.
    fn parse(
        self,
        context: &Context<'_>,
    ) -> impl Future<Output = Result<Call<Self::Answer>, ApiError>> + Send;

    /// Writes the answer.
    fn respond(answer: Self::Answer, model: &Classifier, inferred: Inferred) -> Response;
}

/// What an inference request came to, attached to its response for the middleware that counts
/// and logs requests ([`super::routes`]).
#[derive(Debug, Clone, Default)]
pub struct InferenceSummary {
    /// The served model the request was for (empty before one was chosen).
    pub model: String,
    /// Images in the request (0 before it was parsed).
    pub images: usize,
    /// Preprocessing, queue and inference times, when the request was computed.
    pub timings: Option<(Duration, Duration, Duration)>,
}

/// Runs one inference request through `protocol` (see the module docs).
pub async fn serve<P: Protocol>(state: &Arc<AppState>, request: P) -> Response {
    let arrived = Instant::now();
    let route = request.route();
    let chosen = OnceLock::new();
    let result = run(state, request, arrived, &chosen).await;
    let model = chosen.into_inner().unwrap_or_default();
    let mut summary = InferenceSummary {
        model: model.clone(),
        ..InferenceSummary::default()
    };
    let mut response = match result {
        Ok((r, images, timings)) => {
            summary.images = images;
            summary.timings = Some(timings);
            state
                .metrics
                .request_duration(&model, route, arrived.elapsed());
            r
        }
        Err(e) => {
            if let Some(reason) = e.reject_reason() {
                state.metrics.rejected(&model, reason);
            }
            e.into_response()
        }
    };
    response.extensions_mut().insert(summary);
    response
}

async fn run<P: Protocol>(
    state: &AppState,
    request: P,
    arrived: Instant,
    chosen: &OnceLock<String>,
) -> Result<(Response, usize, (Duration, Duration, Duration)), ApiError> {
    request.precheck()?;
    let models = state.models().ok_or_else(ApiError::not_ready)?;
    let context = Context {
        models,
        chosen,
        config: &state.config,
    };
    let Call {
        model,
        inputs,
        answer,
    } = request.parse(&context).await?;
    // Admission first: places in the queue before any image is decoded, so a full queue costs
    // a refused request nothing but its parsing.
    let batcher = &model.batcher;
    // One rule for the hint, whoever refused: a full queue or a passed deadline (in the
    // preprocessing or in the queue) is told when the queue should have room again.
    let hint = |e: ApiError| match e.kind {
        "queue_full" | "timeout" => e.with_retry_after(batcher.retry_after()),
        _ => e,
    };
    let queue_error = |e: JobError| hint(ApiError::from(e));
    let reservation = batcher.reserve(inputs.len()).map_err(queue_error)?;
    let deadline = arrived + state.config.request_timeout;
    let (rows, preprocess) = match inputs {
        Inputs::Encoded(files) => {
            let name = &model.classifier.name;
            let mut total = Duration::ZERO;
            let rows = state
                .preprocessing
                .run(files, deadline, |t| {
                    state.metrics.preprocess_duration(name, t);
                    total += t;
                })
                .await
                .map_err(hint)?;
            (rows, total)
        }
        Inputs::Preprocessed(rows) => (rows, Duration::ZERO),
    };
    let outputs = batcher
        .run(rows, deadline, reservation)
        .await
        .map_err(queue_error)?;
    let longest = |time: fn(&crate::batcher::JobOutput) -> Duration| {
        outputs.iter().map(time).max().unwrap_or_default()
    };
    // Each row is the image's logits, then its embedding (`Classifier::outputs`).
    let (logits, embeddings) = outputs
        .iter()
        .map(|o| {
            let (l, e) = model.classifier.split_outputs(&o.row);
            (l.to_vec(), e.to_vec())
        })
        .unzip();
    let inferred = Inferred {
        queue: longest(|o| o.queue_time),
        inference: longest(|o| o.inference_time),
        preprocess,
        logits,
        embeddings,
    };
    let (images, timings) = (
        inferred.logits.len(),
        (inferred.preprocess, inferred.queue, inferred.inference),
    );
    Ok((
        P::respond(answer, &model.classifier, inferred),
        images,
        timings,
    ))
}
