//! The KServe v2 (Open Inference Protocol) routes: health, metadata, FP32 and BYTES inference.

use base64::Engine;
use diracnet::npy;
use reqwest::{Client, StatusCode};
use serde_json::json;

use crate::{
    common::fixture,
    support::{config, dn18, image, json_of, post_for_json, TestServer},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_v2_matches_pytorch_and_the_classify_route() {
    let s = TestServer::start(|c| config(&[&dn18()], c)).await;
    let c = Client::new();
    let (st, _, meta) = json_of(c.get(s.url("/v2")).send().await.unwrap()).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        meta["extensions"],
        json!(["classification", "binary_tensor_data", "statistics"])
    );
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
    let (st, _, v) = post_for_json(
        &c,
        s.url("/v2/models/dn18w16_v03/infer"),
        "application/json",
        req.to_string(),
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
    let (_, _, cl) = post_for_json(&c, s.url("/classify?top_k=1"), "image/jpeg", jpg).await;
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

/// The body of an FP32 request with `shape` written before `data` (so that the parser knows the
/// element count before it reads the values), each value written `value(i)`.
fn fp32_body(shape: &[usize], values: usize, value: impl Fn(usize) -> String) -> String {
    let mut body = format!(
        r#"{{"inputs": [{{"name": "input", "datatype": "FP32", "shape": {shape:?}, "data": ["#
    );
    for i in 0..values {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&value(i));
    }
    body.push_str("]}]}");
    body
}

async fn infer_raw(c: &Client, s: &TestServer, body: String) -> (StatusCode, serde_json::Value) {
    let (st, _, v) = post_for_json(
        c,
        s.url("/v2/models/dn18w16_v03/infer"),
        "application/json",
        body,
    )
    .await;
    (st, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_fp32_values_must_be_finite_float32s_and_fit_the_shape() {
    let s = TestServer::start(|c| config(&[&dn18()], c)).await;
    let c = Client::new();
    let n = diracnet::tensor::INPUT_LEN;

    // Beyond the float32 range: it would become ±inf; a 400 naming the value and its place.
    for (v, shown) in [("1e39", "1e39"), ("-3.5e38", "-3.5e38")] {
        let body = fp32_body(&[1, 3, 224, 224], n, |i| {
            if i == 5 {
                v.to_owned()
            } else {
                "0.5".to_owned()
            }
        });
        let (st, e) = infer_raw(&c, &s, body).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}: {e}");
        assert_eq!(e["type"], "bad_request", "{e}");
        let msg = e["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains(&format!(
                "value {shown} at element 5 is beyond the float32 range"
            )),
            "{msg}"
        );
    }
    // NaN and infinities, however spelled, are not JSON numbers: 400.
    for v in [
        "NaN",
        "nan",
        "Infinity",
        "-Infinity",
        "inf",
        "1e400",
        "\"NaN\"",
    ] {
        let body = fp32_body(&[1, 3, 224, 224], n, |i| {
            if i == 7 {
                v.to_owned()
            } else {
                "0".to_owned()
            }
        });
        let (st, e) = infer_raw(&c, &s, body).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}: {e}");
        assert_eq!(e["type"], "bad_request", "{e}");
    }
    // The largest float32 is a value like any other.
    let body = fp32_body(&[1, 3, 224, 224], n, |i| {
        if i == 5 {
            "3.4028235e38".to_owned()
        } else {
            "0".to_owned()
        }
    });
    let (st, e) = infer_raw(&c, &s, body).await;
    assert_eq!(st, StatusCode::OK, "{e}");

    // More values than the shape declares: refused while reading, at the shape's count.
    let body = fp32_body(&[1, 3, 224, 224], n + 1, |_| "0".to_owned());
    let (st, e) = infer_raw(&c, &s, body).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["type"], "bad_request", "{e}");
    let msg = e["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&format!(
            "more data elements than its shape [1, 3, 224, 224] holds ({n})"
        )),
        "{msg}"
    );
    // Nested rows too.
    let row = vec!["0"; 224].join(",");
    let plane = vec![format!("[{row}]"); 224].join(",");
    let image = vec![format!("[{plane}]"); 3].join(",");
    let body = format!(
        r#"{{"inputs":[{{"name":"input","datatype":"FP32","shape":[1,3,224,224],"data":[[{image}],[[[0]]]]}}]}}"#
    );
    let (st, e) = infer_raw(&c, &s, body).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("holds ({n})")),
        "{e}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_while_large_kserve_bodies_are_parsed() {
    let s = TestServer::start(|c| config(&[&dn18()], c)).await;
    let c = Client::new();
    let n = diracnet::tensor::INPUT_LEN;
    // ~8 MiB each: 5 images' worth of values for a shape of 6, so that the whole body is parsed
    // and then refused (no inference to wait for).
    let body = axum::body::Bytes::from(fp32_body(&[6, 3, 224, 224], 5 * n, |i| {
        format!("-{}.2345678", i % 10)
    }));
    println!("8 KServe bodies of {} MiB each", body.len() >> 20);
    let started = std::time::Instant::now();
    let posts: Vec<_> = (0..8)
        .map(|_| {
            let (c, url, body) = (
                c.clone(),
                s.url("/v2/models/dn18w16_v03/infer"),
                body.clone(),
            );
            tokio::spawn(async move {
                let r = c.post(url).body(body).send().await.unwrap();
                json_of(r).await
            })
        })
        .collect();
    let (mut probes, mut slowest) = (0, std::time::Duration::ZERO);
    loop {
        let done = posts.iter().all(|p| p.is_finished());
        let t = std::time::Instant::now();
        let r = c.get(s.url("/healthz")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        slowest = slowest.max(t.elapsed());
        probes += 1;
        if done {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    println!(
        "/healthz under KServe parsing: {probes} probes, slowest {:.1} ms; the 8 requests took {:.0} ms",
        slowest.as_secs_f64() * 1e3,
        started.elapsed().as_secs_f64() * 1e3
    );
    for p in posts {
        let (st, _, e) = p.await.unwrap();
        assert_eq!(st, StatusCode::BAD_REQUEST, "{e}");
        assert_eq!(
            e["error"],
            format!(
                "FP32 input \"input\" has {} values; shape [6, 3, 224, 224] needs {}",
                5 * n,
                6 * n
            )
        );
    }
    s.stop().await;
}

/// A binary request (Triton's binary tensor data extension): the JSON, its length in
/// `Inference-Header-Content-Length`, then the tensor's bytes.
async fn infer_binary(
    c: &Client,
    url: String,
    json: serde_json::Value,
    binary: &[u8],
) -> reqwest::Response {
    let header = json.to_string();
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(binary);
    c.post(url)
        .header("content-type", "application/octet-stream")
        .header("inference-header-content-length", header.len())
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Splits a binary response into its JSON and the bytes after it.
async fn binary_answer(r: reqwest::Response) -> (serde_json::Value, Vec<u8>) {
    assert_eq!(r.status(), StatusCode::OK);
    let len: usize = r.headers()["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = r.bytes().await.unwrap();
    let (json, rest) = body.split_at(len);
    (serde_json::from_slice(json).unwrap(), rest.to_vec())
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_binary_tensors_versions_stats_and_float32_output() {
    let s = TestServer::start(|c| config(&[&dn18()], c)).await;
    let c = Client::new();
    let m = "dn18w16_v03";
    let inputs = npy::read_f32(&fixture("reference/inputs.npy")).unwrap();
    let raw: Vec<u8> = inputs.data.iter().flat_map(|v| v.to_le_bytes()).collect();

    // The same FP32 input as JSON and as binary, answered as JSON and as binary: the same
    // float32s, to the bit.
    let json_req = json!({
        "inputs": [{"name": "input", "shape": inputs.shape, "datatype": "FP32", "data": inputs.data}],
    });
    let r = c
        .post(s.url(&format!("/v2/models/{m}/infer")))
        .body(json_req.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let from_json: Vec<f32> = v["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    // Written at float32 precision: each number is the shortest text of its float32.
    let first = &text[text.find("\"data\":[").unwrap() + 8..];
    let first = &first[..first.find(',').unwrap()];
    assert_eq!(first, format!("{}", from_json[0]), "{first}");
    let bin_req = json!({
        "inputs": [{"name": "input", "shape": inputs.shape, "datatype": "FP32",
                    "parameters": {"binary_data_size": raw.len()}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": true}},
                    {"name": "probabilities", "parameters": {"classification": 2}}],
    });
    let (v, rest) = binary_answer(
        infer_binary(
            &c,
            s.url(&format!("/v2/models/{m}/infer")),
            bin_req.clone(),
            &raw,
        )
        .await,
    )
    .await;
    let logits = &v["outputs"][0];
    assert!(logits.get("data").is_none(), "{v}");
    assert_eq!(logits["parameters"]["binary_data_size"], json!(rest.len()));
    assert_eq!(f32s(&rest), from_json);
    // The classification output stays JSON (it did not ask for binary).
    assert_eq!(v["outputs"][1]["shape"], json!([2, 2]));
    assert!(v["outputs"][1]["data"][0].is_string());

    // Request-level binary_data_output; BYTES input as raw image bytes (length-prefixed);
    // a BYTES output in binary.
    let jpg = image("chelsea.jpg");
    let mut bytes = (jpg.len() as u32).to_le_bytes().to_vec();
    bytes.extend(&jpg);
    let req = json!({
        "parameters": {"binary_data_output": true},
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                    "parameters": {"binary_data_size": bytes.len()}}],
        "outputs": [{"name": "logits", "parameters": {"classification": 1}}],
    });
    let url = s.url(&format!("/v2/models/{m}/versions/1/infer"));
    let (v, rest) = binary_answer(infer_binary(&c, url, req, &bytes).await).await;
    let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
    assert_eq!(rest.len(), 4 + len);
    let label = std::str::from_utf8(&rest[4..]).unwrap();
    let (_, _, cl) = post_for_json(&c, s.url("/classify?top_k=1"), "image/jpeg", jpg).await;
    assert_eq!(
        label.split(':').nth(1).unwrap(),
        cl["predictions"][0]["index"].to_string(),
        "{label} {v}"
    );

    // Malformed binary requests: each a 400 that says what is wrong.
    let url = || s.url(&format!("/v2/models/{m}/infer"));
    let short = &raw[..raw.len() - 4];
    for (req, binary, says) in [
        (bin_req.clone(), short, "binary_data_size"),
        (json_req.clone(), &raw[..8], "no input has binary_data_size"),
        (
            json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                               "parameters": {"binary_data_size": 6}}]}),
            &[9, 0, 0, 0, 1, 2][..],
            "cut short",
        ),
    ] {
        let r = infer_binary(&c, url(), req, binary).await;
        let (st, _, e) = json_of(r).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{e}");
        assert!(e["error"].as_str().unwrap().contains(says), "{e}");
    }
    let r = c
        .post(url())
        .header("inference-header-content-length", "99999")
        .body("{}")
        .send()
        .await
        .unwrap();
    let (st, _, e) = json_of(r).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(e["error"].as_str().unwrap().contains("only 2 bytes"), "{e}");

    // Versions: 1 exists, others are 404s; metadata lists the one input clients must fill.
    let (st, _, meta) = json_of(
        c.get(s.url(&format!("/v2/models/{m}/versions/1")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        meta["inputs"],
        json!([{"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]}])
    );
    for path in ["versions/1/ready"] {
        let r = c
            .get(s.url(&format!("/v2/models/{m}/{path}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    for path in ["versions/2", "versions/2/ready", "versions/x/stats"] {
        let r = c
            .get(s.url(&format!("/v2/models/{m}/{path}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
    }

    // Statistics: the requests above (three computed, four refused), in Triton's schema.
    let (st, _, stats) = json_of(
        c.get(s.url(&format!("/v2/models/{m}/stats")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let one = &stats["model_stats"][0];
    assert_eq!(
        (one["name"].as_str(), one["version"].as_str()),
        (Some(m), Some("1"))
    );
    let infer = &one["inference_stats"];
    // 2 (JSON) + 2 (binary) + 1 (BYTES) images; 4 successful requests (/classify's too).
    assert_eq!(
        one["inference_count"].as_u64(),
        Some(2 + 2 + 1 + 1),
        "{stats}"
    );
    assert_eq!(infer["success"]["count"].as_u64(), Some(4), "{stats}");
    assert_eq!(infer["fail"]["count"].as_u64(), Some(4), "{stats}");
    assert!(infer["success"]["ns"].as_u64().unwrap() > 0);
    assert_eq!(infer["compute_infer"]["count"].as_u64(), Some(4));
    let batches = one["batch_stats"].as_array().unwrap();
    let passes: u64 = batches
        .iter()
        .map(|b| b["compute_infer"]["count"].as_u64().unwrap())
        .sum();
    assert_eq!(one["execution_count"].as_u64(), Some(passes));
    assert!(one["last_inference"].as_u64().unwrap() > 1_700_000_000_000);
    let (_, _, all) = json_of(c.get(s.url("/v2/models/stats")).send().await.unwrap()).await;
    assert_eq!(all["model_stats"][0]["name"], m);
    s.stop().await;
}
