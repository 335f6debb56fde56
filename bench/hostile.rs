//! Hostile load against a running `diracnet serve` on 127.0.0.1: memory bombs and a retry
//! storm, bounded in requests and time. `bench/hostile.sh` starts a release server with the
//! default limits and runs both.
//!
//! ```sh
//! cargo run --release --example hostile -- bombs --port 8080 --pid $(pgrep -f 'diracnet serve') --copies 32
//! cargo run --release --example hostile -- storm --port 8080 --capacity-clients 256 --clients 1024 --seconds 20
//! cargo run --release --example hostile -- weights --depth 18 /tmp/random18.safetensors
//! ```
//!
//! * `kserve`: `--clients` (16) closed-loop clients sending 15 MB KServe JSON bodies (11 images
//!   of FP32) to `--model` (`m`) for `--seconds`, while `/healthz` is probed every 50 ms; prints
//!   the answers' statuses and the probes' latency.
//! * `weights`: writes DiracNet-`--depth` random weights (speed does not depend on the values)
//!   as safetensors, for `diracnet serve --model` (what `hostile.sh` serves by default).
//! * `bombs`: `--copies` concurrent copies of each bomb (`tests/common/bombs.rs`: GIF, LZW
//!   TIFF, 16-bit PNG, progressive JPEG whole and truncated to 3 KB, lossless WebP, all
//!   7000×7000), plus one normal request meanwhile; prints the statuses, the normal request's
//!   latency and the server's peak RSS (`VmHWM` of `--pid`).
//! * `storm`: first the capacity (`--capacity-clients` closed-loop clients, default 128: enough
//!   for full batches, not more than the queue holds), then `--clients` closed-loop clients
//!   that retry at once on 429 (no backoff: the worst case), each for `--seconds`, with a
//!   health probe on a fresh connection every 200 ms meanwhile; prints goodput (200s per
//!   second) against capacity, the 429 latencies, connection errors by kind (after each, the
//!   client pauses 50 ms) and the probes' latency. Goal (issue 11): goodput ≥ 80 % of capacity.

#[path = "../tests/common/bombs.rs"]
mod bombs;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use diracnet::{model::Architecture, weights::convert::write_safetensors};

fn flag(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let port: u16 = flag(&args, "--port", "8080").parse()?;
    let base = format!("http://127.0.0.1:{port}");
    match args.first().map(String::as_str) {
        Some("bombs") => {
            let copies: usize = flag(&args, "--copies", "32").parse()?;
            let side: u32 = flag(&args, "--side", "7000").parse()?;
            let pid: Option<u32> = flag(&args, "--pid", "").parse().ok();
            let only = flag(&args, "--only", "");
            bombs_run(&base, copies, side, pid, &only).await
        }
        Some("storm") => {
            let clients: usize = flag(&args, "--clients", "1024").parse()?;
            let capacity_clients: usize = flag(&args, "--capacity-clients", "128").parse()?;
            let pid: Option<u32> = flag(&args, "--pid", "").parse().ok();
            let seconds: f64 = flag(&args, "--seconds", "20").parse()?;
            let image = flag(&args, "--image", "tests/fixtures/images/chelsea.jpg");
            let jpg = std::fs::read(&image).with_context(|| format!("reading {image}"))?;
            storm_run(
                &base,
                capacity_clients,
                clients,
                Duration::from_secs_f64(seconds),
                jpg,
                pid,
            )
            .await
        }
        Some("weights") => {
            let depth: usize = flag(&args, "--depth", "18").parse()?;
            let out = args
                .last()
                .filter(|_| args.len() > 1)
                .context("weights: OUT path")?;
            let arch = Architecture::imagenet(depth, 1000).context("--depth 18 or 34")?;
            write_safetensors(out.as_ref(), &arch.random_weights(42), Default::default())?;
            Ok(())
        }
        Some("kserve") => {
            let clients: usize = flag(&args, "--clients", "16").parse()?;
            let seconds: f64 = flag(&args, "--seconds", "20").parse()?;
            let model = flag(&args, "--model", "m");
            kserve_run(&base, &model, clients, Duration::from_secs_f64(seconds)).await
        }
        _ => bail!(
            "usage: hostile bombs|storm|kserve|weights [--port P] [...] (see the file's docs)"
        ),
    }
}

