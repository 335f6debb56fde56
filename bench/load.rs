//! HTTP load benchmark: `diracnet serve` img/s and latency at concurrency 1, 8 and 32, next to
//! the raw model's img/s at batch 1, 8 and 32, on DiracNet-sized random weights (speed does not
//! depend on the values). Everything runs in this process on 127.0.0.1; raw and served rounds
//! alternate (3 rounds per point, `--seconds` split between them) so machine drift cancels.
//!
//! ```sh
//! cargo run --release --example load                     # DiracNet-18, 10 s per point
//! cargo run --release --example load -- --depth 34 --seconds 20 --image my.jpg
//! cargo run --release --example load -- --concurrency 1,32 --max-batch-delay-ms 2 --max-batch-size 32
//! ```
//!
//! The server runs with `serve`'s batching defaults unless told otherwise. Each served point
//! also prints, from the server's metrics, how many batches it computed, their mean size and
//! the share of the time the model was computing, and, from the response headers, the median
//! time requests spent decoding and preprocessing (`x-preprocess-time-ms`) and in the batcher
//! (`x-queue-time-ms` + `x-inference-time-ms`); the rest of a request's latency is HTTP and
//! hand-offs between threads.
//!
//! Goals (issue "Serving"): served img/s at concurrency 32 ≥ 90 % of the raw rate at batch 32;
//! p50 latency at concurrency 1 ≤ raw batch-1 latency + 2 ms.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use candle_core::{Device, Tensor};
use diracnet::{
    batcher::BatchConfig,
    device::DeviceSpec,
    model::{Architecture, Backend, DiracNet},
    registry::{ModelSpec, Registry},
    server::{self, ServeConfig},
    tensor::INPUT_SIZE,
    weights::{cache::CacheLayout, convert::write_safetensors, WeightsOptions},
};

struct Args {
    depth: usize,
    seconds: f64,
    image: PathBuf,
    max_batch: usize,
    max_delay: Option<Duration>,
    points: Vec<usize>,
}

fn args() -> Args {
    let mut a = Args {
        depth: 18,
        seconds: 10.0,
        image: PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/images/chelsea.jpg"
        )),
        max_batch: 32,
        max_delay: None,
        points: vec![1, 8, 32],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--depth" => a.depth = value().parse().expect("--depth 18|34"),
            "--seconds" => a.seconds = value().parse().expect("--seconds S"),
            "--image" => a.image = PathBuf::from(value()),
            "--max-batch-size" => a.max_batch = value().parse().expect("--max-batch-size N"),
            "--max-batch-delay-ms" => {
                let ms: f64 = value().parse().expect("--max-batch-delay-ms MS");
                a.max_delay = Some(Duration::from_secs_f64(ms / 1000.0));
            }
            "--concurrency" => {
                a.points = value()
                    .split(',')
                    .map(|c| c.trim().parse().expect("--concurrency 1,8,32"))
                    .collect()
            }
            other => panic!("unknown flag {other}; see the doc comment of bench/load.rs"),
        }
    }
    a
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Seconds per forward pass at batch `b`, every timed pass (at least 3, for `seconds`).
fn raw(model: &DiracNet, b: usize, seconds: f64) -> Vec<f64> {
    let x = Tensor::randn(0f32, 1.0, (b, 3, INPUT_SIZE, INPUT_SIZE), &Device::Cpu).unwrap();
    model.forward(&x).unwrap();
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 3 || start.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        model.forward(&x).unwrap();
        times.push(t.elapsed().as_secs_f64());
    }
    times
}

/// NaN for no values.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

struct Load {
    /// Latency of every answered request, sorted.
    latencies: Vec<Duration>,
    /// The server's `x-preprocess-time-ms` of every answered request.
    preprocess_ms: Vec<f64>,
    /// The server's `x-queue-time-ms` + `x-inference-time-ms` of every answered request,
    /// milliseconds: what the request spent in the batcher.
    in_batcher_ms: Vec<f64>,
    /// Wall time of the run, seconds.
    elapsed: f64,
    errors: usize,
}

fn header_ms(r: &reqwest::Response, name: &str) -> f64 {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// From the server's metrics: images computed, batches computed, and seconds spent in forward
/// passes, so far.
async fn batches(metrics_url: &str) -> (f64, f64, f64) {
    let text = reqwest::get(metrics_url)
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    (
        value("diracnet_batch_size_sum{"),
        value("diracnet_batch_size_count{"),
        value("diracnet_inference_duration_seconds_sum{"),
    )
}

async fn load(url: &str, body: Arc<Vec<u8>>, concurrency: usize, seconds: f64) -> Load {
    let client = reqwest::Client::new();
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, body) = (client.clone(), url.to_string(), body.clone());
            tokio::spawn(async move {
                let (mut lat, mut pre, mut batcher, mut errors) =
                    (Vec::new(), Vec::new(), Vec::new(), 0);
                while Instant::now() < until {
                    let t = Instant::now();
                    let r = client
                        .post(&url)
                        .header("content-type", "image/jpeg")
                        .body(body.to_vec())
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status().is_success() => {
                            let ms = header_ms(&r, "x-queue-time-ms")
                                + header_ms(&r, "x-inference-time-ms");
                            pre.push(header_ms(&r, "x-preprocess-time-ms"));
                            let _ = r.bytes().await;
                            lat.push(t.elapsed());
                            batcher.push(ms);
                        }
                        _ => errors += 1,
                    }
                }
                (lat, pre, batcher, errors)
            })
        })
        .collect();
    let (mut all, mut preprocess_ms, mut in_batcher_ms, mut errors) =
        (Vec::new(), Vec::new(), Vec::new(), 0);
    for w in workers {
        let (l, p, b, e) = w.await.unwrap();
        all.extend(l);
        preprocess_ms.extend(p);
        in_batcher_ms.extend(b);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort();
    Load {
        latencies: all,
        preprocess_ms,
        in_batcher_ms,
        elapsed,
        errors,
    }
}

