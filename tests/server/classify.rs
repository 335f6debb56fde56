//! `/classify` and `/models/{name}/classify`: every input mode, every error, the API key.

use base64::Engine;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

use crate::support::{config, dn18, image, json_of, multipart, top, TestServer};

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
    // A text part of another name is an error, not an image that fails to decode.
    let (ct, body) = multipart(&[("file", Some("cat.jpg"), &jpg), ("topk", None, b"2")]);
    let (st, _, v) = json_of(
        c.post(s.url("/classify"))
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("unknown form field \"topk\""),
        "{v}"
    );

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
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("s3cret"),
        Some("Bearer s3cre"),
        Some("Bearer s3cret2"),
        Some("Basic s3cret"),
        Some("Bearers3cret"),
    ] {
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
    // The scheme is case-insensitive (RFC 7235).
    for auth in ["Bearer s3cret", "bearer s3cret", "BEARER s3cret"] {
        let r = c
            .post(s.url("/classify"))
            .header("content-type", "image/png")
            .header("authorization", auth)
            .body(small.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{auth}");
    }
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
