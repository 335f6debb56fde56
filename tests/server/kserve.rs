//! The KServe v2 (Open Inference Protocol) routes: health, metadata, FP32 and BYTES inference.

use base64::Engine;
use diracnet::npy;
use reqwest::{Client, StatusCode};
use serde_json::json;

use crate::{
    common::fixture,
    support::{config, dn18, image, json_of, TestServer},
};

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