async fn bombs_run(
    base: &str,
    copies: usize,
    side: u32,
    pid: Option<u32>,
    only: &str,
) -> Result<()> {
    let mut bombs = bombs::bombs(side);
    if !only.is_empty() {
        bombs.retain(|b| b.name == only);
        if bombs.is_empty() {
            bail!("--only {only}: no such bomb");
        }
    }
    let c = reqwest::Client::new();
    let started = Instant::now();
    let mut sent = Vec::new();
    for bomb in &bombs {
        println!("{}: {} bytes, x{copies}", bomb.name, bomb.bytes.len());
        for _ in 0..copies {
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
                    .await;
                (name, r.map(|r| r.status().as_u16()).unwrap_or(0))
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let normal = Instant::now();
    let r = c
        .post(format!("{base}/classify"))
        .header("content-type", "image/jpeg")
        .body(std::fs::read("tests/fixtures/images/chelsea.jpg")?)
        .send()
        .await?;
    println!(
        "normal request meanwhile: {} in {:.1} ms",
        r.status(),
        normal.elapsed().as_secs_f64() * 1e3
    );
    let mut statuses = std::collections::BTreeMap::<_, Vec<u16>>::new();
    for s in sent {
        let (name, status) = s.await?;
        statuses.entry(name).or_default().push(status);
    }
    for (name, mut s) in statuses {
        s.sort_unstable();
        s.dedup();
        println!("{name}: statuses {s:?}");
    }
    println!("all answered in {:.1} s", started.elapsed().as_secs_f64());
    if let Some(pid) = pid {
        println!("server peak RSS {:.0} MiB", bombs::peak_rss_mib(pid));
    }
    Ok(())
}

/// What the closed-loop clients got.
#[derive(Default)]
struct Tally {
    /// 200s.
    ok: usize,
    /// Latency of each 429.
    refused: Vec<Duration>,
    /// Other statuses.
    other: usize,
    /// Connection errors by kind (each followed by a 50 ms pause).
    errors: std::collections::BTreeMap<String, usize>,
}

impl Tally {
    fn add(&mut self, t: Tally) {
        self.ok += t.ok;
        self.refused.extend(t.refused);
        self.other += t.other;
        for (kind, n) in t.errors {
            *self.errors.entry(kind).or_default() += n;
        }
    }
}

/// `clients` closed-loop clients for `length`, each sending the next request as soon as its
/// last one was answered (429s included: no backoff).
async fn closed_loop(base: &str, clients: usize, length: Duration, jpg: &[u8]) -> Tally {
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()
        .expect("client");
    let until = Instant::now() + length;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (c, url, body) = (c.clone(), format!("{base}/classify"), jpg.to_vec());
            tokio::spawn(async move {
                let mut t = Tally::default();
                while Instant::now() < until {
                    let sent = Instant::now();
                    let r = c
                        .post(&url)
                        .header("content-type", "image/jpeg")
                        .body(body.clone())
                        .send()
                        .await;
                    // Read the whole answer, as a client that keeps its connection must.
                    let status = match r {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            r.bytes().await.map(|_| status)
                        }
                        Err(e) => Err(e),
                    };
                    match status {
                        Ok(200) => t.ok += 1,
                        Ok(429) => t.refused.push(sent.elapsed()),
                        Ok(_) => t.other += 1,
                        Err(e) => {
                            // Back off a little, as real clients do, rather than spin on the
                            // cores the server runs on.
                            *t.errors.entry(error_kind(&e)).or_default() += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                t
            })
        })
        .collect();
    let mut all = Tally::default();
    for task in tasks {
        if let Ok(t) = task.await {
            all.add(t);
        }
    }
    all
}

/// `clients` closed-loop clients sending KServe FP32 bodies of 11 images (15.2 MB of JSON, under
/// the default 16 MiB limit) for `length`, while `/healthz` is probed every 50 ms: the probes'
/// latency is what a liveness probe sees while large bodies are parsed.
async fn kserve_run(base: &str, model: &str, clients: usize, length: Duration) -> Result<()> {
    const IMAGES: usize = 11;
    let values = IMAGES * 3 * 224 * 224;
    let mut body = String::with_capacity(values * 10 + 200);
    body.push_str(
        r#"{"inputs":[{"name":"input","shape":[11,3,224,224],"datatype":"FP32","data":["#,
    );
    for i in 0..values {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!("{:.6}", (i % 1000) as f32 / 1000.0 - 0.5));
    }
    body.push_str("]}]}");
    let body = axum::body::Bytes::from(body);
    println!(
        "{clients} clients, KServe bodies of {:.1} MB",
        body.len() as f64 / 1e6
    );
    let c = reqwest::Client::new();
    let until = Instant::now() + length;
    let url = format!("{base}/v2/models/{model}/infer");
    let senders: Vec<_> = (0..clients)
        .map(|_| {
            let (c, url, body) = (c.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
                while Instant::now() < until {
                    let status = match c.post(&url).body(body.clone()).send().await {
                        Ok(r) => {
                            let s = r.status().as_u16();
                            let _ = r.bytes().await;
                            s
                        }
                        Err(_) => 0,
                    };
                    *statuses.entry(status).or_default() += 1;
                }
                statuses
            })
        })
        .collect();
    let probes = probe_healthz(base.to_string(), Duration::from_millis(50), length, false).await;
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for s in senders {
        for (status, n) in s.await? {
            *statuses.entry(status).or_default() += n;
        }
    }
    println!(
        "KServe answers by status (0 = connection error): {statuses:?}; /healthz meanwhile: {}",
        probe_summary(&probes)
    );
    Ok(())
}

