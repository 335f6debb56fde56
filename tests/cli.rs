//! The `diracnet` binary end to end, on fixtures, offline.

mod common;

use std::{
    path::Path,
    process::{Command, Output},
};

use diracnet::npy;

use crate::common::fixture;

fn diracnet(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diracnet"))
        .args(args)
        .env_remove("DIRACNET_MODEL")
        .env("DIRACNET_CACHE", cache)
        .env("DIRACNET_LOG", "warn")
        .env("TORCH_HOME", cache.join("no-torch"))
        .output()
        .expect("run diracnet")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn fails(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "expected exit 1");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn models_lists_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let s = ok(&diracnet(&["models"], dir.path()));
    for name in [
        "diracnet18",
        "diracnet34",
        "diracnet18-checkpoint",
        "diracnet34-checkpoint",
    ] {
        assert!(s.contains(name), "{s}");
    }
    assert!(s.contains("diracnet18v2folded-a2174e15.pth"));
}

#[test]
fn help_has_examples() {
    let dir = tempfile::tempdir().unwrap();
    for sub in [
        &["--help"][..],
        &["classify", "--help"],
        &["fetch", "--help"],
    ] {
        let s = ok(&diracnet(sub, dir.path()));
        assert!(s.contains("Example"), "{s}");
    }
    let s = ok(&diracnet(&["classify", "--help"], dir.path()));
    assert!(
        s.contains("DIRACNET_CACHE") && s.contains("DIRACNET_OFFLINE"),
        "{s}"
    );
}

#[test]
fn serve_api_key_file_is_checked_before_serving() {
    let dir = tempfile::tempdir().unwrap();
    let help = ok(&diracnet(&["serve", "--help"], dir.path()));
    assert!(
        help.contains("--api-key-file") && help.contains("DIRACNET_API_KEY_FILE"),
        "{help}"
    );
    // A port already taken: should the key checks not stop it, `serve` fails binding instead of
    // serving, so the test cannot hang.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", "--offline", "--host", "127.0.0.1", "--port", &port];
        args.extend_from_slice(extra);
        diracnet(&args, dir.path())
    };
    let empty = dir.path().join("empty-key");
    std::fs::write(&empty, " \n").unwrap();
    let err = fails(&serve(&["--api-key-file", empty.to_str().unwrap()]));
    assert!(
        err.contains("--api-key-file") && err.contains("empty"),
        "{err}"
    );
    let missing = dir.path().join("no-such-key");
    let err = fails(&serve(&["--api-key-file", missing.to_str().unwrap()]));
    assert!(
        err.contains("--api-key-file") && err.contains("no-such-key"),
        "{err}"
    );
    // With a key, `serve` gets as far as binding.
    let key = dir.path().join("key");
    std::fs::write(&key, "s3cret\n").unwrap();
    let err = fails(&serve(&["--api-key-file", key.to_str().unwrap()]));
    assert!(err.contains(&format!("binding 127.0.0.1:{port}")), "{err}");
    // Both ways of giving a key: a usage error.
    let both = serve(&["--api-key", "x", "--api-key-file", key.to_str().unwrap()]);
    assert_eq!(both.status.code(), Some(2));
    let err = String::from_utf8_lossy(&both.stderr);
    assert!(err.contains("cannot be used with"), "{err}");
}

