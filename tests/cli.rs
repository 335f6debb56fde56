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
    // The published accuracy, which `diracnet eval` checks.
    assert!(s.contains("30.37 % top-1 / 10.88 % top-5"), "{s}");
    assert!(s.contains("27.79 % top-1 / 9.34 % top-5"), "{s}");
}

#[test]
fn help_has_examples() {
    let dir = tempfile::tempdir().unwrap();
    for sub in [
        &["--help"][..],
        &["classify", "--help"],
        &["fetch", "--help"],
        &["eval", "--help"],
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

    // With a label file (`--labels NAME=FILE`), the classes have names.
    let names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ];
    let file = dir.path().join("cifar10.txt");
    std::fs::write(&file, names.join("\n")).unwrap();
    let model = format!(
        "small={}",
        fixture("models/dn34c10_checkpoint.pth").display()
    );
    let img = fixture("images/chelsea.jpg");
    let run = |labels: &str| {
        diracnet(
            &[
                "classify",
                "-m",
                &model,
                "--labels",
                labels,
                "--json",
                img.to_str().unwrap(),
            ],
            dir.path(),
        )
    };
    let out = ok(&run(&format!("small={}", file.display())));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for p in v[0]["predictions"].as_array().unwrap() {
        let i = p["index"].as_u64().unwrap() as usize;
        assert_eq!(p["label"], names[i], "{p}");
    }
    // One model: the name may be left out. A count that does not match, or an unknown model
    // name, is an error that says so.
    ok(&run(file.to_str().unwrap()));
    std::fs::write(&file, names[..9].join("\n")).unwrap();
    let e = fails(&run(file.to_str().unwrap()));
    assert!(e.contains("names 9 classes; the model has 10"), "{e}");
    let e = fails(&run(&format!("big={}", file.display())));
    assert!(e.contains("no model named \"big\""), "{e}");
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
    let model = fixture("models/dn18w16.safetensors");
    let model = model.to_str().unwrap();
    let junk = dir.path().join("junk.jpg");
    std::fs::write(&junk, b"definitely not a JPEG").unwrap();
    let out = diracnet(
        &[
            "classify",
            "-m",
            model,
            "--format",
            "jsonl",
            junk.to_str().unwrap(),
        ],
        dir.path(),
    );
    let e = fails(&out);
    assert!(e.contains("1 of 1 inputs failed"), "{e}");
    let row: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        row["input"].as_str().unwrap().ends_with("junk.jpg"),
        "{row}"
    );
    assert!(
        row["error"]
            .as_str()
            .unwrap()
            .contains("not a supported image"),
        "{row}"
    );

    // A path that names nothing fails before any model is loaded.
    let e = fails(&diracnet(
        &["classify", "--offline", "/no/such/image.jpg"],
        dir.path(),
    ));
    assert!(e.contains("no such file: /no/such/image.jpg"), "{e}");

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

    let out = diracnet(
        &[
            "classify",
            "-m",
            model,
            "--max-pixels",
            "1000",
            img.to_str().unwrap(),
        ],
        dir.path(),
    );
    fails(&out);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("error:") && table.contains("pixel"),
        "{table}"
    );

    // --logits is for the JSON formats.
    let e = fails(&diracnet(
        &[
            "classify",
            "-m",
            model,
            "--logits",
            "--format",
            "csv",
            img.to_str().unwrap(),
        ],
        dir.path(),
    ));
    assert!(e.contains("--logits needs"), "{e}");
}

