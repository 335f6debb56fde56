//! What no client can do to the server: make it decode what it will refuse (429 comes first),
//! keep it working for a client that has left, hold a connection open by sending nothing or
//! sending slowly, send a body past the limit, hold the drain past its timeout, or take the
//! server's memory with small files that announce huge images; and a truncated JPEG is an
//! error, not a grey image.

use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::{Client, StatusCode};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    common::bombs,
    support::{
        config, image, json_of, medium_model, metric, post_for_json, spawn_serve, TestServer,
    },
};

/// A smooth `width × height` JPEG: cheap to send, as costly to decode as any of its size.
fn gradient_jpeg(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([
            (x / 16 % 256) as u8,
            (y / 16 % 256) as u8,
            ((x + y) / 32 % 256) as u8,
        ])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Reads until the server closes the connection (or `limit` passes: then panics); returns what
/// it sent.
async fn read_to_close(socket: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the connection was still open after {limit:?}"
    );
    got
}

fn status_line(reply: &[u8]) -> String {
    String::from_utf8_lossy(reply)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let medium = medium_model(dir.path());
    let m = format!("m={}", medium.display());
    let s = TestServer::start(|c| {
        let mut cfg = config(&[&m], c);
        cfg.batch.max_queue = 16;
        cfg.preprocess_threads = 1;
        cfg
    })
    .await;
    let c = Client::new();
    // 16 large JPEGs hold all 16 places while they are decoded, one after another.
    let big = b64(&gradient_jpeg(3000, 2000));
    let body = json!({ "images": vec![big; 16] }).to_string();
    let holder = {
        let (c, url) = (c.clone(), s.url("/classify"));
        tokio::spawn(async move {
            let r = c
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            r.status()
        })
    };
    // Not an image at all: decoding it would answer 415, so a 429 shows it was never decoded.
    let (mut refused, mut latencies) = (0, Vec::new());
    while !holder.is_finished() {
        let started = Instant::now();
        let r = c
            .post(s.url("/classify"))
            .header("content-type", "image/jpeg")
            .body(b"not a jpeg at all".to_vec())
            .send()
            .await
            .unwrap();
        let took = started.elapsed();
        let retry = r.headers().get("retry-after").cloned();
        let (st, _, v) = json_of(r).await;
        match st {
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(v["type"], "queue_full", "{v}");
                let retry: u64 = retry.unwrap().to_str().unwrap().parse().unwrap();
                assert!((1..=60).contains(&retry), "Retry-After {retry}");
                refused += 1;
                latencies.push(took);
            }
            // Between the holder's batches a place may be free for a moment.
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {}
            other => panic!("unexpected {other}: {v}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(holder.await.unwrap(), StatusCode::OK);
    latencies.sort();
    println!(
        "{refused} refused with 429 while the queue was full; p50 {:?}",
        latencies.get(latencies.len() / 2)
    );
    assert!(
        refused > 0,
        "no request was refused while the queue was full"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_jpeg_is_refused_not_classified() {
    let dir = tempfile::tempdir().unwrap();
    let medium = medium_model(dir.path());
    let m = format!("m={}", medium.display());
    let s = TestServer::start(|c| config(&[&m], c)).await;
    let c = Client::new();
    let jpg = image("chelsea.jpg");
    for keep in [3000, jpg.len() / 2, jpg.len() - 10] {
        let (st, _, v) =
            post_for_json(&c, s.url("/classify"), "image/jpeg", jpg[..keep].to_vec()).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{keep} bytes: {v}");
        assert_eq!(v["type"], "decode_failed", "{v}");
        assert!(
            v["error"].as_str().unwrap().contains("premature end"),
            "{v}"
        );
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_stops_its_preprocessing() {
    let dir = tempfile::tempdir().unwrap();
    let medium = medium_model(dir.path());
    let m = format!("m={}", medium.display());
    let s = TestServer::start(|c| {
        let mut cfg = config(&[&m], c);
        cfg.preprocess_threads = 1;
        cfg.max_body_bytes = 64 << 20;
        cfg
    })
    .await;
    let c = Client::new();
    let count = "diracnet_preprocess_duration_seconds_count{model=\"m\"}";
    let body = json!({ "images": vec![b64(&gradient_jpeg(3000, 2000)); 40] }).to_string();
    let mut socket = TcpStream::connect(s.addr()).await.unwrap();
    let head = format!(
        "POST /classify HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(body.as_bytes()).await.unwrap();
    // Leave as soon as the first image is done.
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&c, &s, count).await < 1.0 {
        assert!(Instant::now() < deadline, "no image was ever preprocessed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(socket);
    // The image being decoded may finish; no further one is started.
    let mut last = metric(&c, &s, count).await;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = metric(&c, &s, count).await;
        if now == last {
            break;
        }
        last = now;
    }
    println!("{last} of 40 images preprocessed for a client that left after the first");
    assert!(last <= 10.0, "{last} of 40 images were preprocessed");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_send_nothing_or_dribble_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let medium = medium_model(dir.path());
    let m = format!("m={}", medium.display());
    let s = TestServer::start(|c| {
        let mut cfg = config(&[&m], c);
        cfg.header_timeout = Duration::from_secs(1);
        cfg.body_timeout = Duration::from_secs(1);
        cfg.idle_timeout = Duration::from_secs(2);
        cfg.max_body_bytes = 1 << 20;
        cfg
    })
    .await;
    let limit = Duration::from_secs(15);

    // Sends nothing: closed after the idle timeout.
    let mut silent = TcpStream::connect(s.addr()).await.unwrap();
    assert!(read_to_close(&mut silent, limit).await.is_empty());

    // Dribbles its headers, a line every 300 ms: closed after the header timeout, long before
    // its headers would end.
    let mut dribbler = TcpStream::connect(s.addr()).await.unwrap();
    dribbler
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut closed = false;
    while started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if dribbler.write_all(b"x-filler: y\r\n").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 64];
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_millis(1), dribbler.read(&mut buf)).await
        {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "a connection dribbling headers stayed open for {limit:?}"
    );

    // Dribbles its body, a byte every 200 ms: 408 after the body timeout.
    let mut slow_body = TcpStream::connect(s.addr()).await.unwrap();
    slow_body
        .write_all(b"POST /classify HTTP/1.1\r\nhost: x\r\ncontent-type: image/jpeg\r\ncontent-length: 100000\r\n\r\n")
        .await
        .unwrap();
    let dribble = async {
        for _ in 0..75 {
            if slow_body.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(3), dribble).await;
    let reply = read_to_close(&mut slow_body, limit).await;
    assert_eq!(status_line(&reply), "HTTP/1.1 408 Request Timeout");

    // Declares a body over the limit: 413 before any of it is read (none is ever sent; reading
    // it would end in a 408).
    let mut too_long = TcpStream::connect(s.addr()).await.unwrap();
    too_long
        .write_all(b"POST /classify HTTP/1.1\r\nhost: x\r\ncontent-type: image/jpeg\r\ncontent-length: 1048577\r\n\r\n")
        .await
        .unwrap();
    let reply = read_to_close(&mut too_long, limit).await;
    assert_eq!(status_line(&reply), "HTTP/1.1 413 Payload Too Large");

    // Keep-alive: answered, then closed once idle.
    let mut kept = TcpStream::connect(s.addr()).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let reply = read_to_close(&mut kept, limit).await;
    assert_eq!(status_line(&reply), "HTTP/1.1 200 OK");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_make_room_for_new_ones_at_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let medium = medium_model(dir.path());
    let m = format!("m={}", medium.display());
    let s = TestServer::start(|c| {
        let mut cfg = config(&[&m], c);
        cfg.max_connections = 4;
        cfg
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(s.addr()).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A probe on a fifth connection is answered: the idlest connection made room.
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        Client::new().get(s.url("/healthz")).send(),
    )
    .await
    .expect("a probe waited behind idle connections")
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut closed = 0;
    for socket in &mut idle {
        let mut buf = [0u8; 16];
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_millis(200), socket.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert!(closed >= 1, "no idle connection was closed");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_keep_alive_clients_at_the_cap_make_room_without_losing_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let medium = medium_model(dir.path());
    let m = format!("m={}", medium.display());
    let s = TestServer::start(|c| {
        let mut cfg = config(&[&m], c);
        cfg.max_connections = 2;
        cfg
    })
    .await;
    // Two keep-alive clients that never pause hold both places.
    let until = Instant::now() + Duration::from_secs(3);
    let loops: Vec<_> = (0..2)
        .map(|_| {
            let url = s.url("/healthz");
            tokio::spawn(async move {
                let c = Client::builder().pool_max_idle_per_host(1).build().unwrap();
                let (mut answered, mut closing, mut errors) = (0, 0, Vec::new());
                while Instant::now() < until {
                    match c.get(&url).send().await {
                        Ok(r) => {
                            answered += 1;
                            if r.headers().get("connection").is_some_and(|v| v == "close") {
                                closing += 1;
                            }
                            let _ = r.bytes().await;
                        }
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                (answered, closing, errors)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A third client gets in: one of the busy connections was retired after an answer.
    let probe = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        Client::new().get(s.url("/healthz")).send(),
    )
    .await
    .expect("a probe waited behind busy keep-alive connections")
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    println!("probe answered in {:?}", probe.elapsed());
    let (mut answered, mut closing) = (0, 0);
    for l in loops {
        let (a, c, errors) = l.await.unwrap();
        // Retiring a connection never cuts a request: no client saw an error.
        assert!(
            errors.is_empty(),
            "keep-alive clients lost requests: {errors:?}"
        );
        answered += a;
        closing += c;
    }
    assert!(
        answered > 100,
        "the clients were not busy: {answered} answers"
    );
    assert!(closing >= 1, "no answer said Connection: close");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_threads_yield_to_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let medium = medium_model(dir.path());
    let model = format!("m={}", medium.display());
    let (mut child, base) = spawn_serve(dir.path(), &model, |cmd| {
        cmd.args(["--log", "warn"]).env("DIRACNET_HTTP_NICE", "7");
    })
    .await;
    let pid = child.id().unwrap();
    let c = Client::new();
    // Serve a request first, so that every kind of thread exists.
    let r = c
        .post(format!("{base}/classify"))
        .header("content-type", "image/jpeg")
        .body(image("chelsea.jpg"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Each thread's name and nice value, from /proc (Linux only, as the nice value per thread).
    let mut seen = std::collections::BTreeMap::<String, Vec<i64>>::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap();
        let stat = std::fs::read_to_string(task.join("stat")).unwrap();
        // Fields after the parenthesised name; the nice value is field 19, the 17th of these.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let nice: i64 = rest.split_whitespace().nth(16).unwrap().parse().unwrap();
        seen.entry(name.trim().to_string()).or_default().push(nice);
    }
    println!("threads and their nice values: {seen:?}");
    let http = &seen["tokio-rt-worker"];
    assert!(http.iter().all(|&n| n == 7), "HTTP threads: {http:?}");
    let model: Vec<_> = seen
        .iter()
        .filter(|(name, _)| name.starts_with("compute-") || name.starts_with("preprocess"))
        .collect();
    assert!(
        model.len() >= 2,
        "no compute or preprocessing thread: {seen:?}"
    );
    for (name, nices) in model {
        assert!(nices.iter().all(|&n| n == 0), "{name}: {nices:?}");
    }
    // The model's pool (unnamed threads, the binary's name) keeps the normal priority.
    assert!(seen["diracnet"].iter().all(|&n| n == 0), "{seen:?}");
    let _ = child.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_closes_keep_alive_connections_and_a_stuck_drain_fails() {
    let dir = tempfile::tempdir().unwrap();
    let medium = medium_model(dir.path());
    let m = format!("m={}", medium.display());
    let mut s = TestServer::start(|c| {
        let mut cfg = config(&[&m], c);
        cfg.shutdown_timeout = Duration::from_secs(2);
        cfg
    })
    .await;
    // A keep-alive connection, used once before the drain.
    let mut kept = TcpStream::connect(s.addr()).await.unwrap();
    let probe = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
    kept.write_all(probe).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(status_line(&buf[..n]).ends_with("200 OK"));
    // A request whose body never ends holds the drain (body timeout 30 s > drain 2 s).
    let mut stuck = TcpStream::connect(s.addr()).await.unwrap();
    stuck
        .write_all(b"POST /classify HTTP/1.1\r\nhost: x\r\ncontent-type: image/jpeg\r\ncontent-length: 1000\r\n\r\nabc")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.begin_stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The keep-alive client's next request is answered, told to close, and closed.
    kept.write_all(probe).await.unwrap();
    let reply = String::from_utf8_lossy(&read_to_close(&mut kept, Duration::from_secs(10)).await)
        .to_lowercase();
    assert!(reply.starts_with("http/1.1 200"), "{reply}");
    assert!(reply.contains("connection: close"), "{reply}");
    // The drain times out with the stuck request in flight, and says so.
    let e = s.finish().await.expect_err("a drain cut short is an error");
    let message = e.to_string();
    assert!(
        message.contains("1 inference requests in flight"),
        "{message}"
    );
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bombs_stay_within_the_budget_and_normal_requests_go_on() {
    const COPIES: usize = 8;
    const LIMIT_MIB: f64 = 1536.0;
    let dir = tempfile::tempdir().unwrap();
    let medium = medium_model(dir.path());
    let bombs = bombs::bombs(7000);
    // Default limits, in a process of its own, so that its peak memory is the server's.
    let model = format!("m={}", medium.display());
    let (mut child, base) = spawn_serve(dir.path(), &model, |cmd| {
        cmd.args(["--log", "warn", "--request-timeout-ms", "20000"]);
    })
    .await;
    let pid = child.id().unwrap();
    let c = Client::new();
    let before = bombs::peak_rss_mib(pid);
    let mut sent = Vec::new();
    for bomb in &bombs {
        for _ in 0..COPIES {
            let (c, url, body, name, content_type) = (
                c.clone(),
                format!("{base}/classify"),
                bomb.bytes.clone(),
                bomb.name,
                bomb.content_type,
            );
            sent.push(tokio::spawn(async move {
                let r = c
                    .post(url)
                    .header("content-type", content_type)
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                (name, r.status())
            }));
        }
    }
    // Meanwhile a normal request is answered.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (st, _, v) = post_for_json(
        &c,
        format!("{base}/classify"),
        "image/jpeg",
        image("chelsea.jpg"),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "a normal request during the bombs: {v}");
    let mut statuses = std::collections::BTreeMap::<_, Vec<u16>>::new();
    for r in sent {
        let (name, status) = r.await.unwrap();
        // 200 (decoded), 400 (truncated), 503 (waited past its deadline): never a crash.
        assert!(
            matches!(status.as_u16(), 200 | 400 | 503),
            "{name}: {status}"
        );
        statuses.entry(name).or_default().push(status.as_u16());
    }
    let peak = bombs::peak_rss_mib(pid);
    println!("peak RSS {peak:.0} MiB (before the bombs {before:.0} MiB); statuses {statuses:?}");
    assert!(
        peak < LIMIT_MIB,
        "peak RSS {peak:.0} MiB under {COPIES} copies of each bomb"
    );
    // Still alive and well.
    let r = c.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let _ = child.kill().await;
}
