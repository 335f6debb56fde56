//! Preprocessing under a bound: image files become network inputs on a fixed pool of threads,
//! each image admitted against a memory budget before it is decoded.
//!
//! Decoding is where a small request costs a lot: a 3 KB truncated progressive JPEG or a 38 KB
//! GIF can announce a 7000×7000 image, which takes hundreds of MiB while it decodes. The
//! per-image `--max-pixels` check bounds one image, not how many decode at once; this bounds the
//! sum:
//!
//! ```text
//! for each image of a request, in order:
//!   deadline passed?          → 503 timeout (no more work for this request)
//!   header probe              format, size, peak memory (preprocess::probe; microseconds)
//!   lane                      small (peak ≤ budget / 16: 64 MiB by default, a 5 Mpx JPEG)
//!                             or large
//!   memory budget             wait (FIFO) for the peak bytes in the lane's share of
//!                             --preprocess-memory-mib (small: a quarter, large: the rest),
//!                             until the deadline; a large image bigger than its whole share
//!                             waits for all of it
//!   large: a thread           at most threads − 1 large images at once (1 with one thread)
//!   pool thread               one of --preprocess-threads: decode, resize, normalise; skipped
//!                             if the request is gone by the time a thread is free
//! ```
//!
//! The two lanes keep ordinary photos flowing while huge images (or memory bombs: a few KB that
//! announce 50 Mpx) queue for their share: a normal request never waits behind them for memory,
//! and always finds a thread (with two threads or more).
//!
//! A request whose client leaves is dropped at its next `await`, so it stops between images:
//! the image being decoded finishes, the next is never started. So memory in decoding is at
//! most the budget, plus the excess of one image whose peak alone passes the large share
//! (at most 12 bytes × `--max-pixels` + 1 MiB); decoding threads are exactly the pool's,
//! whatever arrives.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use axum::body::Bytes;
use tokio::sync::{oneshot, Semaphore};

use super::error::ApiError;
use crate::{
    panic::panic_message,
    preprocess::{preprocess, probe, PreprocessError},
};

/// The preprocessing pool and its memory budget.
pub struct Preprocessing {
    pool: rayon::ThreadPool,
    /// The small lane's share of the budget, one permit per KiB.
    small: Arc<Semaphore>,
    small_kib: u32,
    /// The large lane's share, one permit per KiB.
    large: Arc<Semaphore>,
    large_kib: u32,
    /// Threads the large lane may use at once.
    large_threads: Arc<Semaphore>,
    max_pixels: u64,
    /// Images whose preprocessing started on a pool thread.
    started: Arc<AtomicU64>,
}

/// One image's preprocessing on a pool thread: the input, and how long it took.
type Done = (Result<Vec<f32>, PreprocessError>, Duration);

