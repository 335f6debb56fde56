//! The probe paths and the autoscaling metrics against a real `diracnet serve` process.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use crate::{
    common::root,
    flags::{diracnet, Flags},
    k8s::{adapter_rules, all_probe_paths},
};

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(status, body)` of an HTTP/1.0 request (no chunked encoding to undo).
fn http(port: u16, method: &str, path: &str, body: &[u8], content_type: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let head = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn get(port: u16, path: &str) -> (u16, String) {
    http(port, "GET", path, b"", "text/plain")
}

fn start_server(cache: &Path) -> Server {
    let model = root().join("tests/fixtures/models/dn18w16.safetensors");
    let mut child = diracnet()
        .args(["serve", "--host", "127.0.0.1", "--port", "0"])
        .args(["--device", "cpu", "--offline", "--max-batch-size", "2"])
        .arg("--model")
        .arg(&model)
        .env("DIRACNET_CACHE", cache)
        .env("DIRACNET_LOG", "info")
        .env("DIRACNET_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The bound address is in the log line `listening` (port 0: the OS picks a free port).
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let addr = serde_json::from_str::<serde_json::Value>(&line)
                .ok()
                .and_then(|v| v["fields"]["addr"].as_str().map(String::from));
            match addr {
                Some(addr) => {
                    let _ = tx.send(addr);
                }
                None if line.contains("ERROR") || line.contains("WARN") => eprintln!("{line}"),
                None => {}
            }
        }
    });
    let mut server = Server { child, port: 0 };
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("no `listening` log line with the address within 60 s");
    server.port = addr.rsplit(':').next().unwrap().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while get(server.port, "/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "server not ready within 120 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    server
}

#[test]
fn probe_paths_and_autoscaling_metrics_exist_on_a_real_server() {
    let flags = Flags::of_serve();
    let probe_paths = all_probe_paths(&flags);
    assert!(probe_paths.contains("/healthz") && probe_paths.contains("/readyz"));

    let cache = tempfile::tempdir().unwrap();
    let server = start_server(cache.path());
    for path in &probe_paths {
        assert_eq!(get(server.port, path).0, 200, "probe path {path}");
    }

    // One inference, so that the queue histogram has a series.
    let image = std::fs::read(root().join("tests/fixtures/images/chelsea.jpg")).unwrap();
    let (status, body) = http(server.port, "POST", "/classify", &image, "image/jpeg");
    assert_eq!(status, 200, "{body}");

    let (status, metrics) = get(server.port, "/metrics");
    assert_eq!(status, 200);
    let exported: BTreeSet<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .collect();
    let (reads, _) = adapter_rules();
    for series in &reads {
        assert!(
            exported.contains(series.as_str()),
            "/metrics has no {series} (read by prometheus-adapter.yaml)"
        );
    }
}
