//! Helpers of the server suite: a `diracnet serve` in-process on 127.0.0.1, its configuration
//! and models, and readers of its answers (JSON, predictions, metrics).

use std::{
    collections::BTreeMap,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use diracnet::{
    device::DeviceSpec,
    model::Architecture,
    registry::{ModelSpec, Registry},
    server::{self, ServeConfig},
    weights::{convert::write_safetensors, WeightsOptions},
};
use reqwest::{Client, StatusCode};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::common::fixture;

pub fn image(name: &str) -> Vec<u8> {
    std::fs::read(fixture(&format!("images/{name}"))).unwrap()
}

/// A folded DiracNet with random weights (deterministic), big enough that a forward pass takes
/// milliseconds: for queue and shutdown tests.
pub fn medium_model(dir: &Path) -> PathBuf {
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

pub fn config(models: &[&str], cache: &Path) -> ServeConfig {
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

pub struct TestServer {
    pub base: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), server::ServeError>>,
    _cache: tempfile::TempDir,
}

impl TestServer {
    pub async fn start(make: impl FnOnce(&Path) -> ServeConfig) -> Self {
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

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stops the server; the drain must finish well inside the shutdown timeout.
    /// The server's `host:port`.
    pub fn addr(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// Starts the drain (as SIGTERM would) without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Waits (up to a minute) for `run` to return, and returns its result.
    pub async fn finish(mut self) -> Result<(), server::ServeError> {
        self.begin_stop();
        tokio::time::timeout(Duration::from_secs(60), &mut self.task)
            .await
            .expect("run never returned")
            .unwrap()
    }

    pub async fn stop(mut self) {
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

pub fn dn18() -> String {
    fixture("models/dn18w16_v03.pth").display().to_string()
}

pub async fn json_of(r: reqwest::Response) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let status = r.status();
    let headers = r.headers().clone();
    let body = r.bytes().await.unwrap();
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body)));
    (status, headers, v)
}

/// POSTs `body` to `url` as `content_type`, and reads the answer as JSON ([`json_of`]).
pub async fn post_for_json(
    c: &Client,
    url: impl reqwest::IntoUrl,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let r = c.post(url).header("content-type", content_type).body(body);
    json_of(r.send().await.unwrap()).await
}

pub fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
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
pub struct Top(u64, f64);

impl PartialEq for Top {
    fn eq(&self, o: &Self) -> bool {
        self.0 == o.0 && (self.1 - o.1).abs() <= 1e-5 * o.1.abs().max(1e-6)
    }
}

pub fn top(v: &Value) -> Top {
    let p = &v["predictions"][0];
    Top(p["index"].as_u64().unwrap(), p["score"].as_f64().unwrap())
}

pub async fn metric(c: &Client, s: &TestServer, name: &str) -> f64 {
    metric_at(c, &s.base, name).await
}

/// The sum of the samples of series `name` (e.g. `x_total{model="m"}`).
pub async fn metric_at(c: &Client, base: &str, name: &str) -> f64 {
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

/// A `diracnet serve` child process on 127.0.0.1 (CPU, offline, its cache in `cache`) serving
/// `model`; `configure` adds flags and environment. Returns once it is ready, with its base URL.
/// Killed when the child is dropped.
pub async fn spawn_serve(
    cache: &Path,
    model: &str,
    configure: impl FnOnce(&mut tokio::process::Command),
) -> (tokio::process::Child, String) {
    let port = free_port();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_diracnet"));
    cmd.args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--model", model, "--device", "cpu", "--offline"])
        .env("DIRACNET_CACHE", cache)
        .kill_on_drop(true);
    configure(&mut cmd);
    let child = cmd.spawn().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_ready_at(&Client::new(), &base).await;
    (child, base)
}

/// A port free on 127.0.0.1 now, for a server run as a child process.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Waits (as [`eventually`]) until the server at `base` answers `/readyz` with 200.
pub async fn wait_ready_at(c: &Client, base: &str) {
    eventually(|| {
        let (c, url) = (c.clone(), format!("{base}/readyz"));
        async move {
            c.get(url)
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK)
        }
    })
    .await;
}

/// Polls until `f` is true (for up to a minute: CI machines can be slow).
pub async fn eventually<F: Future<Output = bool>>(mut f: impl FnMut() -> F) {
    for _ in 0..6000 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition never held");
}
