//! Download and cache behaviour of `diracnet::weights::fetch`, against a scripted HTTP/1.1
//! server on 127.0.0.1.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diracnet::weights::fetch::{fetch_url, sha256_file, FetchError, FetchOptions, FetchSource};
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------------
// Scripted server
// ---------------------------------------------------------------------------------------------

/// What the server does for one request.
#[derive(Clone)]
enum Reply {
    /// 200 with this body.
    Ok(Vec<u8>),
    /// This status, short text body.
    Status(u16),
    /// 200 announcing `declared` bytes, sending `body`, then closing.
    Truncated { declared: usize, body: Vec<u8> },
    /// 200 announcing `declared` bytes, sending `body`, then going silent.
    Stall { declared: usize, body: Vec<u8> },
}

type Routes = HashMap<String, Vec<Reply>>;

struct Server {
    addr: SocketAddr,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    user_agents: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Server {
    /// Serve `routes`: the n-th request to a path gets the n-th reply (the last one repeats);
    /// unknown paths get 404.
    async fn start(routes: Routes) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let hits = Arc::new(Mutex::new(HashMap::new()));
        let user_agents = Arc::new(Mutex::new(Vec::new()));
        let routes = Arc::new(routes);
        let (h, ua) = (hits.clone(), user_agents.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (routes, h, ua) = (routes.clone(), h.clone(), ua.clone());
                tokio::spawn(async move {
                    let _ = handle(stream, &routes, &h, &ua).await;
                });
            }
        });
        Server {
            addr,
            hits,
            user_agents,
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    fn total_hits(&self) -> usize {
        self.hits.lock().unwrap().values().sum()
    }

    /// Stop accepting; later connections are refused.
    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

async fn handle(
    mut stream: TcpStream,
    routes: &Routes,
    hits: &Mutex<HashMap<String, usize>>,
    user_agents: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > 16 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let path = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .unwrap_or("");
    // Route on the path only, without the query string.
    let path = path.split('?').next().unwrap_or("").to_owned();
    if let Some(ua) = head.lines().find_map(|l| {
        l.strip_prefix("user-agent: ")
            .or_else(|| l.strip_prefix("User-Agent: "))
    }) {
        user_agents.lock().unwrap().push(ua.to_owned());
    }
    let n = {
        let mut hits = hits.lock().unwrap();
        let count = hits.entry(path.clone()).or_insert(0);
        *count += 1;
        *count - 1
    };
    let reply = match routes.get(&path) {
        Some(replies) => replies[n.min(replies.len() - 1)].clone(),
        None => Reply::Status(404),
    };
    let (status, declared, body) = match &reply {
        Reply::Ok(body) => (200, body.len(), body.clone()),
        Reply::Status(code) => (*code, 5, b"nope\n".to_vec()),
        Reply::Truncated { declared, body } | Reply::Stall { declared, body } => {
            (200, *declared, body.clone())
        }
    };
    let header = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {declared}\r\n\
         Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(header.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.flush().await?;
    if let Reply::Stall { .. } = reply {
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    stream.shutdown().await
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (several 128 KiB chunks' worth by default).
fn payload(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A file name carrying the right 8-digit hash prefix for `data`.
fn good_name(stem: &str, data: &[u8]) -> String {
    format!("{stem}-{}.pth", &sha256_hex(data)[..8])
}

/// Options for tests: checkpoints in `<tmp>/cache/checkpoints` (not yet created), fast retries.
fn opts(tmp: &TempDir) -> FetchOptions {
    let mut o = FetchOptions::new(tmp.path().join("cache").join("checkpoints"));
    o.retries = 2;
    o.backoff = Duration::from_millis(10);
    o.connect_timeout = Duration::from_secs(2);
    o.read_timeout = Duration::from_secs(5);
    o
}

/// File names in `dir` (empty if it does not exist).
fn entries(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// After a failure: no final file and no `.partial` in the checkpoints dir.
fn assert_clean(dir: &Path) {
    let left = entries(dir);
    assert!(
        left.is_empty(),
        "checkpoints dir should be empty, has {left:?}"
    );
}

fn route(path: &str, replies: Vec<Reply>) -> Routes {
    HashMap::from([(path.to_owned(), replies)])
}

// ---------------------------------------------------------------------------------------------
// Pure functions
// ---------------------------------------------------------------------------------------------

#[test]
fn sha256_file_matches_sha2() {
    let tmp = TempDir::new().unwrap();
    let data = payload(300_000, 1);
    let path = tmp.path().join("f.bin");
    std::fs::write(&path, &data).unwrap();
    assert_eq!(sha256_file(&path).unwrap(), sha256_hex(&data));
    // Known vector: empty input.
    let empty = tmp.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    assert_eq!(
        sha256_file(&empty).unwrap(),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}

// ---------------------------------------------------------------------------------------------
// Downloads
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn downloads_good_file() {
    let data = payload(300_000, 2);
    let name = good_name("model", &data);
    let path = format!("/w/{name}");
    let server = Server::start(route(&path, vec![Reply::Ok(data.clone())])).await;
    let tmp = TempDir::new().unwrap();
    let o = opts(&tmp);

    let got = fetch_url(&server.url(&path), &o).await.expect("fetch");
    assert_eq!(got.source, FetchSource::Download);
    assert_eq!(got.path, o.checkpoints_dir.join(&name));
    assert_eq!(got.sha256, sha256_hex(&data));
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_eq!(entries(&o.checkpoints_dir), vec![name]);
    assert_eq!(server.hits(&path), 1);
    let uas = server.user_agents.lock().unwrap().clone();
    assert_eq!(uas, vec![format!("diracnet/{}", env!("CARGO_PKG_VERSION"))]);
}

#[tokio::test]
async fn downloads_file_without_hash_prefix_and_with_query() {
    let data = payload(1000, 3);
    let server = Server::start(route("/plain.pth", vec![Reply::Ok(data.clone())])).await;
    let tmp = TempDir::new().unwrap();
    let o = opts(&tmp);
    // The query string is not part of the file name.
    let got = fetch_url(&format!("{}?x=1", server.url("/plain.pth")), &o)
        .await
        .expect("fetch");
    assert_eq!(got.path, o.checkpoints_dir.join("plain.pth"));
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
}

#[tokio::test]
async fn progress_bar_mode_downloads() {
    let data = payload(200_000, 4);
    let name = good_name("bar", &data);
    let path = format!("/{name}");
    let server = Server::start(route(&path, vec![Reply::Ok(data.clone())])).await;
    let tmp = TempDir::new().unwrap();
    let mut o = opts(&tmp);
    o.progress = true;
    let got = fetch_url(&server.url(&path), &o).await.expect("fetch");
    assert_eq!(got.source, FetchSource::Download);
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
}

#[tokio::test]
async fn wrong_hash_prefix_is_rejected_without_retry() {
    let data = payload(5000, 5);
    // Make sure the prefix really is wrong.
    let prefix = if sha256_hex(&data).starts_with("deadbeef") {
        "0badf00d"
    } else {
        "deadbeef"
    };
    let path = format!("/model-{prefix}.pth");
    let server = Server::start(route(&path, vec![Reply::Ok(data.clone())])).await;
    let tmp = TempDir::new().unwrap();
    let o = opts(&tmp);

    let err = fetch_url(&server.url(&path), &o).await.unwrap_err();
    match &err {
        FetchError::HashMismatch { url, expected, got } => {
            assert_eq!(url, &server.url(&path));
            assert_eq!(expected, prefix);
            assert_eq!(got, &sha256_hex(&data));
        }
        other => panic!("expected HashMismatch, got {other:?}"),
    }
    assert!(err.to_string().contains("invalid hash value"), "{err}");
    assert_eq!(server.hits(&path), 1);
    assert_clean(&o.checkpoints_dir);
}

#[tokio::test]
async fn truncated_body_is_retried_then_fails() {
    let path = "/short.pth";
    let reply = Reply::Truncated {
        declared: 1000,
        body: vec![7u8; 10],
    };
    let server = Server::start(route(path, vec![reply])).await;
    let tmp = TempDir::new().unwrap();
    let o = opts(&tmp);

    let err = fetch_url(&server.url(path), &o).await.unwrap_err();
    match &err {
        FetchError::Truncated { url, expected, got } => {
            assert_eq!(url, &server.url(path));
            assert_eq!(*expected, 1000);
            assert!(*got < 1000);
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
    assert!(err.to_string().contains(&server.url(path)), "{err}");
    assert_eq!(server.hits(path), 3, "1 attempt + 2 retries");
    assert_clean(&o.checkpoints_dir);
}

#[tokio::test]
async fn truncated_then_good_succeeds() {
    let data = payload(50_000, 6);
    let name = good_name("flaky", &data);
    let path = format!("/{name}");
    let replies = vec![
        Reply::Truncated {
            declared: data.len(),
            body: data[..1000].to_vec(),
        },
        Reply::Ok(data.clone()),
    ];
    let server = Server::start(route(&path, replies)).await;
    let tmp = TempDir::new().unwrap();
    let o = opts(&tmp);
    let got = fetch_url(&server.url(&path), &o).await.expect("fetch");
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_eq!(server.hits(&path), 2);
    assert_eq!(entries(&o.checkpoints_dir), vec![name]);
}

#[tokio::test]
async fn not_found_is_not_retried() {
    let server = Server::start(Routes::new()).await;
    let tmp = TempDir::new().unwrap();
    let o = opts(&tmp);
    let path = "/missing-abcd.pth";

    let err = fetch_url(&server.url(path), &o).await.unwrap_err();
    match &err {
        FetchError::HttpStatus { url, status } => {
            assert_eq!(url, &server.url(path));
            assert_eq!(status.as_u16(), 404);
        }
        other => panic!("expected HttpStatus, got {other:?}"),
    }
    assert!(err.to_string().contains("404"), "{err}");
    assert_eq!(server.hits(path), 1);
    assert_clean(&o.checkpoints_dir);
}

#[tokio::test]
async fn server_error_then_success() {
    let data = payload(20_000, 7);
    let name = good_name("retry", &data);
    let path = format!("/{name}");
    let server = Server::start(route(
        &path,
        vec![Reply::Status(500), Reply::Ok(data.clone())],
    ))
    .await;
    let tmp = TempDir::new().unwrap();
    let o = opts(&tmp);

    let got = fetch_url(&server.url(&path), &o).await.expect("fetch");
    assert_eq!(got.source, FetchSource::Download);
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_eq!(server.hits(&path), 2);
    assert_eq!(entries(&o.checkpoints_dir), vec![name]);
}

#[tokio::test]
async fn too_many_requests_is_retried() {
    let data = payload(2_000, 8);
    let server = Server::start(route(
        "/rl.pth",
        vec![Reply::Status(429), Reply::Ok(data.clone())],
    ))
    .await;
    let tmp = TempDir::new().unwrap();
    let got = fetch_url(&server.url("/rl.pth"), &opts(&tmp))
        .await
        .expect("fetch");
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_eq!(server.hits("/rl.pth"), 2);
}

#[tokio::test]
async fn persistent_server_error_returns_last_error() {
    let server = Server::start(route("/down.pth", vec![Reply::Status(503)])).await;
    let tmp = TempDir::new().unwrap();
    let o = opts(&tmp);
    let err = fetch_url(&server.url("/down.pth"), &o).await.unwrap_err();
    assert!(
        matches!(&err, FetchError::HttpStatus { status, .. } if status.as_u16() == 503),
        "{err:?}"
    );
    assert_eq!(server.hits("/down.pth"), 3);
    assert_clean(&o.checkpoints_dir);
}

#[tokio::test]
async fn read_timeout_is_retried_then_fails() {
    let reply = Reply::Stall {
        declared: 1000,
        body: vec![1u8; 10],
    };
    let server = Server::start(route("/slow.pth", vec![reply])).await;
    let tmp = TempDir::new().unwrap();
    let mut o = opts(&tmp);
    o.read_timeout = Duration::from_millis(200);
    o.retries = 1;
    let err = fetch_url(&server.url("/slow.pth"), &o).await.unwrap_err();
    match &err {
        FetchError::Network { cause, .. } => assert!(cause.is_timeout(), "{err}"),
        other => panic!("expected Network timeout, got {other:?}"),
    }
    assert_eq!(server.hits("/slow.pth"), 2);
    assert_clean(&o.checkpoints_dir);
}

#[tokio::test]
async fn connection_refused_is_a_network_error() {
    let server = Server::start(Routes::new()).await;
    let url = server.url("/gone.pth");
    server.stop().await;
    let tmp = TempDir::new().unwrap();
    let mut o = opts(&tmp);
    o.retries = 1;
    let err = fetch_url(&url, &o).await.unwrap_err();
    assert!(matches!(err, FetchError::Network { .. }), "{err:?}");
    assert!(err.to_string().contains(&url), "{err}");
    assert_clean(&o.checkpoints_dir);
}

#[tokio::test]
async fn invalid_urls_are_rejected() {
    let tmp = TempDir::new().unwrap();
    let o = opts(&tmp);
    for url in [
        "ftp://127.0.0.1/a.pth",
        "/local/a.pth",
        "http://127.0.0.1:1/",
        "http://127.0.0.1:1/dir/",
        "http://127.0.0.1:1/a/..",
        "http://127.0.0.1:1/a..b.pth",
        "http://127.0.0.1:1/%2e%2e",
        "http:// bad host/a.pth",
    ] {
        let err = fetch_url(url, &o).await.unwrap_err();
        assert!(
            matches!(err, FetchError::InvalidUrl { .. }),
            "{url}: {err:?}"
        );
    }
    assert!(!o.checkpoints_dir.exists());
}

// ---------------------------------------------------------------------------------------------
// Cache, torch.hub folder, offline
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn offline_miss_makes_no_request() {
    let server = Server::start(Routes::new()).await;
    let tmp = TempDir::new().unwrap();
    let torch = TempDir::new().unwrap();
    let mut o = opts(&tmp);
    o.offline = true;
    o.torch_hub_dir = Some(torch.path().to_path_buf());
    let url = server.url("/net-a2174e15.pth");

    let err = fetch_url(&url, &o).await.unwrap_err();
    match &err {
        FetchError::Offline {
            url: u,
            looked_in,
            target,
        } => {
            assert_eq!(u, &url);
            assert_eq!(target, &o.checkpoints_dir.join("net-a2174e15.pth"));
            assert_eq!(
                looked_in,
                &vec![target.clone(), torch.path().join("net-a2174e15.pth")]
            );
        }
        other => panic!("expected Offline, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&url), "{msg}");
    assert!(msg.contains(&torch.path().display().to_string()), "{msg}");
    assert!(msg.contains("copy the file"), "{msg}");
    assert_eq!(server.total_hits(), 0);
    assert_clean(&o.checkpoints_dir);
}

#[tokio::test]
async fn cache_hit_needs_no_network() {
    let data = payload(100_000, 9);
    let name = good_name("cached", &data);
    let path = format!("/{name}");
    let server = Server::start(route(&path, vec![Reply::Ok(data.clone())])).await;
    let url = server.url(&path);
    let tmp = TempDir::new().unwrap();
    let o = opts(&tmp);

    let first = fetch_url(&url, &o).await.expect("first fetch");
    assert_eq!(first.source, FetchSource::Download);
    server.stop().await;

    // Server gone: still served from the cache, online and offline.
    let second = fetch_url(&url, &o).await.expect("second fetch");
    assert_eq!(second.source, FetchSource::Cache);
    assert_eq!(second.path, first.path);
    assert_eq!(second.sha256, first.sha256);

    let mut off = o.clone();
    off.offline = true;
    let third = fetch_url(&url, &off).await.expect("offline fetch");
    assert_eq!(third.source, FetchSource::Cache);
    assert_eq!(entries(&o.checkpoints_dir), vec![name]);
}

#[tokio::test]
async fn torch_hub_dir_hit_is_used_in_place() {
    let data = payload(30_000, 10);
    let name = good_name("hub", &data);
    let torch = TempDir::new().unwrap();
    let torch_file = torch.path().join(&name);
    std::fs::write(&torch_file, &data).unwrap();

    let server = Server::start(Routes::new()).await;
    let tmp = TempDir::new().unwrap();
    let mut o = opts(&tmp);
    o.torch_hub_dir = Some(torch.path().to_path_buf());

    let got = fetch_url(&server.url(&format!("/{name}")), &o)
        .await
        .expect("fetch");
    assert_eq!(got.source, FetchSource::TorchHub);
    assert_eq!(got.path, torch_file);
    assert_eq!(got.sha256, sha256_hex(&data));
    assert_eq!(server.total_hits(), 0);
    assert!(!o.checkpoints_dir.exists() || entries(&o.checkpoints_dir).is_empty());
    assert_eq!(std::fs::read(&torch_file).unwrap(), data);

    // Offline works from the torch.hub folder too.
    o.offline = true;
    let got = fetch_url(&server.url(&format!("/{name}")), &o)
        .await
        .expect("offline");
    assert_eq!(got.source, FetchSource::TorchHub);
}

#[tokio::test]
async fn torch_hub_file_without_prefix_is_used() {
    let torch = TempDir::new().unwrap();
    std::fs::write(torch.path().join("noprefix.pth"), b"anything").unwrap();
    let tmp = TempDir::new().unwrap();
    let mut o = opts(&tmp);
    o.offline = true;
    o.torch_hub_dir = Some(torch.path().to_path_buf());
    let got = fetch_url("http://127.0.0.1:1/noprefix.pth", &o)
        .await
        .expect("fetch");
    assert_eq!(got.source, FetchSource::TorchHub);
    assert_eq!(got.sha256, sha256_hex(b"anything"));
}

#[tokio::test]
async fn bad_torch_hub_file_is_ignored_not_touched() {
    let data = payload(30_000, 11);
    let name = good_name("hubbad", &data);
    let path = format!("/{name}");
    let torch = TempDir::new().unwrap();
    let torch_file = torch.path().join(&name);
    std::fs::write(&torch_file, b"corrupted").unwrap();

    let server = Server::start(route(&path, vec![Reply::Ok(data.clone())])).await;
    let tmp = TempDir::new().unwrap();
    let mut o = opts(&tmp);
    o.torch_hub_dir = Some(torch.path().to_path_buf());

    let got = fetch_url(&server.url(&path), &o).await.expect("fetch");
    assert_eq!(got.source, FetchSource::Download);
    assert_eq!(got.path, o.checkpoints_dir.join(&name));
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_eq!(std::fs::read(&torch_file).unwrap(), b"corrupted");
    assert_eq!(server.hits(&path), 1);
}

#[tokio::test]
async fn corrupted_cache_file_is_replaced() {
    let data = payload(40_000, 12);
    let name = good_name("fixme", &data);
    let path = format!("/{name}");
    let server = Server::start(route(&path, vec![Reply::Ok(data.clone())])).await;
    let tmp = TempDir::new().unwrap();
    let o = opts(&tmp);
    std::fs::create_dir_all(&o.checkpoints_dir).unwrap();
    std::fs::write(o.checkpoints_dir.join(&name), b"garbage").unwrap();

    let got = fetch_url(&server.url(&path), &o).await.expect("fetch");
    assert_eq!(got.source, FetchSource::Download);
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_eq!(got.sha256, sha256_hex(&data));
    assert_eq!(server.hits(&path), 1);
    assert_eq!(entries(&o.checkpoints_dir), vec![name]);
}

#[tokio::test]
async fn corrupted_cache_file_offline_is_removed_and_reported() {
    let tmp = TempDir::new().unwrap();
    let mut o = opts(&tmp);
    o.offline = true;
    std::fs::create_dir_all(&o.checkpoints_dir).unwrap();
    let bad: PathBuf = o.checkpoints_dir.join("m-a2174e15.pth");
    std::fs::write(&bad, b"garbage").unwrap();
    let err = fetch_url("http://127.0.0.1:1/m-a2174e15.pth", &o)
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Offline { .. }), "{err:?}");
    assert_clean(&o.checkpoints_dir);
}

#[tokio::test]
async fn cached_file_without_prefix_is_trusted() {
    let tmp = TempDir::new().unwrap();
    let mut o = opts(&tmp);
    o.offline = true;
    std::fs::create_dir_all(&o.checkpoints_dir).unwrap();
    std::fs::write(o.checkpoints_dir.join("weights.pth"), b"abc").unwrap();
    let got = fetch_url("http://127.0.0.1:1/weights.pth", &o)
        .await
        .expect("fetch");
    assert_eq!(got.source, FetchSource::Cache);
    assert_eq!(got.sha256, sha256_hex(b"abc"));
}
