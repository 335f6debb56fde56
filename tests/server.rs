//! `diracnet serve` end to end on 127.0.0.1: every input mode and error, batching under
//! concurrency, queue limits, deadlines, KServe v2, metrics, and SIGTERM draining.

use std::{
    collections::BTreeMap,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use base64::Engine;
use diracnet::{
    device::DeviceSpec,
    model::Architecture,
    npy,
    registry::{ModelSpec, Registry},
    server::{self, ServeConfig},
    weights::{convert::write_safetensors, WeightsOptions},
};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::oneshot,
};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn image(name: &str) -> Vec<u8> {
    std::fs::read(fixture(&format!("images/{name}"))).unwrap()
}

/// A folded DiracNet with random weights (deterministic), big enough that a forward pass takes
/// milliseconds: for queue and shutdown tests.
fn medium_model(dir: &Path) -> PathBuf {
    let arch = Architecture {
        stem_width: 32,
        widths: vec![32, 64, 128, 256],
        blocks: vec![2, 2, 2, 2],
        classes: 1000,
    };
    let tensors = arch.random_weights(7);
    let path = dir.join("medium.safetensors");
    write_safetensors(&path, &tensors, BTreeMap::new()).unwrap();
    path
}

fn config(models: &[&str], cache: &Path) -> ServeConfig {
    let registry = Registry::builtin().unwrap();
    let models = models
        .iter()
        .map(|m| ModelSpec::parse(m, &registry).unwrap())
        .collect();
    let weights = WeightsOptions {
        cache: diracnet::weights::cache::CacheLayout {
            root: cache.to_path_buf(),
        },
        offline: true,
        progress: false,
        torch_hub_dir: None,
    };
    ServeConfig {
        device: DeviceSpec::Cpu,
        ..ServeConfig::new(models, weights)
    }
}

struct TestServer {
    base: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), server::ServeError>>,
    _cache: tempfile::TempDir,
}

impl TestServer {
    async fn start(make: impl FnOnce(&Path) -> ServeConfig) -> Self {
        let cache = tempfile::tempdir().unwrap();
        let config = make(cache.path());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(config, listener, async {
            let _ = stopped.await;
        }));
        let s = Self {
            base: format!("http://{addr}"),
            stop: Some(stop),
            task,
            _cache: cache,
        };
        s.wait_ready().await;
        s
    }

    async fn wait_ready(&self) {
        let c = Client::new();
        for _ in 0..600 {
            if let Ok(r) = c.get(self.url("/readyz")).send().await {
                if r.status() == StatusCode::OK {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("server did not become ready");
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stops the server; the drain must finish well inside the shutdown timeout.
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("drain took longer than 10 s")
            .unwrap()
            .unwrap();
    }
}

fn dn18() -> String {
    fixture("models/dn18w16_v03.pth").display().to_string()
}

async fn json_of(r: reqwest::Response) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let status = r.status();
    let headers = r.headers().clone();
    let body = r.bytes().await.unwrap();
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body)));
    (status, headers, v)
}

fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "diracnet-test-boundary-7MA4YWxk";
    let mut body = Vec::new();
    for (name, file, data) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match file {
            Some(f) => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Best class and its score; scores compare within 1e-5 relative (batch sizes may change the
/// last bits of a CPU GEMM).
#[derive(Debug)]
struct Top(u64, f64);

impl PartialEq for Top {
    fn eq(&self, o: &Self) -> bool {
        self.0 == o.0 && (self.1 - o.1).abs() <= 1e-5 * o.1.abs().max(1e-6)
    }
}

fn top(v: &Value) -> Top {
    let p = &v["predictions"][0];
    Top(p["index"].as_u64().unwrap(), p["score"].as_f64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_input_mode_gives_the_same_answer() {
    let s = TestServer::start(|c| config(&[&dn18()], c)).await;
    let c = Client::new();
    let jpg = image("chelsea.jpg");
    let png = image("camera_gray.png");
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);

    // Raw body, POST and PUT (curl -T), image/* and octet-stream.
    let (st, h, raw) = json_of(
        c.post(s.url("/classify?top_k=3"))
            .header("content-type", "image/jpeg")
            .body(jpg.clone())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{raw}");
    assert_eq!(raw["model"], "dn18w16_v03");
    assert_eq!(raw["predictions"].as_array().unwrap().len(), 3);
    assert!(raw["predictions"][0]["label"].is_string());
    assert!(h.contains_key("x-request-id"));
    for name in [
        "x-preprocess-time-ms",
        "x-queue-time-ms",
        "x-inference-time-ms",
    ] {
        let v: f64 = h[name].to_str().unwrap().parse().unwrap();
        assert!(v >= 0.0, "{name}");
    }
    // Decoding a JPEG is never free.
    let pre: f64 = h["x-preprocess-time-ms"].to_str().unwrap().parse().unwrap();
    assert!(pre > 0.0, "x-preprocess-time-ms {pre}");
    for (method, ct) in [("PUT", "image/jpeg"), ("POST", "application/octet-stream")] {
        let r = c
            .request(
                method.parse().unwrap(),
                s.url("/models/dn18w16_v03/classify"),
            )
            .header("content-type", ct)
            .header("x-request-id", "my-id-42")
            .body(jpg.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-request-id"], "my-id-42");
        let (st, _, v) = json_of(r).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(top(&v), top(&raw));
        assert_eq!(v["predictions"].as_array().unwrap().len(), 5);
    }

    // Multipart: one file → single form; two files → results in order.
    let (ct, body) = multipart(&[("file", Some("cat.jpg"), &jpg)]);
    let (st, _, v) = json_of(
        c.post(s.url("/classify"))
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(top(&v), top(&raw));
    let (ct, body) = multipart(&[
        ("a", Some("cat.jpg"), &jpg),
        ("b", Some("grey.png"), &png),
        ("top_k", None, b"2"),
    ]);
    let (st, _, multi) = json_of(
        c.post(s.url("/classify"))
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{multi}");
    let results = multi["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["predictions"].as_array().unwrap().len(), 2);
    assert_eq!(top(&results[0]), top(&raw));

    // JSON: image and images (with a data URL), model and top_k in the body.
    let (st, _, v) = json_of(
        c.post(s.url("/classify"))
            .header("content-type", "application/json")
            .body(json!({"image": b64(&jpg), "top_k": 1, "model": "dn18w16_v03"}).to_string())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["predictions"].as_array().unwrap().len(), 1);
    assert_eq!(top(&v), top(&raw));
    let (st, _, v) = json_of(
        c.post(s.url("/classify"))
            .header("content-type", "application/json")
            .body(
                json!({"images": [format!("data:image/png;base64,{}", b64(&png)), b64(&jpg)]})
                    .to_string(),
            )
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(top(&v["results"][0]), top(&results[1]));
    assert_eq!(top(&v["results"][1]), top(&raw));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_json_with_the_right_status() {
    let s = TestServer::start(|c| {
        let mut cfg = config(&[&dn18()], c);
        cfg.max_body_bytes = 200_000;
        cfg.max_pixels = 200 * 200;
        cfg
    })
    .await;
    let c = Client::new();
    let jpg = image("chelsea.jpg"); // 449x300: over the 40,000-pixel limit
    let small = image("tiny_5x7.png");
    let check = |expect: StatusCode, kind: &'static str| {
        move |(st, h, v): (StatusCode, reqwest::header::HeaderMap, Value)| {
            assert_eq!(st, expect, "{v}");
            assert_eq!(v["type"], kind, "{v}");
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
            h
        }
    };
    let post = |path: &str, ct: Option<&str>, body: Vec<u8>| {
        let mut r = c.post(s.url(path)).body(body);
        if let Some(ct) = ct {
            r = r.header("content-type", ct.to_string());
        }
        async move { json_of(r.send().await.unwrap()).await }
    };
    check(StatusCode::BAD_REQUEST, "bad_request")(
        post(
            "/classify",
            Some("application/json"),
            b"{\"image\": ".to_vec(),
        )
        .await,
    );
    check(StatusCode::BAD_REQUEST, "bad_request")(
        post(
            "/classify",
            Some("application/json"),
            br#"{"image": "***"}"#.to_vec(),
        )
        .await,
    );
    check(StatusCode::BAD_REQUEST, "bad_request")(
        post(
            "/classify",
            Some("application/json"),
            br#"{"nothing": 1}"#.to_vec(),
        )
        .await,
    );
    check(StatusCode::BAD_REQUEST, "bad_request")(
        post(
            "/classify",
            Some("multipart/form-data; boundary=x"),
            b"garbage".to_vec(),
        )
        .await,
    );
    check(StatusCode::BAD_REQUEST, "bad_request")(
        post("/classify?top_k=0", Some("image/png"), small.clone()).await,
    );
    check(StatusCode::BAD_REQUEST, "bad_request")(
        post("/classify?top_k=1001", Some("image/png"), small.clone()).await,
    );
    check(StatusCode::BAD_REQUEST, "decode_failed")(
        post(
            "/classify",
            Some("image/png"),
            small[..small.len() / 2].to_vec(),
        )
        .await,
    );
    check(StatusCode::NOT_FOUND, "not_found")(
        post("/models/nope/classify", Some("image/png"), small.clone()).await,
    );
    check(StatusCode::NOT_FOUND, "not_found")(
        post("/classify?model=nope", Some("image/png"), small.clone()).await,
    );
    check(StatusCode::NOT_FOUND, "not_found")(
        json_of(c.get(s.url("/no/such/route")).send().await.unwrap()).await,
    );
    check(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")(
        json_of(c.get(s.url("/classify")).send().await.unwrap()).await,
    );
    check(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")(
        post("/classify", Some("image/jpeg"), vec![0xFF; 200_001]).await,
    );
    check(StatusCode::PAYLOAD_TOO_LARGE, "too_many_pixels")(
        post("/classify", Some("image/jpeg"), jpg.clone()).await,
    );
    check(StatusCode::UNSUPPORTED_MEDIA_TYPE, "not_an_image")(
        post("/classify", Some("image/png"), b"hello, world".to_vec()).await,
    );
    check(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")(
        post("/classify", Some("text/plain"), small.clone()).await,
    );
    check(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")(
        post("/classify", None, small.clone()).await,
    );
    // The server still works after all that.
    let (st, _, _) = post("/classify", Some("image/png"), small.clone()).await;
    assert_eq!(st, StatusCode::OK);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_guards_inference_only() {
    let s = TestServer::start(|c| {
        let mut cfg = config(&[&dn18()], c);
        cfg.api_key = Some("s3cret".into());
        cfg
    })
    .await;
    let c = Client::new();
    let small = image("tiny_5x7.png");
    for auth in [None, Some("Bearer wrong"), Some("s3cret")] {
        let mut r = c
            .post(s.url("/classify"))
            .header("content-type", "image/png")
            .body(small.clone());
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let (st, _, v) = json_of(r).await;
        assert_eq!(
            (st, v["type"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("unauthorized"))
        );
    }
    let r = c
        .post(s.url("/classify"))
        .header("content-type", "image/png")
        .header("authorization", "Bearer s3cret")
        .body(small)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = c
        .post(s.url("/v2/models/dn18w16_v03/infer"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    for open in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/info",
        "/v2/health/ready",
        "/openapi.json",
    ] {
        assert_eq!(
            c.get(s.url(open)).send().await.unwrap().status(),
            StatusCode::OK,
            "{open}"
        );
    }
    s.stop().await;
}

async fn metric(c: &Client, s: &TestServer, name: &str) -> f64 {
    metric_at(c, &s.base, name).await
}

/// The sum of the samples of series `name` (e.g. `x_total{model="m"}`).
async fn metric_at(c: &Client, base: &str, name: &str) -> f64 {
    let text = c
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(' ').next() == Some(name))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_batched_and_each_answer_is_right() {
    let dir = tempfile::tempdir().unwrap();
    let medium = medium_model(dir.path());
    let m = format!("m={}", medium.display());
    let s = TestServer::start(|c| config(&[&m], c)).await;
    let c = Client::new();
    let files = [
        "chelsea.jpg",
        "camera_gray.png",
        "coffee_rgba.png",
        "rocket_exif6.jpg",
    ];
    // Each image alone first: the reference answers.
    let mut single = Vec::new();
    for f in files {
        let (st, _, v) = json_of(
            c.post(s.url("/classify?top_k=5"))
                .header("content-type", "application/octet-stream")
                .body(image(f))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        single.push(v);
    }
    let batches_before = metric(&c, &s, "diracnet_batch_size_count{model=\"m\"}").await;
    let requests: Vec<_> = (0..64)
        .map(|i| {
            let c = c.clone();
            let url = s.url("/classify?top_k=5");
            let f = files[i % files.len()];
            tokio::spawn(async move {
                let r = c
                    .post(url)
                    .header("content-type", "application/octet-stream")
                    .body(image(f))
                    .send()
                    .await
                    .unwrap();
                (i, json_of(r).await)
            })
        })
        .collect();
    for r in requests {
        let (i, (st, _, v)) = r.await.unwrap();
        assert_eq!(st, StatusCode::OK, "{v}");
        let want = &single[i % files.len()]["predictions"];
        let got = &v["predictions"];
        assert_eq!(
            got.as_array().unwrap().len(),
            want.as_array().unwrap().len()
        );
        for (a, b) in got.as_array().unwrap().iter().zip(want.as_array().unwrap()) {
            assert_eq!(a["index"], b["index"], "request {i}");
            let (x, y) = (a["score"].as_f64().unwrap(), b["score"].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-5 * y.max(1e-3),
                "request {i}: {x} vs {y}"
            );
        }
    }
    let batches = metric(&c, &s, "diracnet_batch_size_count{model=\"m\"}").await - batches_before;
    let images = metric(&c, &s, "diracnet_images_classified_total{model=\"m\"}").await;
    println!("64 concurrent requests ran in {batches} batches");
    assert!(
        batches < 64.0,
        "no request was batched with another ({batches} batches)"
    );
    assert_eq!(images, 64.0 + files.len() as f64 + 0.0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_and_every_accepted_request_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let medium = medium_model(dir.path());
    let m = format!("m={}", medium.display());
    let s = TestServer::start(|c| {
        let mut cfg = config(&[&m], c);
        cfg.batch.max_queue = 2;
        cfg.batch.max_batch_size = 1;
        cfg
    })
    .await;
    let c = Client::new();
    let jpg = image("chelsea.jpg");
    let requests: Vec<_> = (0..40)
        .map(|_| {
            let (c, url, body) = (c.clone(), s.url("/classify"), jpg.clone());
            tokio::spawn(async move {
                let r = c
                    .post(url)
                    .header("content-type", "image/jpeg")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let retry = r.headers().get("retry-after").cloned();
                (json_of(r).await, retry)
            })
        })
        .collect();
    let (mut ok, mut full) = (0, 0);
    for r in requests {
        let ((st, _, v), retry) = r.await.unwrap();
        match st {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(v["type"], "queue_full");
                assert_eq!(retry.unwrap(), "1");
                full += 1;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    println!("{ok} answered, {full} refused with 429");
    assert!(full > 0 && ok > 0);
    assert_eq!(
        metric(
            &c,
            &s,
            "diracnet_rejected_requests_total{model=\"m\",reason=\"queue_full\"}"
        )
        .await,
        f64::from(full)
    );
    assert_eq!(
        metric(&c, &s, "diracnet_images_classified_total{model=\"m\"}").await,
        f64::from(ok)
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_in_the_queue_gets_503_and_is_never_computed() {
    let dir = tempfile::tempdir().unwrap();
    let medium = medium_model(dir.path());
    let m = format!("m={}", medium.display());
    let s = TestServer::start(|c| {
        let mut cfg = config(&[&m], c);
        cfg.batch.max_batch_size = 1;
        cfg.request_timeout = Duration::from_millis(1000);
        cfg
    })
    .await;
    let c = Client::new();
    // Tiny images decode in microseconds, so the deadline is spent in the queue: 128 of them
    // keep a batch-size-1 model busy far past 1 s (≈ 75 ms each here, slower on a loaded CI
    // machine); the first ones are computed, the rest expire.
    let b64 = base64::engine::general_purpose::STANDARD.encode(image("tiny_5x7.png"));
    let body = json!({ "images": vec![b64; 128] }).to_string();
    let (st, _, v) = json_of(
        c.post(s.url("/classify"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (st, v["type"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("timeout")),
        "{v}"
    );
    // At the 503, at most the image in the model (batch size 1) may still complete; the rest
    // were withdrawn and must never be computed.
    let at_503 = metric(&c, &s, "diracnet_images_classified_total{model=\"m\"}").await;
    eventually(|| {
        let (c, base) = (c.clone(), s.base.clone());
        async move { metric_at(&c, &base, "diracnet_queue_depth{model=\"m\"}").await == 0.0 }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let computed = metric(&c, &s, "diracnet_images_classified_total{model=\"m\"}").await;
    println!("{computed} of 128 images computed ({at_503} when the 503 was sent)");
    assert!(computed <= at_503 + 1.0, "expired images were computed");
    assert!((1.0..128.0).contains(&computed), "{computed}");
    assert_eq!(
        metric(
            &c,
            &s,
            "diracnet_rejected_requests_total{model=\"m\",reason=\"timeout\"}"
        )
        .await,
        1.0
    );
    s.stop().await;
}

/// What `promtool check metrics` checks of the text format, enough to catch a broken exposition.
fn check_exposition(text: &str) -> Result<usize, String> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helps = std::collections::BTreeSet::new();
    let mut samples = 0;
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or("");
            if !helps.insert(name.to_string()) {
                return Err(format!("HELP twice for {name}"));
            }
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (name, kind) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(format!("bad type {kind}"));
            }
            if kind == "counter" && !name.ends_with("_total") {
                return Err(format!("counter {name} lacks _total"));
            }
            types.insert(name.to_string(), kind.to_string());
        } else if line.starts_with('#') || line.is_empty() {
            continue;
        } else {
            let (series, value) = line.rsplit_once(' ').ok_or(format!("no value: {line}"))?;
            value
                .parse::<f64>()
                .map_err(|_| format!("bad value: {line}"))?;
            let name = series.split('{').next().unwrap_or("");
            if !valid_name(name) {
                return Err(format!("bad name: {line}"));
            }
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|b| types.get(*b).is_some_and(|t| t == "histogram"))
                })
                .unwrap_or(name);
            if !types.contains_key(base) {
                return Err(format!("sample before its TYPE: {line}"));
            }
            if series.contains('{') && !series.ends_with('}') {
                return Err(format!("bad labels: {line}"));
            }
            samples += 1;
        }
    }
    Ok(samples)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count() {
    let s = TestServer::start(|c| config(&[&dn18()], c)).await;
    let c = Client::new();
    c.post(s.url("/classify"))
        .header("content-type", "image/png")
        .body(image("tiny_5x7.png"))
        .send()
        .await
        .unwrap();
    let r = c.get(s.url("/metrics")).send().await.unwrap();
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = r.text().await.unwrap();
    let samples = check_exposition(&text).unwrap();
    assert!(samples > 20);
    for name in [
        "diracnet_requests_total",
        "diracnet_rejected_requests_total",
        "diracnet_request_duration_seconds",
        "diracnet_preprocess_duration_seconds",
        "diracnet_queue_duration_seconds",
        "diracnet_inference_duration_seconds",
        "diracnet_batch_size",
        "diracnet_queue_depth",
        "diracnet_images_classified_total",
    ] {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
    }
    assert!(text.contains(
        "diracnet_requests_total{code=\"200\",model=\"dn18w16_v03\",route=\"/classify\"} 1"
    ));
    assert!(text.contains("diracnet_request_duration_seconds_bucket{model=\"dn18w16_v03\",route=\"/classify\",le=\"+Inf\"} 1"));
    assert!(text.contains("diracnet_preprocess_duration_seconds_count{model=\"dn18w16_v03\"} 1"));
    assert!(check_exposition("# TYPE x_total counter\nx_total{a=\"1\" 2\n").is_err());
    assert!(check_exposition("y 1\n").is_err());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_v2_matches_pytorch_and_the_classify_route() {
    let s = TestServer::start(|c| config(&[&dn18()], c)).await;
    let c = Client::new();
    let (st, _, meta) = json_of(c.get(s.url("/v2")).send().await.unwrap()).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(meta["extensions"], json!(["classification"]));
    assert_eq!(
        c.get(s.url("/v2/health/live"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        c.get(s.url("/v2/health/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        c.get(s.url("/v2/models/dn18w16_v03/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        c.get(s.url("/v2/models/nope/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    let (_, _, m) = json_of(c.get(s.url("/v2/models/dn18w16_v03")).send().await.unwrap()).await;
    assert_eq!(m["name"], "dn18w16_v03");
    assert_eq!(m["outputs"][0]["shape"], json!([-1, 1000]));

    // FP32 input: the reference inputs; logits equal PyTorch's (as the CLI's are).
    let inputs = npy::read_f32(&fixture("reference/inputs.npy")).unwrap();
    let want = npy::read_f32(&fixture("reference/dn18w16_logits.npy")).unwrap();
    let req = json!({
        "id": "req-7",
        "inputs": [{"name": "input", "shape": inputs.shape, "datatype": "FP32", "data": inputs.data}],
        "outputs": [{"name": "logits"}, {"name": "logits", "parameters": {"classification": 3}}],
    });
    let (st, _, v) = json_of(
        c.post(s.url("/v2/models/dn18w16_v03/infer"))
            .header("content-type", "application/json")
            .body(req.to_string())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["id"], "req-7");
    assert_eq!(v["model_name"], "dn18w16_v03");
    let out = &v["outputs"][0];
    assert_eq!(out["shape"], json!([2, 1000]));
    assert_eq!(out["datatype"], "FP32");
    let got: Vec<f32> = out["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let max = want.data.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = got
        .iter()
        .zip(&want.data)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    println!("v2 FP32 logits vs PyTorch: max |Δ| = {err:e} (max |logit| {max})");
    assert!(err <= 1e-4 * max);
    let cls = &v["outputs"][1];
    assert_eq!(cls["datatype"], "BYTES");
    assert_eq!(cls["shape"], json!([2, 3]));
    let first = cls["data"][0].as_str().unwrap();
    let parts: Vec<&str> = first.splitn(3, ':').collect();
    let best = want.data[..1000]
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0;
    assert_eq!(parts[1].parse::<usize>().unwrap(), best, "{first}");
    assert!(parts.len() == 3 && !parts[2].is_empty(), "{first}");

    // BYTES input: same answer as /classify for the same file.
    let jpg = image("chelsea.jpg");
    let req = json!({
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                    "data": [base64::engine::general_purpose::STANDARD.encode(&jpg)]}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}],
    });
    let (st, _, v) = json_of(
        c.post(s.url("/v2/models/dn18w16_v03/infer"))
            .body(req.to_string())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (_, _, cl) = json_of(
        c.post(s.url("/classify?top_k=1"))
            .header("content-type", "image/jpeg")
            .body(jpg)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let s0 = v["outputs"][0]["data"][0].as_str().unwrap();
    let (score, rest) = s0.split_once(':').unwrap();
    assert_eq!(
        rest.split(':').next().unwrap(),
        cl["predictions"][0]["index"].to_string()
    );
    assert!(
        (score.parse::<f64>().unwrap() - cl["predictions"][0]["score"].as_f64().unwrap()).abs()
            < 1e-6
    );

    // Bad requests.
    for bad in [
        json!({"inputs": []}),
        json!({"inputs": [{"name": "x", "shape": [1, 3, 2, 2], "datatype": "FP32", "data": [0.0]}]}),
        json!({"inputs": [{"name": "x", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": [1.0, 2.0]}]}),
        json!({"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [1]}]}),
        json!({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]}),
        json!({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}],
               "outputs": [{"name": "nope"}]}),
    ] {
        let (st, _, e) = json_of(
            c.post(s.url("/v2/models/dn18w16_v03/infer"))
                .body(bad.to_string())
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert!(st.is_client_error(), "{bad} → {st} {e}");
        assert!(e["error"].is_string());
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_openapi_and_docs() {
    let s = TestServer::start(|c| config(&[&dn18()], c)).await;
    let c = Client::new();
    let (_, _, info) = json_of(c.get(s.url("/info")).send().await.unwrap()).await;
    assert_eq!(info["device"], "cpu");
    assert_eq!(info["ready"], true);
    assert_eq!(info["models"][0]["depth"], 18);
    assert_eq!(info["models"][0]["classes"], 1000);
    assert_eq!(info["batching"]["max_batch_size"], 32);
    let (_, _, list) = json_of(c.get(s.url("/v1/models")).send().await.unwrap()).await;
    assert_eq!(list["models"][0]["name"], "dn18w16_v03");
    let (_, _, api) = json_of(c.get(s.url("/openapi.json")).send().await.unwrap()).await;
    for path in [
        "/classify",
        "/models/{name}/classify",
        "/v2/models/{name}/infer",
        "/healthz",
        "/readyz",
        "/metrics",
        "/info",
    ] {
        assert!(
            api["paths"][path].is_object(),
            "{path} missing from the OpenAPI"
        );
    }
    let docs = c.get(s.url("/docs/")).send().await.unwrap();
    assert_eq!(docs.status(), StatusCode::OK);
    assert!(docs.text().await.unwrap().contains("swagger"));
    s.stop().await;
}

/// Polls until `f` is true (for up to a minute: CI machines can be slow).
async fn eventually<F: Future<Output = bool>>(mut f: impl FnMut() -> F) {
    for _ in 0..6000 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition never held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_in_flight_requests_then_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let medium = medium_model(dir.path());
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_diracnet"))
        .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--model",
            &format!("m={}", medium.display()),
            "--device",
            "cpu",
        ])
        .args(["--max-batch-size", "2", "--offline", "--log-format", "json"])
        .env("DIRACNET_CACHE", dir.path())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let c = Client::new();
    eventually(|| {
        let c = c.clone();
        let url = format!("{base}/readyz");
        async move {
            c.get(url)
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK)
        }
    })
    .await;
    let jpg = Arc::new(image("chelsea.jpg"));
    let inflight: Vec<_> = (0..32)
        .map(|_| {
            let (c, url, body) = (c.clone(), format!("{base}/classify"), jpg.clone());
            tokio::spawn(async move {
                c.post(url)
                    .header("content-type", "image/jpeg")
                    .body(body.to_vec())
                    .send()
                    .await
                    .map(|r| r.status())
            })
        })
        .collect();
    // Let the requests reach the server: queued + computed ≥ 30 (at most 2 are in the model).
    eventually(|| {
        let (c, base) = (c.clone(), base.clone());
        async move {
            let queued = metric_at(&c, &base, "diracnet_queue_depth{model=\"m\"}").await;
            let done = metric_at(&c, &base, "diracnet_images_classified_total{model=\"m\"}").await;
            queued + done >= 30.0
        }
    })
    .await;
    // A request whose body is still arriving holds the drain open: headers and half the body
    // now, the rest after SIGTERM.
    let half = jpg.len() / 2;
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let head = format!(
        "POST /classify HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: image/jpeg\r\ncontent-length: {}\r\n\r\n",
        jpg.len()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&jpg[..half]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // Readiness turns 503 (as soon as the signal is handled) and new inference is refused, while
    // the queue drains.
    eventually(|| {
        let c = c.clone();
        let url = format!("{base}/readyz");
        async move {
            let r = c.get(url).send().await.unwrap();
            let (st, _, v) = json_of(r).await;
            st == StatusCode::SERVICE_UNAVAILABLE && v["reason"] == "shutting_down"
        }
    })
    .await;
    let (st, _, v) = json_of(
        c.post(format!("{base}/classify"))
            .header("content-type", "image/jpeg")
            .body(jpg.to_vec())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (st, v["type"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("shutting_down"))
    );
    // The half-sent request completes and is answered.
    slow.write_all(&jpg[half..]).await.unwrap();
    let mut reply = vec![0u8; 12];
    tokio::time::timeout(Duration::from_secs(30), slow.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        &reply,
        b"HTTP/1.1 200",
        "{}",
        String::from_utf8_lossy(&reply)
    );
    // Everything the server had accepted is answered 200; a request that had not reached it
    // yet may be refused with 503, never dropped.
    let mut answered = 0;
    for r in inflight {
        match r.await.unwrap().unwrap() {
            StatusCode::OK => answered += 1,
            StatusCode::SERVICE_UNAVAILABLE => {}
            other => panic!("in-flight request got {other}"),
        }
    }
    assert!(
        answered >= 30,
        "only {answered} of 32 in-flight requests were answered"
    );
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
}