#[tokio::main]
async fn main() {
    diracnet::memory::keep_freed_buffers(); // as `diracnet serve` does
    let a = args();
    let arch = Architecture::imagenet(a.depth, 1000).expect("--depth 18 or 34");
    let weights = arch.random_weights(42);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("random{}.safetensors", a.depth));
    write_safetensors(&path, &weights, Default::default()).unwrap();
    let threads = candle_core::utils::get_num_threads();
    println!(
        "DiracNet-{} random weights, CPU, {threads} threads, {} s per point, image {}",
        a.depth,
        a.seconds,
        a.image.display()
    );

    // Raw model (kept loaded: raw and served rounds alternate below).
    let model = DiracNet::from_safetensors(&path, &Backend::cpu()).unwrap();

    // Served.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spec = ModelSpec::parse(
        &format!("dn={}", path.display()),
        &Registry::builtin().unwrap(),
    )
    .unwrap();
    let weights = WeightsOptions {
        cache: CacheLayout {
            root: dir.path().join("cache"),
        },
        offline: true,
        progress: false,
        torch_hub_dir: None,
    };
    let defaults = ServeConfig::new(vec![spec], weights);
    let config = ServeConfig {
        device: DeviceSpec::Cpu,
        batch: BatchConfig {
            max_batch_size: a.max_batch,
            max_batch_delay: a.max_delay.unwrap_or(defaults.batch.max_batch_delay),
            max_queue: 1024,
        },
        request_timeout: Duration::from_secs(120),
        max_body_bytes: 64 << 20,
        shutdown_timeout: Duration::from_secs(60),
        ..defaults
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::run(config, listener, async {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    while !client
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = Arc::new(std::fs::read(&a.image).expect("--image file"));
    let url = format!("http://{addr}/classify");
    let metrics_url = format!("http://{addr}/metrics");
    // Warm the connection pool and caches.
    let _ = load(&url, body.clone(), 4, 2.0).await;

    // Rounds alternate raw and served at each point (A B A B), so drift of this machine hits
    // both sides alike; figures are medians over all rounds.
    let rounds = 3;
    let per_round = a.seconds / rounds as f64;
    let mut table = Vec::new();
    for &c in &a.points {
        let b = c;
        let (mut raw_times, mut lat, mut pre, mut batcher) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut served_imgs, mut served_secs, mut errors) = (0usize, 0f64, 0);
        let batches_before = batches(&metrics_url).await;
        for _ in 0..rounds {
            raw_times.extend(raw(&model, b, per_round));
            let r = load(&url, body.clone(), c, per_round).await;
            served_imgs += r.latencies.len();
            served_secs += r.elapsed;
            errors += r.errors;
            lat.extend(r.latencies);
            pre.extend(r.preprocess_ms);
            batcher.extend(r.in_batcher_ms);
        }
        lat.sort();
        let (images, passes, computing) = {
            let after = batches(&metrics_url).await;
            (
                after.0 - batches_before.0,
                after.1 - batches_before.1,
                after.2 - batches_before.2,
            )
        };
        let raw_pass = median(&mut raw_times);
        let raw_rate = b as f64 / raw_pass;
        let served_rate = served_imgs as f64 / served_secs.max(1e-9);
        let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
        println!(
            "batch/conc. {b:>2}: raw {raw_rate:7.1} img/s ({:.1} ms per pass) | served {served_rate:7.1} img/s, p50 {:.1} ms, p99 {:.1} ms, errors {errors}",
            raw_pass * 1e3,
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
        );
        println!(
            "                 server side: {passes} batches of {:.1} images on average, computing {:.0} % of the time; p50 preprocessing {:.2} ms, in the batcher (queue + inference) {:.1} ms",
            images / passes.max(1.0),
            100.0 * computing / served_secs.max(1e-9),
            median(&mut pre),
            median(&mut batcher),
        );
        table.push((c, raw_rate, raw_pass, served_rate, p50));
    }
    let _ = stop.send(());
    let _ = server.await;

    if let Some(&(_, raw32, _, s32, _)) = table.iter().find(|t| t.0 == 32) {
        println!(
            "goal 1: served c32 / raw b32 = {:.1} % (goal ≥ 90 %) {}",
            100.0 * s32 / raw32,
            if s32 >= 0.9 * raw32 { "MET" } else { "NOT MET" }
        );
    }
    if let Some(&(_, _, raw1_pass, _, p50_1)) = table.iter().find(|t| t.0 == 1) {
        let (raw1_ms, p50_1) = (raw1_pass * 1e3, p50_1.as_secs_f64() * 1e3);
        println!(
            "goal 2: served c1 p50 {p50_1:.1} ms vs raw b1 {raw1_ms:.1} ms + 2 ms (goal ≤ {:.1} ms) {}",
            raw1_ms + 2.0,
            if p50_1 <= raw1_ms + 2.0 {
                "MET"
            } else {
                "NOT MET"
            }
        );
    }
}