/// A folder of images and a bad file, in each format: rows in walk order, the bad file a row
/// with its error, the others classified, exit status 1.
#[test]
fn classify_walks_folders_and_writes_each_format_with_failed_rows() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("models/dn18w16.safetensors");
    let model = model.to_str().unwrap();
    let root = dir.path().join("photos");
    std::fs::create_dir_all(root.join("a/deeper")).unwrap();
    std::fs::create_dir_all(root.join("b")).unwrap();
    std::fs::copy(fixture("images/chelsea.jpg"), root.join("a/deeper/cat.jpg")).unwrap();
    std::fs::copy(fixture("images/coffee_rgba.png"), root.join("b/coffee.PNG")).unwrap();
    std::fs::write(root.join("b/broken.jpg"), b"\xff\xd8 truncated").unwrap();
    std::fs::write(root.join("b/readme.txt"), b"not an image").unwrap();
    let run = |format: &str| {
        let out = diracnet(
            &[
                "classify",
                "-m",
                model,
                "--format",
                format,
                "--top-k",
                "3",
                root.to_str().unwrap(),
            ],
            dir.path(),
        );
        let e = fails(&out);
        assert!(e.contains("1 of 3 inputs failed"), "{e}");
        String::from_utf8(out.stdout).unwrap()
    };
    let names = ["a/deeper/cat.jpg", "b/broken.jpg", "b/coffee.PNG"];

    let lines: Vec<serde_json::Value> = run("jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (row, name) in lines.iter().zip(names) {
        assert!(row["input"].as_str().unwrap().ends_with(name), "{row}");
    }
    assert_eq!(lines[0]["predictions"].as_array().unwrap().len(), 3);
    assert!(lines[1]["error"].is_string() && lines[1]["predictions"].is_null());

    let array: serde_json::Value = serde_json::from_str(&run("json")).unwrap();
    assert_eq!(array.as_array().unwrap().len(), 3);
    assert_eq!(array[2]["predictions"], lines[2]["predictions"]);

    let csv = run("csv");
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows[0], "input,model,rank,index,label,score,error");
    assert_eq!(rows.len(), 1 + 3 + 1 + 3, "{csv}");
    // Labels with commas are quoted; the failed input has only its error.
    let top = &lines[0]["predictions"][0];
    let label = top["label"].as_str().unwrap();
    let quoted = if label.contains(',') {
        format!("\"{label}\"")
    } else {
        label.to_string()
    };
    assert!(
        rows[1].contains(&format!(",,1,{},{quoted},", top["index"])),
        "{}",
        rows[1]
    );
    assert!(rows[4].contains("broken.jpg,,,,,,"), "{}", rows[4]);

    let table = run("table");
    assert!(table.contains("broken.jpg\n  error: "), "{table}");
    assert_eq!(table.matches('%').count(), 6, "{table}");
}

/// `classify … | head -1`: the closed pipe ends the run quietly.
#[test]
fn classify_into_a_closed_pipe_ends_quietly() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("models/dn18w16.safetensors");
    let img = fixture("images/chelsea.jpg");
    let mut args = vec![
        "classify",
        "-m",
        model.to_str().unwrap(),
        "--format",
        "jsonl",
    ];
    args.extend(std::iter::repeat_n(img.to_str().unwrap(), 300));
    let mut child = Command::new(env!("CARGO_BIN_EXE_diracnet"))
        .args(&args)
        .env("DIRACNET_CACHE", dir.path())
        .env("DIRACNET_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("chelsea.jpg"), "{first}");
    // The reader is gone (dropped above); the next write fails with EPIPE.
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked") && !err.contains("error"), "{err}");
    assert!(out.status.success(), "{:?}: {err}", out.status);
}

