//! `/classify` and `/models/{name}/classify`: every input mode, every error, the API key.

use base64::Engine;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

use crate::support::{config, dn18, image, json_of, multipart, post_for_json, top, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_input_mode_gives_the_same_answer() {
    let s = TestServer::start(|c| config(&[&dn18()], c)).await;
    let c = Client::new();
    let jpg = image("chelsea.jpg");
    let png = image("camera_gray.png");
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);

    // Raw body, POST and PUT (curl -T), image/* and octet-stream.
    let (st, h, raw) =
        post_for_json(&c, s.url("/classify?top_k=3"), "image/jpeg", jpg.clone()).await;
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
    let (st, _, v) = post_for_json(&c, s.url("/classify"), &ct, body).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(top(&v), top(&raw));
    let (ct, body) = multipart(&[
        ("a", Some("cat.jpg"), &jpg),
        ("b", Some("grey.png"), &png),
        ("top_k", None, b"2"),
    ]);
    let (st, _, multi) = post_for_json(&c, s.url("/classify"), &ct, body).await;
    assert_eq!(st, StatusCode::OK, "{multi}");
    let results = multi["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["predictions"].as_array().unwrap().len(), 2);
    assert_eq!(top(&results[0]), top(&raw));
    // A text part of another name is an error, not an image that fails to decode.
    let (ct, body) = multipart(&[("file", Some("cat.jpg"), &jpg), ("topk", None, b"2")]);
    let (st, _, v) = post_for_json(&c, s.url("/classify"), &ct, body).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("unknown form field \"topk\""),
        "{v}"
    );

    // JSON: image and images (with a data URL), model and top_k in the body.
    let (st, _, v) = post_for_json(
        &c,
        s.url("/classify"),
        "application/json",
        json!({"image": b64(&jpg), "top_k": 1, "model": "dn18w16_v03"}).to_string(),
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

/// The embedding (`embedding=true` on `/classify`, the `embedding` output of KServe v2) is the
/// classifier's input: `fc.weight · embedding + fc.bias` gives the logits, computed here from
/// the weights file itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_what_the_classifier_reads() {
    let weights = crate::common::fixture("models/dn18w16.safetensors");
    let s = TestServer::start(|c| config(&[weights.to_str().unwrap()], c)).await;
    let c = Client::new();
    let jpg = image("chelsea.jpg");
    let numbers = |v: &Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };

    let (st, _, one) = post_for_json(
        &c,
        s.url("/classify?embedding=true&top_k=1000"),
        "image/jpeg",
        jpg.clone(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{one}");
    let embedding = numbers(&one["embedding"]);
    let bytes = std::fs::read(&weights).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensor = |name: &str| -> Vec<f32> {
        file.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let (w, b) = (tensor("fc.weight"), tensor("fc.bias"));
    assert_eq!(
        w.len(),
        b.len() * embedding.len(),
        "512-d for the full width; here the fixture's"
    );
    assert!(embedding.iter().all(|&x| x >= 0.0), "pooled after a ReLU");
    // The best class by W·e + b is the answer's top-1, and W·e + b ranks the classes as the
    // answer does.
    let logits: Vec<f32> = b
        .iter()
        .enumerate()
        .map(|(i, bias)| {
            bias + w[i * embedding.len()..][..embedding.len()]
                .iter()
                .zip(&embedding)
                .map(|(a, x)| a * x)
                .sum::<f32>()
        })
        .collect();
    let ranked: Vec<u64> = one["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["index"].as_u64().unwrap())
        .collect();
    let mut ours: Vec<usize> = (0..logits.len()).collect();
    ours.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    assert_eq!(ours[0] as u64, ranked[0]);
    // Softmax scores from these logits match the answer's.
    let max = logits.iter().fold(f32::MIN, |m, &x| m.max(x));
    let sum: f64 = logits.iter().map(|&x| f64::from(x - max).exp()).sum();
    let p0 = (f64::from(logits[ours[0]] - max).exp() / sum) as f32;
    let got = one["predictions"][0]["score"].as_f64().unwrap() as f32;
    assert!((p0 - got).abs() < 1e-5, "{p0} vs {got}");

    // Without the option: no embedding. With JSON and several images: one per result.
    let (_, _, plain) = post_for_json(&c, s.url("/classify"), "image/jpeg", jpg.clone()).await;
    assert!(plain.get("embedding").is_none(), "{plain}");
    let b64 = base64::engine::general_purpose::STANDARD.encode(&jpg);
    let (st, _, many) = post_for_json(
        &c,
        s.url("/classify"),
        "application/json",
        json!({"images": [b64, b64], "embedding": true}).to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{many}");
    for r in many["results"].as_array().unwrap() {
        assert_eq!(numbers(&r["embedding"]), embedding);
    }
    let (ct, body) = multipart(&[
        ("file", Some("cat.jpg"), &jpg),
        ("embedding", None, b"true"),
    ]);
    let (st, _, mp) = post_for_json(&c, s.url("/classify"), &ct, body).await;
    assert_eq!(st, StatusCode::OK, "{mp}");
    assert_eq!(numbers(&mp["embedding"]), embedding);

    // KServe v2: the `embedding` output, listed in the metadata.
    let model = one["model"].as_str().unwrap();
    let (_, _, meta) = json_of(
        c.get(s.url(&format!("/v2/models/{model}")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(meta["outputs"][2]["name"], "embedding");
    assert_eq!(meta["outputs"][2]["shape"], json!([-1, embedding.len()]));
    let req = json!({
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}],
        "outputs": [{"name": "embedding"}],
    });
    let (st, _, v) = json_of(
        c.post(s.url(&format!("/v2/models/{model}/infer")))
            .body(req.to_string())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["outputs"][0]["shape"], json!([1, embedding.len()]));
    assert_eq!(numbers(&v["outputs"][0]["data"]), embedding);
    s.stop().await;
}