/// `/healthz` probed every `every` for `length`: whether each probe got 200, and its latency.
/// Each probe on a connection of its own when `fresh` (as a kubelet probes), else all on one
/// kept-alive connection.
async fn probe_healthz(
    base: String,
    every: Duration,
    length: Duration,
    fresh: bool,
) -> Vec<(bool, Duration)> {
    let url = format!("{base}/healthz");
    let kept = reqwest::Client::new();
    let until = Instant::now() + length;
    let mut probes = Vec::new();
    while Instant::now() < until {
        tokio::time::sleep(every).await;
        let c = if fresh {
            reqwest::Client::new()
        } else {
            kept.clone()
        };
        let sent = Instant::now();
        let ok = c.get(&url).send().await.is_ok_and(|r| r.status() == 200);
        probes.push((ok, sent.elapsed()));
    }
    probes
}

/// "N probes, F failed, p50 …, p99 …, max … ms".
fn probe_summary(probes: &[(bool, Duration)]) -> String {
    let failed = probes.iter().filter(|(ok, _)| !ok).count();
    let mut took: Vec<Duration> = probes.iter().map(|&(_, d)| d).collect();
    took.sort_unstable();
    format!(
        "{} probes, {failed} failed, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        took.len(),
        quantile_ms(&took, 0.5),
        quantile_ms(&took, 0.99),
        quantile_ms(&took, 1.0),
    )
}

/// The `p` quantile of sorted latencies, in ms (NaN when there are none).
fn quantile_ms(sorted: &[Duration], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p) as usize)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

/// CPU seconds (user + system) of `/proc/<id>/stat` (`self`, or a pid or `pid/task/tid`).
fn cpu_seconds(id: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{id}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    // utime and stime: fields 14 and 15, the 12th and 13th after the name.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    ticks / 100.0 // USER_HZ
}

/// The server's CPU seconds: (its HTTP threads, the rest: model, preprocessing, main).
fn server_cpu_seconds(pid: u32) -> (f64, f64) {
    let (mut http, mut rest) = (0.0, 0.0);
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let tid = task.file_name().to_string_lossy().into_owned();
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let cpu = cpu_seconds(&format!("{pid}/task/{tid}"));
        if name.trim() == "tokio-rt-worker" {
            http += cpu;
        } else {
            rest += cpu;
        }
    }
    (http, rest)
}

/// A connection error's kind and innermost cause, e.g. `connect: Connection refused`.
fn error_kind(e: &reqwest::Error) -> String {
    let stage = if e.is_connect() {
        "connect"
    } else if e.is_timeout() {
        "timeout"
    } else if e.is_body() || e.is_decode() {
        "reading the answer"
    } else {
        "request"
    };
    let mut cause: &dyn std::error::Error = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    format!("{stage}: {cause}")
}

async fn storm_run(
    base: &str,
    capacity_clients: usize,
    clients: usize,
    length: Duration,
    jpg: Vec<u8>,
    pid: Option<u32>,
) -> Result<()> {
    let secs = length.as_secs_f64();
    let c = closed_loop(base, capacity_clients, length, &jpg).await;
    let capacity = c.ok as f64 / secs;
    println!(
        "capacity ({capacity_clients} clients): {capacity:.1} img/s; {} refused with 429",
        c.refused.len()
    );
    // Meanwhile a health probe on a connection of its own every 200 ms, as a kubelet's.
    let probes = tokio::spawn(probe_healthz(
        base.to_string(),
        Duration::from_millis(200),
        length,
        true,
    ));
    let (client_before, server_before) = (cpu_seconds("self"), pid.map(server_cpu_seconds));
    let mut t = closed_loop(base, clients, length, &jpg).await;
    let client_cpu = (cpu_seconds("self") - client_before) / secs;
    let server_cpu = pid
        .map(server_cpu_seconds)
        .zip(server_before)
        .map(|((http, model), (http0, model0))| ((http - http0) / secs, (model - model0) / secs));
    let probes = probes.await?;
    let goodput = t.ok as f64 / secs;
    t.refused.sort_unstable();
    println!(
        "storm ({clients} clients, retry at once): goodput {goodput:.1} img/s = {:.0} % of capacity; \
         {} refused with 429 (p50 {:.1} ms, p99 {:.1} ms); {} other statuses; connection errors {:?}",
        100.0 * goodput / capacity,
        t.refused.len(),
        quantile_ms(&t.refused, 0.5),
        quantile_ms(&t.refused, 0.99),
        t.other,
        t.errors,
    );
    println!("health probes meanwhile: {}", probe_summary(&probes));
    print!("cores busy during the storm: this client {client_cpu:.2}");
    if let Some((http, model)) = server_cpu {
        print!(", the server's HTTP threads {http:.2}, its model and preprocessing {model:.2}");
    }
    println!();
    Ok(())
}
