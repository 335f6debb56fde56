//! Hostile load against a running `diracnet serve` on 127.0.0.1: memory bombs and a retry
//! storm, bounded in requests and time. `bench/hostile.sh` starts a release server with the
//! default limits and runs both.
//!
//! ```sh
//! cargo run --release --example hostile -- bombs --port 8080 --pid $(pgrep -f 'diracnet serve') --copies 32
//! cargo run --release --example hostile -- storm --port 8080 --clients 1024 --seconds 20
//! ```
//!
//! * `bombs`: `--copies` concurrent copies of each bomb (`tests/common/bombs.rs`: 16-bit PNG,
//!   progressive JPEG whole and truncated to 3 KB, lossless WebP, all 7000×7000), plus one
//!   normal request meanwhile; prints the statuses, the normal request's latency and the
//!   server's peak RSS (`VmHWM` of `--pid`).
//! * `storm`: first the capacity (32 closed-loop clients for `--seconds`), then `--clients`
//!   closed-loop clients that retry at once on 429 (no backoff: the worst case), for
//!   `--seconds`; prints goodput (200s per second) against capacity and the 429 latencies.
//!   Goal (issue 11): goodput ≥ 80 % of capacity, 429 p50 under 10 ms.

#[path = "../tests/common/bombs.rs"]
mod bombs;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

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
            bombs_run(&base, copies, side, pid).await
        }
        Some("storm") => {
            let clients: usize = flag(&args, "--clients", "1024").parse()?;
            let seconds: f64 = flag(&args, "--seconds", "20").parse()?;
            let image = flag(&args, "--image", "tests/fixtures/images/chelsea.jpg");
            let jpg = std::fs::read(&image).with_context(|| format!("reading {image}"))?;
            storm_run(&base, clients, Duration::from_secs_f64(seconds), jpg).await
        }
        _ => bail!("usage: hostile bombs|storm [--port P] [...] (see the file's docs)"),
    }
}

async fn bombs_run(base: &str, copies: usize, side: u32, pid: Option<u32>) -> Result<()> {
    let bombs = bombs::bombs(side);
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

/// Closed-loop clients for `length`: (200s, 429 latencies, other statuses).
async fn closed_loop(
    base: &str,
    clients: usize,
    length: Duration,
    jpg: &[u8],
) -> (usize, Vec<Duration>, usize) {
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()
        .expect("client");
    let until = Instant::now() + length;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (c, url, body) = (c.clone(), format!("{base}/classify"), jpg.to_vec());
            tokio::spawn(async move {
                let (mut ok, mut refused, mut other) = (0, Vec::new(), 0);
                while Instant::now() < until {
                    let sent = Instant::now();
                    let r = c
                        .post(&url)
                        .header("content-type", "image/jpeg")
                        .body(body.clone())
                        .send()
                        .await;
                    match r.map(|r| r.status().as_u16()) {
                        Ok(200) => ok += 1,
                        Ok(429) => refused.push(sent.elapsed()),
                        _ => other += 1,
                    }
                }
                (ok, refused, other)
            })
        })
        .collect();
    let (mut ok, mut refused, mut other) = (0, Vec::new(), 0);
    for t in tasks {
        if let Ok((o, r, x)) = t.await {
            ok += o;
            refused.extend(r);
            other += x;
        }
    }
    (ok, refused, other)
}

async fn storm_run(base: &str, clients: usize, length: Duration, jpg: Vec<u8>) -> Result<()> {
    let secs = length.as_secs_f64();
    let (capacity, _, _) = closed_loop(base, 32, length, &jpg).await;
    let capacity = capacity as f64 / secs;
    println!("capacity (32 clients): {capacity:.1} img/s");
    let (ok, mut refused, other) = closed_loop(base, clients, length, &jpg).await;
    let goodput = ok as f64 / secs;
    refused.sort_unstable();
    let q = |p: f64| {
        refused
            .get(((refused.len() as f64 - 1.0) * p) as usize)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    println!(
        "storm ({clients} clients, retry at once): goodput {goodput:.1} img/s = {:.0} % of capacity; \
         {} refused with 429 (p50 {:.1} ms, p99 {:.1} ms); {other} other answers or errors",
        100.0 * goodput / capacity,
        refused.len(),
        q(0.5),
        q(0.99)
    );
    Ok(())
}
