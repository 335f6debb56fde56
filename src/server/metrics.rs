//! Prometheus metrics (`GET /metrics`), prefix `diracnet_`.
//!
//! Each server owns its registry (no global recorder), so several servers can run in one process
//! — the integration tests do. Durations are real histograms with explicit buckets, which
//! autoscalers and `histogram_quantile` need (Triton's and TorchServe's defaults are not).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::{batcher::BatchObserver, model::Backend};

/// All server metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    rejected: IntCounterVec,
    request_duration: HistogramVec,
    preprocess_duration: HistogramVec,
    queue_duration: HistogramVec,
    inference_duration: HistogramVec,
    batch_size: HistogramVec,
    queue_depth: IntGaugeVec,
    images: IntCounterVec,
    model_info: IntGaugeVec,
    /// The same events summed per model for KServe's statistics extension
    /// (`/v2/models/{m}/stats`).
    stats: Arc<Mutex<HashMap<String, ModelStats>>>,
}

/// A count and the nanoseconds it took, summed (Triton's statistic duration).
#[derive(Debug, Default, Clone, Copy, serde::Serialize, utoipa::ToSchema)]
pub struct Duration64 {
    /// Events.
    pub count: u64,
    /// Their total time, nanoseconds.
    pub ns: u64,
}

impl Duration64 {
    fn add(&mut self, d: Duration) {
        self.count += 1;
        self.ns += u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    }
}

/// One model's inference statistics, in the terms of Triton's statistics extension.
#[derive(Debug, Default, Clone)]
pub struct ModelStats {
    /// Inference requests answered 2xx, and their time from arrival to answer.
    pub success: Duration64,
    /// Inference requests answered with an error, and their time.
    pub fail: Duration64,
    /// Time the requests' images waited in the batching queue (per request: its longest).
    pub queue: Duration64,
    /// Decoding and preprocessing, per request.
    pub compute_input: Duration64,
    /// The forward pass that computed each request.
    pub compute_infer: Duration64,
    /// Milliseconds since the epoch of the last successful inference request (0: none).
    pub last_inference_ms: u64,
    /// Images run through the model (`diracnet_images_classified_total`).
    pub inference_count: u64,
    /// Forward passes (`diracnet_batch_size`'s count).
    pub execution_count: u64,
    /// Forward passes and their time, by batch size.
    pub batches: BTreeMap<usize, Duration64>,
}

/// Seconds, 0.5 ms … 60 s, roughly ×1.5 per bucket.
fn duration_buckets() -> Vec<f64> {
    vec![
        0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
        0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0,
    ]
}