#[test]
fn convert_then_classify_images_and_npy() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("dn18.safetensors");
    let s = ok(&diracnet(
        &[
            "convert",
            fixture("models/dn18w16_v03.pth").to_str().unwrap(),
            st.to_str().unwrap(),
        ],
        dir.path(),
    ));
    assert!(
        s.contains("legacy folded checkpoint") && s.contains("DiracNet-18"),
        "{s}"
    );

    // An image: labelled top-5 and 1000 logits.
    let out = ok(&diracnet(
        &[
            "classify",
            "--model",
            st.to_str().unwrap(),
            "--json",
            "--logits",
            fixture("images/chelsea.jpg").to_str().unwrap(),
        ],
        dir.path(),
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let r = &v.as_array().unwrap()[0];
    assert!(r["input"].as_str().unwrap().ends_with("chelsea.jpg"));
    let preds = r["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 5);
    assert!(preds[0]["label"].is_string());
    let scores: Vec<f64> = preds.iter().map(|p| p["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]));
    assert_eq!(r["logits"].as_array().unwrap().len(), 1000);

    // Preprocessed rows: logits equal to PyTorch's on the same input.
    let out = ok(&diracnet(
        &[
            "classify",
            "-m",
            st.to_str().unwrap(),
            "--json",
            "--logits",
            "--top-k",
            "2",
            fixture("reference/inputs.npy").to_str().unwrap(),
        ],
        dir.path(),
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let want = npy::read_f32(&fixture("reference/dn18w16_logits.npy")).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), want.shape[0]);
    let max_logit = want.data.iter().fold(0f32, |m, x| m.max(x.abs()));
    for (row, want_row) in rows.iter().zip(want.data.chunks_exact(1000)) {
        assert_eq!(row["predictions"].as_array().unwrap().len(), 2);
        for (a, b) in row["logits"].as_array().unwrap().iter().zip(want_row) {
            assert!((a.as_f64().unwrap() as f32 - b).abs() <= 1e-4 * max_logit);
        }
    }

    // The table form.
    let out = ok(&diracnet(
        &[
            "classify",
            "-m",
            st.to_str().unwrap(),
            fixture("images/chelsea.jpg").to_str().unwrap(),
        ],
        dir.path(),
    ));
    assert!(out.lines().count() == 6 && out.contains('%'), "{out}");
}

#[test]
fn ten_class_model_has_null_labels() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(&diracnet(
        &[
            "classify",
            "--model",
            &format!(
                "small={}",
                fixture("models/dn34c10_checkpoint.pth").display()
            ),
            "--json",
            "--top-k",
            "50",
            fixture("images/chelsea.jpg").to_str().unwrap(),
        ],
        dir.path(),
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let preds = v[0]["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 10, "top-k is capped at the class count");
    assert!(preds.iter().all(|p| p["label"].is_null()));
}

#[test]
fn preprocess_writes_the_normalised_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.npy");
    ok(&diracnet(
        &[
            "preprocess",
            fixture("images/chelsea.jpg").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        dir.path(),
    ));
    let ours = npy::read_f32(&out).unwrap();
    // Row 0 of the reference inputs is numpy's normalisation of OpenCV's chelsea.jpg crop.
    let theirs = npy::read_f32(&fixture("reference/inputs.npy")).unwrap();
    assert_eq!(ours.shape, vec![1, 3, 224, 224]);
    assert_eq!(&theirs.shape[1..], &ours.shape[1..]);
    // One 8-bit level is 1/255/std ≤ 0.0175 after normalisation: ≥ 99.9 % within one level.
    let within = ours
        .data
        .iter()
        .zip(&theirs.data)
        .filter(|(a, b)| (*a - *b).abs() <= 0.0176)
        .count();
    let frac = within as f64 / ours.data.len() as f64;
    assert!(frac >= 0.999, "only {frac} of values within one level");
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.jpg");
    std::fs::write(&junk, b"definitely not a JPEG").unwrap();
    let e = fails(&diracnet(
        &["classify", "--offline", junk.to_str().unwrap()],
        dir.path(),
    ));
    assert!(e.contains("junk.jpg"), "{e}");

    let img = fixture("images/chelsea.jpg");
    let e = fails(&diracnet(
        &[
            "classify",
            "--offline",
            "-m",
            "diracnet18",
            img.to_str().unwrap(),
        ],
        dir.path(),
    ));
    assert!(e.to_lowercase().contains("offline"), "{e}");

    let e = fails(&diracnet(
        &["classify", "-m", "diracnet99", img.to_str().unwrap()],
        dir.path(),
    ));
    assert!(
        e.contains("unknown model") && e.contains("diracnet18"),
        "{e}"
    );

    let e = fails(&diracnet(
        &["classify", "-m", "/no/such/file.pth", img.to_str().unwrap()],
        dir.path(),
    ));
    assert!(e.contains("/no/such/file.pth"), "{e}");

    let e = fails(&diracnet(
        &["classify", "--max-pixels", "1000", img.to_str().unwrap()],
        dir.path(),
    ));
    assert!(e.contains("pixel"), "{e}");
}

#[test]
fn bench_reports_threads_conv_impl_and_dtype_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("models/dn18w16.safetensors");
    let model = model.to_str().unwrap();
    for (conv, expect) in [
        // `+ direct` with the AVX-512 kernels only.
        ("fast", "fast (winograd f4x4"),
        ("winograd", "winograd (fast path, "),
        ("direct", "direct (fast path, "),
        ("candle", "candle"),
    ] {
        let out = ok(&diracnet(
            &[
                "--threads",
                "1",
                "bench",
                "--model",
                model,
                "--device",
                "cpu",
                "--batch",
                "2",
                "--seconds",
                "0",
                "--warmup",
                "0",
                "--json",
                "--conv-impl",
                conv,
            ],
            dir.path(),
        ));
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["threads"], 1, "{v}");
        assert_eq!(v["batch"], 2, "{v}");
        assert_eq!(v["dtype"], "f32", "{v}");
        assert!(v["conv_impl"].as_str().unwrap().starts_with(expect), "{v}");
        // The kernel set of the fast path; none for candle's conv.
        match conv {
            "candle" => assert!(v["isa"].is_null(), "{v}"),
            _ => assert!(v["isa"].is_string(), "{v}"),
        }
        assert!(v["iterations"].as_u64().unwrap() >= 5, "{v}");
        assert!(v["img_per_s_median"].as_f64().unwrap() > 0.0, "{v}");
    }
    // --cpu-isa caps the kernel set: portable runs anywhere.
    let out = ok(&diracnet(
        &[
            "--cpu-isa",
            "portable",
            "bench",
            "--model",
            model,
            "--device",
            "cpu",
            "--batch",
            "1",
            "--seconds",
            "0",
            "--warmup",
            "0",
            "--json",
        ],
        dir.path(),
    ));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["isa"], "portable", "{v}");
}

#[test]
fn impossible_backends_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("models/dn18w16.safetensors");
    let model = model.to_str().unwrap();
    let base = [
        "bench",
        "--model",
        model,
        "--device",
        "cpu",
        "--seconds",
        "0",
    ];
    let e = fails(&diracnet(
        &[&base[..], &["--dtype", "f16", "--conv-impl", "fast"]].concat(),
        dir.path(),
    ));
    assert!(e.contains("--conv-impl candle"), "{e}");
    // bf16 on the CPU: the fast path where AVX512-BF16 runs, else an error naming the flag.
    let bf16 = diracnet(&[&base[..], &["--dtype", "bf16"]].concat(), dir.path());
    if diracnet::model::cpu::bf16::avx512_bf16() {
        ok(&bf16);
    } else {
        let e = fails(&bf16);
        assert!(e.contains("avx512_bf16"), "{e}");
    }
    let e = fails(&diracnet(
        &[&base[..], &["--dtype", "bf16", "--conv-impl", "candle"]].concat(),
        dir.path(),
    ));
    assert!(e.contains("--conv-impl fast"), "{e}");
    let out = Command::new(env!("CARGO_BIN_EXE_diracnet"))
        .args(base)
        .env("DIRACNET_CONV_IMPL", "im2col")
        .env("DIRACNET_CACHE", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("expected auto, fast, winograd, direct or candle"));
}

#[test]
fn offline_env_takes_the_usual_spellings() {
    // DIRACNET_OFFLINE=1 / true / yes: a model missing from the caches is then an offline error,
    // never a download; 0 / false let the flag off.
    let dir = tempfile::tempdir().unwrap();
    for value in ["1", "true", "yes", "on"] {
        let out = Command::new(env!("CARGO_BIN_EXE_diracnet"))
            .args([
                "fetch",
                "--model",
                "https://127.0.0.1:9/nothing-00000000.pth",
            ])
            .env("DIRACNET_OFFLINE", value)
            .env("DIRACNET_CACHE", dir.path())
            .env("DIRACNET_LOG", "warn")
            .output()
            .unwrap();
        let e = fails(&out);
        assert!(e.contains("offline"), "{value}: {e}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_diracnet"))
        .args(["fetch", "--model", "mine=/nonexistent/x.pth"])
        .env("DIRACNET_OFFLINE", "0")
        .env("DIRACNET_CACHE", dir.path())
        .output()
        .unwrap();
    let e = fails(&out);
    assert!(!e.contains("invalid value"), "{e}");
}