/// `.npy` arrays beyond float32: float64 inputs equal the float32 ones; uint8 RGB pixels go
/// through the same resize and crop as the decoded file, so they equal it.
#[test]
fn classify_takes_float64_inputs_and_uint8_pixel_arrays() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("models/dn18w16.safetensors");
    let model = model.to_str().unwrap();
    let write_npy = |path: &Path, descr: &str, shape: &[usize], data: &[u8]| {
        let dims: Vec<String> = shape.iter().map(ToString::to_string).collect();
        let mut header = format!(
            "{{'descr': '{descr}', 'fortran_order': False, 'shape': ({},), }}",
            dims.join(", ")
        );
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend((header.len() as u16).to_le_bytes());
        bytes.extend(header.as_bytes());
        bytes.extend(data);
        std::fs::write(path, bytes).unwrap();
    };
    let logits = |input: &Path| -> Vec<Vec<f64>> {
        let out = ok(&diracnet(
            &[
                "classify",
                "-m",
                model,
                "--format",
                "jsonl",
                "--logits",
                input.to_str().unwrap(),
            ],
            dir.path(),
        ));
        out.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["logits"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect()
    };
    // float64: the reference inputs, widened.
    let inputs = npy::read_f32(&fixture("reference/inputs.npy")).unwrap();
    let wide: Vec<u8> = inputs
        .data
        .iter()
        .flat_map(|&x| f64::from(x).to_le_bytes())
        .collect();
    let f64s = dir.path().join("inputs64.npy");
    write_npy(&f64s, "<f8", &inputs.shape, &wide);
    assert_eq!(logits(&f64s), logits(&fixture("reference/inputs.npy")));
    // uint8: the decoded photo's pixels, [H, W, 3], and twice as [2, H, W, 3].
    let photo = fixture("images/chelsea.jpg");
    let rgb = diracnet::preprocess::decode_rgb8(&std::fs::read(&photo).unwrap(), u64::MAX).unwrap();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let one = dir.path().join("pixels.npy");
    write_npy(&one, "|u1", &[h, w, 3], rgb.as_raw());
    let from_file = logits(&photo);
    assert_eq!(logits(&one), from_file);
    let two = dir.path().join("pixels2.npy");
    write_npy(
        &two,
        "|u1",
        &[2, h, w, 3],
        &[rgb.as_raw().as_slice(), rgb.as_raw()].concat(),
    );
    // Two images make a batch of 2, which may take the other 3×3 algorithm for some layers
    // (f32 sums in another order): equal within 1e-5 of the largest logit.
    let both = logits(&two);
    let max = from_file[0].iter().fold(0f64, |m, x| m.max(x.abs()));
    assert_eq!(both.len(), 2);
    for row in &both {
        for (a, b) in row.iter().zip(&from_file[0]) {
            assert!((a - b).abs() <= 1e-5 * max, "{a} vs {b}");
        }
    }
    // The extension in any case; an array of no image is an error row, not silence.
    let upper = dir.path().join("INPUTS64.NPY");
    std::fs::copy(&f64s, &upper).unwrap();
    assert_eq!(logits(&upper).len(), inputs.shape[0]);
    // Any other shape is the file's error row.
    let error_row = |path: &Path| {
        let out = diracnet(
            &[
                "classify",
                "-m",
                model,
                "--format",
                "jsonl",
                path.to_str().unwrap(),
            ],
            dir.path(),
        );
        fails(&out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let empty = dir.path().join("empty.npy");
    write_npy(&empty, "<f4", &[0, 3, 224, 224], &[]);
    assert!(error_row(&empty).contains("no image (N = 0)"));
    let flat = dir.path().join("flat.npy");
    write_npy(&flat, "|u1", &[12], &[0; 12]);
    assert!(error_row(&flat).contains("expected RGB pixels [H, W, 3]"));
}

/// `eval` on an ImageFolder tree and on a flat folder with a ground-truth CSV: the photo filed
/// under the class the model ranks first counts for top-1, the one filed under its third class
/// for top-5 only, an unreadable image as failed.
#[test]
fn eval_counts_top1_and_top5_on_image_folders_and_ground_truth_csvs() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("models/dn18w16.safetensors");
    let model = model.to_str().unwrap();
    let (cat, coffee) = (
        fixture("images/chelsea.jpg"),
        fixture("images/coffee_rgba.png"),
    );
    let out = ok(&diracnet(
        &[
            "classify",
            "-m",
            model,
            "--format",
            "jsonl",
            cat.to_str().unwrap(),
            coffee.to_str().unwrap(),
        ],
        dir.path(),
    ));
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let class = |row: usize, rank: usize| {
        rows[row]["predictions"][rank]["index"].as_u64().unwrap() as usize
    };
    let imagenet = diracnet::registry::Labels::imagenet();
    let wnid = |i: usize| imagenet.id(i).unwrap().to_string();
    let (cat_class, coffee_class) = (class(0, 0), class(1, 2));

    let tree = dir.path().join("val");
    for (sub, src, name) in [
        (wnid(cat_class), &cat, "cat.jpg"),
        (wnid(coffee_class), &coffee, "coffee.png"),
    ] {
        std::fs::create_dir_all(tree.join(&sub)).unwrap();
        std::fs::copy(src, tree.join(&sub).join(name)).unwrap();
    }
    std::fs::write(tree.join(wnid(cat_class)).join("bad.jpg"), b"junk").unwrap();
    let preds = dir.path().join("preds.jsonl");
    let summary = |out: &str| -> serde_json::Value { serde_json::from_str(out.trim()).unwrap() };
    let s = summary(&ok(&diracnet(
        &[
            "eval",
            "-m",
            model,
            "--json",
            "--predictions",
            preds.to_str().unwrap(),
            tree.to_str().unwrap(),
        ],
        dir.path(),
    )));
    assert_eq!(
        (s["images"].as_u64(), s["failed"].as_u64()),
        (Some(2), Some(1)),
        "{s}"
    );
    assert_eq!(
        (s["top1"].as_f64(), s["top5"].as_f64()),
        (Some(0.5), Some(1.0)),
        "{s}"
    );
    assert_eq!(s["top1_error"].as_f64(), Some(0.5));
    assert!(
        s["img_per_s"].as_f64().unwrap() > 0.0 && s["published_top1_error"].is_null(),
        "{s}"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&preds)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().any(|l| l["error"].is_string()));
    let coffee_line = lines
        .iter()
        .find(|l| l["path"].as_str().unwrap().ends_with("coffee.png"))
        .unwrap();
    assert_eq!(
        (coffee_line["rank"].as_u64(), coffee_line["target"].as_u64()),
        (Some(2), Some(coffee_class as u64))
    );
    assert_eq!(coffee_line["top5"].as_array().unwrap().len(), 5);

    // Two models: each one's summary, and every prediction line names its model.
    let two = ok(&diracnet(
        &[
            "eval",
            "-m",
            &format!("a={model}"),
            "-m",
            &format!("b={model}"),
            "--json",
            "--predictions",
            preds.to_str().unwrap(),
            tree.to_str().unwrap(),
        ],
        dir.path(),
    ));
    let models: Vec<String> = two
        .lines()
        .map(|l| summary(l)["model"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(models, ["a", "b"]);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&preds)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    assert_eq!(lines.iter().filter(|l| l["model"] == "b").count(), 3);

    // --limit 1 keeps one image (spread over the list: the first).
    let s = summary(&ok(&diracnet(
        &[
            "eval",
            "-m",
            model,
            "--json",
            "--limit",
            "1",
            tree.to_str().unwrap(),
        ],
        dir.path(),
    )));
    assert_eq!(
        s["images"].as_u64().unwrap() + s["failed"].as_u64().unwrap(),
        1,
        "{s}"
    );

    // The text form.
    let text = ok(&diracnet(
        &["eval", "-m", model, tree.to_str().unwrap()],
        dir.path(),
    ));
    assert!(
        text.contains("top-1 accuracy  50.00 %") && text.contains("top-5 accuracy 100.00 %"),
        "{text}"
    );

    // Flat folder + LOC_val_solution.csv.
    let flat = dir.path().join("flat");
    std::fs::create_dir_all(&flat).unwrap();
    std::fs::copy(&cat, flat.join("ILSVRC2012_val_00000001.JPEG")).unwrap();
    std::fs::copy(&coffee, flat.join("ILSVRC2012_val_00000002.png")).unwrap();
    let csv = dir.path().join("LOC_val_solution.csv");
    std::fs::write(
        &csv,
        format!(
            "ImageId,PredictionString\nILSVRC2012_val_00000001,{} 1 2 3 4\nILSVRC2012_val_00000002,{} 5 6 7 8 {} 1 1 2 2\nILSVRC2012_val_00000003,{} 0 0 1 1\n",
            wnid(cat_class), wnid(coffee_class), wnid(cat_class), wnid(0)
        ),
    )
    .unwrap();
    let s = summary(&ok(&diracnet(
        &[
            "eval",
            "-m",
            model,
            "--json",
            "--ground-truth",
            csv.to_str().unwrap(),
            flat.to_str().unwrap(),
        ],
        dir.path(),
    )));
    assert_eq!(
        (s["images"].as_u64(), s["top1"].as_f64(), s["top5"].as_f64()),
        (Some(2), Some(0.5), Some(1.0)),
        "{s}"
    );
    assert_eq!(
        (s["missing"].as_u64(), s["unlisted"].as_u64()),
        (Some(1), Some(0)),
        "{s}"
    );

    // A folder that is not a class of the model: a clear error.
    std::fs::create_dir_all(tree.join("kittens")).unwrap();
    let e = fails(&diracnet(
        &["eval", "-m", model, tree.to_str().unwrap()],
        dir.path(),
    ));
    assert!(e.contains("kittens") && e.contains("WordNet id"), "{e}");
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
fn bf16_reports_its_kernel_and_a_cpu_isa_cap_leaves_amx_out() {
    use diracnet::model::cpu::bf16::Kernel;
    if Kernel::detect() < Kernel::Avx512 {
        println!("SKIPPED: bf16 on the CPU (this CPU lacks avx512_bf16)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("models/dn18w16.safetensors");
    let bench = |cap: &[&str]| -> serde_json::Value {
        let args = [
            cap,
            &[
                "bench",
                "--model",
                model.to_str().unwrap(),
                "--device",
                "cpu",
                "--dtype",
                "bf16",
                "--seconds",
                "0",
                "--warmup",
                "0",
                "--json",
            ],
        ]
        .concat();
        serde_json::from_str(ok(&diracnet(&args, dir.path())).trim()).unwrap()
    };
    // Uncapped: the best kernel here (AMX where the CPU and the OS have it), and on AMX the
    // direct conv alone.
    let v = bench(&[]);
    assert_eq!(v["dtype"], "bf16", "{v}");
    assert_eq!(v["isa"], Kernel::detect().name(), "{v}");
    let conv = v["conv_impl"].as_str().unwrap();
    if Kernel::detect() == Kernel::Amx {
        assert!(conv.starts_with("fast (direct only"), "{v}");
    } else {
        println!("SKIPPED: bf16 on AMX (this CPU lacks amx_bf16)");
        assert!(conv.starts_with("fast (winograd f4x4 + direct"), "{v}");
    }
    // `--cpu-isa avx512`: AVX512-BF16, never AMX.
    let v = bench(&["--cpu-isa", "avx512"]);
    assert_eq!(v["isa"], "avx512_bf16", "{v}");
    assert!(
        v["conv_impl"]
            .as_str()
            .unwrap()
            .starts_with("fast (winograd f4x4 + direct"),
        "{v}"
    );
}

#[test]
fn bench_profile_times_every_layer_of_a_pass() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("models/dn18w16.safetensors");
    let args = |format: &str| {
        let mut a = vec![
            "bench",
            "--model",
            model.to_str().unwrap(),
            "--device",
            "cpu",
            "--batch",
            "2",
            "--seconds",
            "0",
            "--warmup",
            "1",
            "--profile",
        ];
        if format == "json" {
            a.push("--json");
        }
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let args_json = args("json");
    let out = ok(&diracnet(
        &args_json.iter().map(String::as_str).collect::<Vec<_>>(),
        dir.path(),
    ));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let ops = v["profile"].as_array().unwrap();
    let names: Vec<&str> = ops.iter().map(|op| op["op"].as_str().unwrap()).collect();
    // DiracNet-18: the stem, 16 convs of 7 shapes (the first group's all alike; each other
    // group's first conv widens), 3 pools, the head; in the order they ran.
    assert!(
        names[0].starts_with("stem conv7x7+maxpool [2, 3, 224, 224]"),
        "{names:?}"
    );
    let count = |prefix: &str| names.iter().filter(|n| n.starts_with(prefix)).count();
    assert_eq!(
        (
            count("conv3x3"),
            count("maxpool2"),
            count("avgpool"),
            count("fc")
        ),
        (7, 3, 1, 1),
        "{names:?}"
    );
    let convs_per_pass: f64 = ops
        .iter()
        .filter(|op| op["op"].as_str().unwrap().starts_with("conv3x3"))
        .map(|op| op["calls_per_pass"].as_f64().unwrap())
        .sum();
    assert_eq!(convs_per_pass, 16.0, "{v}");
    let shares: f64 = ops.iter().map(|op| op["share"].as_f64().unwrap()).sum();
    assert!((shares - 1.0).abs() < 1e-9, "{shares}");
    assert!(ops
        .iter()
        .all(|op| op["ms_per_pass"].as_f64().unwrap() > 0.0));
    // The text form: a table row per op.
    let args_text = args("text");
    let out = ok(&diracnet(
        &args_text.iter().map(String::as_str).collect::<Vec<_>>(),
        dir.path(),
    ));
    assert!(
        out.contains("ms/pass") && out.contains("stem conv7x7+maxpool"),
        "{out}"
    );
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
