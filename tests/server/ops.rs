//! What operators use: `/metrics` (checked as `promtool` would), `/info`, `/openapi.json` and
//! `/docs/`, and the drain on SIGTERM of a real `diracnet serve` process.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use reqwest::{Client, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{
    config, dn18, eventually, image, json_of, medium_model, metric_at, multipart, post_for_json,
    spawn_serve, TestServer,
};

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
        "diracnet_model_info",
    ] {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
    }
    // How the model computes, as labels of a constant 1.
    let info = text
        .lines()
        .find(|l| l.starts_with("diracnet_model_info{"))
        .expect("a model_info sample");
    for label in [
        "model=\"dn18w16_v03\"",
        "dtype=\"f32\"",
        "device=\"cpu\"",
        "isa=\"",
    ] {
        assert!(info.contains(label), "{label} missing from {info}");
    }
    assert!(info.ends_with(" 1"), "{info}");
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
async fn info_openapi_and_docs() {
    let s = TestServer::start(|c| config(&[&dn18()], c)).await;
    let c = Client::new();
    let (_, _, info) = json_of(c.get(s.url("/info")).send().await.unwrap()).await;
    assert_eq!(info["device"], "cpu");
    assert_eq!(info["ready"], true);
    assert_eq!(info["models"][0]["depth"], 18);
    assert_eq!(info["models"][0]["classes"], 1000);
    let isa = info["models"][0]["isa"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        ["avx512", "avx2+fma", "portable"].contains(&isa.as_str()),
        "{info}"
    );
    assert_eq!(info["batching"]["max_batch_size"], 32);
    // The JPEG decoder's SIMD: reported (the build here, with nasm, has it, as CI's does:
    // `.ci/run` installs nasm).
    assert!(info["jpeg_simd"].is_boolean(), "{info}");
    if std::process::Command::new("nasm")
        .arg("-v")
        .output()
        .is_ok()
    {
        assert_eq!(
            info["jpeg_simd"], true,
            "built with nasm on PATH, yet no SIMD"
        );
    }
    // No published accuracy for a model from a file.
    assert!(info["models"][0]["published"].is_null(), "{info}");
    // A local weights file is shown by its name, never its directory.
    assert_eq!(info["models"][0]["source"], "dn18w16_v03.pth");
    let (_, _, list) = json_of(c.get(s.url("/v1/models")).send().await.unwrap()).await;
    assert_eq!(list["models"][0]["name"], "dn18w16_v03");
    assert_eq!(list["models"][0]["source"], "dn18w16_v03.pth");
    assert!(!list.to_string().contains("fixtures/models"), "{list}");
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
    for (name, value) in [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        ("content-security-policy", "frame-ancestors 'none'"),
    ] {
        assert_eq!(
            docs.headers().get(name).and_then(|v| v.to_str().ok()),
            Some(value),
            "{name} on /docs/"
        );
    }
    assert!(docs.text().await.unwrap().contains("swagger"));
    // nosniff on every response, errors included; the frame rules only where a page is served.
    for path in ["/healthz", "/info", "/no/such/route"] {
        let r = c.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.headers()["x-content-type-options"], "nosniff", "{path}");
        assert!(!r.headers().contains_key("x-frame-options"), "{path}");
    }
    s.stop().await;
}

/// What Schemathesis found the OpenAPI and the server disagreeing on (scripts/schemathesis.sh
/// runs it in full): each side of each point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_says_what_the_server_does() {
    let s = TestServer::start(|c| config(&[&dn18()], c)).await;
    let c = Client::new();
    let (_, _, api) = json_of(c.get(s.url("/openapi.json")).send().await.unwrap()).await;
    let schemas = &api["components"]["schemas"];
    for path in ["/classify", "/models/{name}/classify"] {
        for method in ["post", "put"] {
            let op = &api["paths"][path][method];
            assert!(op.is_object(), "{method} {path} undocumented");
            for status in [
                "200", "400", "401", "404", "408", "413", "415", "429", "503",
            ] {
                assert!(
                    op["responses"][status].is_object(),
                    "{method} {path}: {status}"
                );
            }
            let body = &op["requestBody"]["content"];
            assert_eq!(
                body["image/*"]["schema"]["$ref"],
                "#/components/schemas/ImageFile"
            );
            for p in op["parameters"].as_array().unwrap() {
                let expected = if p["name"] == "name" { "path" } else { "query" };
                assert_eq!(p["in"], expected, "{method} {path}: {p}");
            }
        }
    }
    // Files are binary (Swagger UI's file picker), not arrays of integers.
    assert_eq!(schemas["ImageFile"]["format"], "binary");
    assert_eq!(
        schemas["ClassifyMultipart"]["properties"]["file"]["items"]["format"],
        "binary"
    );
    // `{}` is not a valid JSON body: exactly one of image and images.
    let one_of = &schemas["ClassifyJson"]["allOf"][1]["oneOf"];
    assert_eq!(one_of[0]["required"][0], "image", "{one_of}");
    assert_eq!(one_of[1]["required"][0], "images", "{one_of}");
    assert_eq!(
        schemas["InferRequest"]["properties"]["inputs"]["maxItems"],
        1
    );

    // The server's side: what the schema now forbids is refused.
    let jpg = image("chelsea.jpg");
    let refused = [
        ("json {}", "/classify", "application/json", b"{}".to_vec()),
        (
            "json null",
            "/classify",
            "application/json",
            br#"{"image": null, "images": ["x"]}"#.to_vec(),
        ),
        (
            "unknown query",
            "/classify?topk=3",
            "image/jpeg",
            jpg.clone(),
        ),
        (
            "two models",
            "/models/dn18w16_v03/classify?model=other",
            "image/jpeg",
            jpg.clone(),
        ),
    ];
    for (what, path, content_type, body) in refused {
        let r = c
            .post(s.url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{what}");
    }
    let (ct, body) = multipart(&[
        ("file", Some("a.jpg"), &jpg),
        ("top_k", None, b"1"),
        ("top_k", None, b"2"),
    ]);
    let r = c
        .put(s.url("/classify"))
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "top_k twice");
    // And the same value in two places is fine.
    let r = c
        .put(s.url("/models/dn18w16_v03/classify?model=dn18w16_v03&top_k=2"))
        .header("content-type", "image/jpeg")
        .body(jpg)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_bounded() {
    let s = TestServer::start(|c| config(&[&dn18()], c)).await;
    let c = Client::new();
    let id_of = |r: &reqwest::Response| {
        r.headers()
            .get("x-request-id")
            .expect("x-request-id")
            .to_str()
            .unwrap()
            .to_string()
    };
    let longest = "x".repeat(128);
    for kept in ["my-id-42", "a:b/c@d", longest.as_str()] {
        let r = c
            .get(s.url("/healthz"))
            .header("x-request-id", kept)
            .send()
            .await
            .unwrap();
        assert_eq!(id_of(&r), kept);
    }
    let huge = "y".repeat(100 * 1024);
    let too_long = "z".repeat(129);
    for refused in [
        huge.as_str(),
        too_long.as_str(),
        "has space",
        "tab\there",
        "",
    ] {
        for path in ["/healthz", "/no/such/route"] {
            let r = c
                .get(s.url(path))
                .header("x-request-id", refused)
                .send()
                .await
                .unwrap();
            let id = id_of(&r);
            assert_ne!(id, refused);
            // A fresh UUID.
            assert_eq!(id.len(), 36, "{id}");
            assert!(
                id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'),
                "{id}"
            );
        }
    }
    s.stop().await;
}

