//! The batcher under load: concurrent requests share batches, a full queue answers 429, and a
//! request past its deadline answers 503 and is never computed.

use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::{Client, StatusCode};
use serde_json::json;

use crate::support::{
    config, eventually, image, json_of, medium_model, metric, metric_at, post_for_json, TestServer,
};

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
        let (st, _, v) = post_for_json(
            &c,
            s.url("/classify?top_k=5"),
            "application/octet-stream",
            image(f),
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

/// Images in the timing probe of the deadline test.
const PROBE: usize = 16;
/// The most images the deadline test sends (and so its queue bound).
const MAX_IMAGES: usize = 4096;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_in_the_queue_gets_503_and_is_never_computed() {
    let dir = tempfile::tempdir().unwrap();
    let medium = medium_model(dir.path());
    let m = format!("m={}", medium.display());
    let s = TestServer::start(|c| {
        let mut cfg = config(&[&m], c);
        cfg.batch.max_batch_size = 1;
        cfg.batch.max_queue = MAX_IMAGES;
        cfg.request_timeout = Duration::from_millis(1000);
        cfg
    })
    .await;
    let c = Client::new();
    // Tiny images decode in microseconds, so the deadline is spent in the queue. How many images
    // fill 1 s depends on the CPU (a few ms each on a fast one, far more on a loaded CI machine),
    // so first time a small request and send enough for about four seconds of work: the first
    // ones are computed, the rest expire.
    let b64 = base64::engine::general_purpose::STANDARD.encode(image("tiny_5x7.png"));
    let classify = |n: usize| {
        c.post(s.url("/classify"))
            .header("content-type", "application/json")
            .body(json!({ "images": vec![b64.clone(); n] }).to_string())
            .send()
    };
    let started = Instant::now();
    let (st, _, v) = json_of(classify(PROBE).await.unwrap()).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let per_image = started.elapsed().as_secs_f64() / PROBE as f64;
    let n = ((4.0 / per_image).ceil() as usize).clamp(64, MAX_IMAGES);
    println!("{:.2} ms per image: sending {n}", per_image * 1e3);
    let (st, _, v) = json_of(classify(n).await.unwrap()).await;
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
    let computed =
        metric(&c, &s, "diracnet_images_classified_total{model=\"m\"}").await - PROBE as f64;
    let at_503 = at_503 - PROBE as f64;
    println!("{computed} of {n} images computed ({at_503} when the 503 was sent)");
    assert!(computed <= at_503 + 1.0, "expired images were computed");
    assert!((1.0..n as f64).contains(&computed), "{computed}");
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