impl Preprocessing {
    /// A pool of `threads` threads with `budget_bytes` of memory for decoding (at least 1 MiB),
    /// refusing images over `max_pixels`.
    pub fn new(threads: usize, budget_bytes: u64, max_pixels: u64) -> std::io::Result<Self> {
        let budget_kib = u32::try_from(budget_bytes.div_ceil(1024).max(1024)).unwrap_or(u32::MAX);
        let small_kib = budget_kib / 4;
        let large_kib = budget_kib - small_kib;
        let threads = threads.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("preprocess-{i}"))
            .build()
            .map_err(std::io::Error::other)?;
        Ok(Self {
            pool,
            small: Arc::new(Semaphore::new(small_kib as usize)),
            small_kib,
            large: Arc::new(Semaphore::new(large_kib as usize)),
            large_kib,
            large_threads: Arc::new(Semaphore::new((threads - 1).max(1))),
            max_pixels,
            started: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Threads in the pool.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Images whose preprocessing has started, since the pool was made.
    pub fn images_started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// Bytes of the budget held by images being decoded now.
    pub fn memory_in_use(&self) -> u64 {
        let held = |lane: &Semaphore, kib: u32| {
            u64::from(kib) - (lane.available_permits() as u64).min(u64::from(kib))
        };
        (held(&self.small, self.small_kib) + held(&self.large, self.large_kib)) * 1024
    }

    /// Preprocesses `files` one after another (see the module docs), calling `on_image` with
    /// each image's preprocessing time. Stops at the first image that fails (its error: 400,
    /// 413 or 415) or when the deadline passes before an image is started (503 `timeout`).
    pub async fn run(
        &self,
        files: Vec<Bytes>,
        deadline: Instant,
        mut on_image: impl FnMut(Duration),
    ) -> Result<Vec<Vec<f32>>, ApiError> {
        let timed_out = || {
            ApiError::timeout(format!(
                "the request timed out waiting to be preprocessed ({} images)",
                files.len()
            ))
        };
        let mut inputs = Vec::with_capacity(files.len());
        for bytes in &files {
            if Instant::now() >= deadline {
                return Err(timed_out());
            }
            let peak_kib = probe(bytes, self.max_pixels)?.peak_bytes.div_ceil(1024);
            let large = peak_kib > u64::from(self.small_kib / 4);
            let admitted = async {
                let thread = if large {
                    Some(self.large_threads.clone().acquire_owned().await?)
                } else {
                    None
                };
                let (lane, share) = if large {
                    (&self.large, self.large_kib)
                } else {
                    (&self.small, self.small_kib)
                };
                let kib = u32::try_from(peak_kib).unwrap_or(u32::MAX).min(share);
                let memory = lane.clone().acquire_many_owned(kib).await?;
                Ok::<_, tokio::sync::AcquireError>((thread, memory))
            };
            let permit = match tokio::time::timeout_at(deadline.into(), admitted).await {
                Ok(Ok(permit)) => permit,
                Ok(Err(_)) => return Err(ApiError::internal("the preprocessing budget is closed")),
                Err(_) => return Err(timed_out()),
            };
            let (tx, rx) = oneshot::channel::<Done>();
            let (bytes, max_pixels) = (bytes.clone(), self.max_pixels);
            let counter = self.started.clone();
            self.pool.spawn(move || {
                if tx.is_closed() {
                    return; // the request is gone: not started
                }
                counter.fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                // A panic here would abort the process (rayon's default): keep it to the image.
                let input = std::panic::catch_unwind(|| preprocess(&bytes, max_pixels))
                    .unwrap_or_else(|p| {
                        Err(PreprocessError::DecodeFailed {
                            format: "unknown".to_string(),
                            message: panic_message(&*p, "panic while preprocessing"),
                        })
                    });
                drop(permit);
                let _ = tx.send((input, started.elapsed()));
            });
            let (input, took) = rx
                .await
                .map_err(|_| ApiError::internal("a preprocessing thread stopped"))?;
            on_image(took);
            inputs.push(input?);
        }
        Ok(inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Bytes {
        let image = image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 7])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        image
            .write_to(&mut out, image::ImageFormat::Png)
            .expect("encode");
        Bytes::from(out.into_inner())
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(600)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn images_are_preprocessed_in_order_and_timed() {
        let p = Preprocessing::new(2, 64 << 20, 1 << 20).expect("pool");
        let files = vec![png(40, 30), png(30, 40), png(300, 200)];
        let mut times = Vec::new();
        let inputs = p.run(files.clone(), far(), |t| times.push(t)).await;
        let inputs = inputs.expect("preprocessed");
        assert_eq!((inputs.len(), times.len()), (3, 3));
        assert_eq!(p.images_started(), 3);
        for (input, file) in inputs.iter().zip(&files) {
            assert_eq!(input, &preprocess(file, 1 << 20).expect("alone"));
        }
        assert_eq!(p.memory_in_use(), 0, "the budget is all given back");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_image_stops_the_request_with_its_error() {
        let p = Preprocessing::new(1, 64 << 20, 1 << 20).expect("pool");
        let mut seen = 0;
        let bad = Bytes::from_static(b"<html></html>");
        let e = p
            .run(vec![png(10, 10), bad, png(10, 10)], far(), |_| seen += 1)
            .await
            .expect_err("not an image");
        assert_eq!((e.kind, seen), ("not_an_image", 1));
        let e = p
            .run(vec![png(2000, 1000)], far(), |_| {})
            .await
            .expect_err("too many pixels");
        assert_eq!(e.kind, "too_many_pixels");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_image_waits_for_the_budget_until_its_deadline() {
        // A 4 MiB budget: a 600×600 PNG (about 5.3 MiB at its peak) is large, and takes all of
        // the large share (3 MiB).
        let p = Preprocessing::new(2, 4 << 20, 1 << 20).expect("pool");
        let held = p.large.clone().acquire_many_owned(1).await.expect("budget");
        let soon = Instant::now() + Duration::from_millis(100);
        let e = p
            .run(vec![png(600, 600)], soon, |_| {})
            .await
            .expect_err("no budget before the deadline");
        assert_eq!(e.kind, "timeout");
        drop(held);
        let ok = p.run(vec![png(600, 600)], far(), |_| {}).await;
        assert_eq!(ok.expect("budget free").len(), 1);
        // Past its deadline, a request starts nothing.
        let past = Instant::now();
        let e = p
            .run(vec![png(10, 10)], past, |_| panic!("started"))
            .await
            .expect_err("past its deadline");
        assert_eq!(e.kind, "timeout");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_images_do_not_wait_behind_large_ones() {
        // 64 MiB: small images are those up to 4 MiB at their peak (a 100×100 PNG: 1.1 MiB),
        // large ones (a 1000×1000 PNG: 13 MiB) share 48 MiB and one thread of two.
        let p = Preprocessing::new(2, 64 << 20, 1 << 22).expect("pool");
        let large_share = p
            .large
            .clone()
            .acquire_many_owned(48 << 10)
            .await
            .expect("all");
        let thread = p
            .large_threads
            .clone()
            .acquire_owned()
            .await
            .expect("the thread");
        let soon = Instant::now() + Duration::from_millis(200);
        let e = p.run(vec![png(1000, 1000)], soon, |_| {}).await;
        assert_eq!(e.expect_err("large: waits").kind, "timeout");
        let small = p.run(vec![png(100, 100); 4], far(), |_| {}).await;
        assert_eq!(small.expect("small: not held up").len(), 4);
        drop((large_share, thread));
        let large = p.run(vec![png(1000, 1000)], far(), |_| {}).await;
        assert_eq!(large.expect("large: its turn").len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_dropped_mid_way_starts_no_further_image() {
        // One thread, busy with a blocker: the request's first image waits in the pool's queue;
        // dropping the request there means it is never started.
        let p = Arc::new(Preprocessing::new(1, 64 << 20, 1 << 20).expect("pool"));
        let (release, wait) = std::sync::mpsc::channel::<()>();
        p.pool.spawn(move || {
            let _ = wait.recv();
        });
        let request = {
            let p = p.clone();
            tokio::spawn(async move { p.run(vec![png(50, 50), png(50, 50)], far(), |_| {}).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        request.abort();
        let _ = request.await;
        release.send(()).expect("blocker");
        // The pool is free again, and the dropped request's image was never preprocessed.
        let after = p.run(vec![png(10, 10)], far(), |_| {}).await;
        assert_eq!(after.expect("pool free").len(), 1);
        assert_eq!(p.images_started(), 1, "only the last request's image");
        assert_eq!(
            p.memory_in_use(),
            0,
            "the dropped request's budget came back"
        );
    }
}