/// A real `diracnet serve` with its key in a file (as a mounted secret is) and JSON logs: the
/// key from the file guards inference, the scheme is case-insensitive, and every request but
/// the probes gets one INFO line that carries its request id, timings and error type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_file_and_request_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("api-key");
    std::fs::write(&key_file, "k3y-from-file\n").unwrap();
    let (mut child, base) = spawn_serve(dir.path(), &dn18(), |cmd| {
        cmd.arg("--api-key-file")
            .arg(&key_file)
            .args(["--log", "info", "--log-format", "json"])
            .env_remove("DIRACNET_API_KEY")
            .stderr(std::process::Stdio::piped());
    })
    .await;
    let mut stderr = child.stderr.take().unwrap();
    let log = tokio::spawn(async move {
        let mut text = String::new();
        stderr.read_to_string(&mut text).await.unwrap();
        text
    });
    let c = Client::new();
    let png = image("tiny_5x7.png");
    let classify = |auth: Option<&str>, id: &str| {
        let mut r = c
            .post(format!("{base}/classify"))
            .header("content-type", "image/png")
            .header("x-request-id", id)
            .body(png.clone());
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send()
    };
    let r = classify(None, "log-test-401").await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // The file's trailing newline is not part of the key.
    for (auth, id) in [
        ("bearer k3y-from-file", "log-test-200"),
        ("BEARER k3y-from-file", "log-test-200b"),
    ] {
        let r = classify(Some(auth), id).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{auth}");
    }
    let health = c.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
    let log = log.await.unwrap();
    assert!(!log.contains("k3y-from-file"), "the key reached the log");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "request")
        .collect();
    let line_of = |id: &str| {
        let found: Vec<_> = lines
            .iter()
            .filter(|v| v["fields"]["request_id"] == id)
            .collect();
        assert_eq!(found.len(), 1, "request {id} in the log:\n{log}");
        found[0]["fields"].clone()
    };
    let ok = line_of("log-test-200");
    assert_eq!(ok["method"], "POST");
    assert_eq!(ok["route"], "/classify");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["model"], "dn18w16_v03");
    assert_eq!(ok["images"], 1);
    for t in ["preprocess_ms", "queue_ms", "inference_ms", "total_ms"] {
        assert!(ok[t].as_f64().is_some_and(|ms| ms >= 0.0), "{t}: {ok}");
    }
    assert!(ok.get("error_type").is_none(), "{ok}");
    line_of("log-test-200b");
    let refused = line_of("log-test-401");
    assert_eq!(refused["status"], 401);
    assert_eq!(refused["error_type"], "unauthorized");
    assert!(refused.get("inference_ms").is_none(), "{refused}");
    for v in &lines {
        assert_eq!(v["level"], "INFO", "{v}");
        // Probes log at DEBUG, below this server's `--log info`.
        assert_ne!(v["fields"]["route"], "/healthz", "{v}");
        assert_ne!(v["fields"]["route"], "/readyz", "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_in_flight_requests_then_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let medium = medium_model(dir.path());
    let model = format!("m={}", medium.display());
    let (mut child, base) = spawn_serve(dir.path(), &model, |cmd| {
        cmd.args(["--max-batch-size", "2", "--log-format", "json"]);
    })
    .await;
    let c = Client::new();
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
    let mut slow = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
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
    let (st, _, v) =
        post_for_json(&c, format!("{base}/classify"), "image/jpeg", jpg.to_vec()).await;
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