impl Metrics {
    /// Registers every metric; `max_batch_size` bounds the batch-size buckets.
    pub fn new(max_batch_size: usize) -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help).namespace("diracnet"), labels)
                .expect("valid counter");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help)
                    .namespace("diracnet")
                    .buckets(buckets),
                labels,
            )
            .expect("valid histogram");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let mut batch_buckets = vec![1.0];
        while (*batch_buckets.last().unwrap_or(&1.0) as usize) < max_batch_size {
            let next = batch_buckets.last().unwrap_or(&1.0) * 2.0;
            batch_buckets.push(next);
        }
        let requests = counter(
            "requests_total",
            "HTTP requests by model, route and status code.",
            &["model", "route", "code"],
        );
        let rejected = counter(
            "rejected_requests_total",
            "Inference requests refused, by reason (queue_full, timeout, bad_input, shutting_down, not_ready).",
            &["model", "reason"],
        );
        let images = counter(
            "images_classified_total",
            "Images run through the model.",
            &["model"],
        );
        let request_duration = histogram(
            "request_duration_seconds",
            "Inference request latency, from arrival to response.",
            &["model", "route"],
            duration_buckets(),
        );
        let preprocess_duration = histogram(
            "preprocess_duration_seconds",
            "Time spent decoding and preprocessing one image before it is queued (images that fail to decode included).",
            &["model"],
            duration_buckets(),
        );
        let queue_duration = histogram(
            "queue_duration_seconds",
            "Time an image waited in the batching queue.",
            &["model"],
            duration_buckets(),
        );
        let inference_duration = histogram(
            "inference_duration_seconds",
            "Forward pass time per batch.",
            &["model"],
            duration_buckets(),
        );
        let batch_size = histogram(
            "batch_size",
            "Images per forward pass.",
            &["model"],
            batch_buckets,
        );
        let queue_depth = IntGaugeVec::new(
            Opts::new("queue_depth", "Images waiting in the batching queue.").namespace("diracnet"),
            &["model"],
        )
        .expect("valid gauge");
        registry
            .register(Box::new(queue_depth.clone()))
            .expect("unique metric");
        let model_info = IntGaugeVec::new(
            Opts::new("model_info", "1 per model; the labels say how it computes.")
                .namespace("diracnet"),
            &["model", "dtype", "isa", "conv_impl", "device"],
        )
        .expect("valid gauge");
        registry
            .register(Box::new(model_info.clone()))
            .expect("unique metric");
        Self {
            registry,
            requests,
            rejected,
            request_duration,
            preprocess_duration,
            queue_duration,
            inference_duration,
            batch_size,
            queue_depth,
            images,
            model_info,
            stats: Arc::default(),
        }
    }

    /// Adds a finished inference request for `model` to its statistics: answered `ok` or not,
    /// after `total`, with its preprocessing, queue and inference times when it was computed.
    pub fn inference_request(
        &self,
        model: &str,
        ok: bool,
        total: Duration,
        timings: Option<(Duration, Duration, Duration)>,
    ) {
        let Ok(mut stats) = self.stats.lock() else {
            return;
        };
        let s = stats.entry(model.to_string()).or_default();
        if ok {
            s.success.add(total);
            s.last_inference_ms = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        } else {
            s.fail.add(total);
        }
        if let Some((preprocess, queue, inference)) = timings {
            s.compute_input.add(preprocess);
            s.queue.add(queue);
            s.compute_infer.add(inference);
        }
    }

    /// The statistics of `model` so far (a served model: the name makes its series).
    pub fn model_stats(&self, model: &str) -> ModelStats {
        let mut s = self
            .stats
            .lock()
            .ok()
            .and_then(|s| s.get(model).cloned())
            .unwrap_or_default();
        // Counted once, by the Prometheus series.
        s.inference_count = self.images.with_label_values(&[model]).get();
        s.execution_count = self
            .batch_size
            .with_label_values(&[model])
            .get_sample_count();
        s
    }

    /// Counts a finished HTTP request.
    pub fn request(&self, model: &str, route: &str, code: u16) {
        self.requests
            .with_label_values(&[model, route, &code.to_string()])
            .inc();
    }

    /// Records an inference request's latency.
    pub fn request_duration(&self, model: &str, route: &str, d: Duration) {
        self.request_duration
            .with_label_values(&[model, route])
            .observe(d.as_secs_f64());
    }

    /// Records one image's decoding and preprocessing time.
    pub fn preprocess_duration(&self, model: &str, d: Duration) {
        self.preprocess_duration
            .with_label_values(&[model])
            .observe(d.as_secs_f64());
    }

    /// Counts a refused inference request.
    pub fn rejected(&self, model: &str, reason: &str) {
        self.rejected.with_label_values(&[model, reason]).inc();
    }

    /// Sets the queue-depth gauge of `model`.
    pub fn set_queue_depth(&self, model: &str, depth: usize) {
        self.queue_depth
            .with_label_values(&[model])
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    /// Makes every per-model series exist from the start (at zero), and `model_info` say how
    /// `model` computes on `backend`.
    pub fn init_model(&self, model: &str, backend: &Backend) {
        self.model_info
            .with_label_values(&[
                model,
                backend.dtype_name(),
                backend.isa().unwrap_or("none"),
                &backend.conv_description(),
                &crate::device::describe(backend.device()),
            ])
            .set(1);
        self.queue_depth.with_label_values(&[model]).set(0);
        self.images.with_label_values(&[model]);
        for reason in [
            "queue_full",
            "timeout",
            "bad_input",
            "shutting_down",
            "not_ready",
        ] {
            self.rejected.with_label_values(&[model, reason]);
        }
    }

    /// The batcher's observer for `model`.
    pub fn observer(&self, model: &str) -> Arc<dyn BatchObserver> {
        Arc::new(ModelObserver {
            model: model.to_string(),
            metrics: self.clone(),
        })
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let families = self.registry.gather();
        if TextEncoder::new().encode(&families, &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

struct ModelObserver {
    model: String,
    metrics: Metrics,
}

impl BatchObserver for ModelObserver {
    fn batch_done(&self, size: usize, inference: Duration, queue_times: &[Duration]) {
        let m = &self.metrics;
        let l = &[self.model.as_str()];
        m.batch_size.with_label_values(l).observe(size as f64);
        m.inference_duration
            .with_label_values(l)
            .observe(inference.as_secs_f64());
        m.images.with_label_values(l).inc_by(size as u64);
        let q = m.queue_duration.with_label_values(l);
        for t in queue_times {
            q.observe(t.as_secs_f64());
        }
        if let Ok(mut stats) = m.stats.lock() {
            let s = stats.entry(self.model.clone()).or_default();
            s.batches.entry(size).or_default().add(inference);
        }
    }

    fn abandoned(&self) {
        tracing::debug!(model = %self.model, "dropped a queued image whose client went away");
    }
}
