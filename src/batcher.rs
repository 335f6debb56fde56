//! Dynamic batching: a bounded queue per model, a batching task, and one compute thread. This
//! is where the batching policy lives. It knows nothing of HTTP, images or the network: it
//! batches rows of `f32` and hands each batch to the compute function it was given.
//!
//! ```text
//! handlers ──reserve(n)──▶ n of max_queue slots, or QueueFull at once (before any decoding)
//!          ──submit()───▶ [queue: unbounded channel; each job holds one reserved slot]
//!                              │
//!                  batching task (tokio) — waits until the compute thread is free, then takes
//!                  what is queued up to max_batch_size; if fewer and more images are on
//!                  their way (announced, still being decoded), waits at most
//!                  max_batch_delay for them (dispatching at once when the batch fills);
//!                  skips jobs whose client left and fails jobs past their deadline
//!                              │ one batch at a time
//!                  compute thread (std::thread) — the compute function (the server's: a
//!                  candle forward pass), then answers each job through its own oneshot
//! ```
//!
//! The semantics are Triton's dynamic batcher with `max_queue_delay`, with one refinement: the
//! delay is only spent when a request is known to be coming (a handler [`Batcher::reserve`]s
//! places for its images before decoding them), so a lone request never waits for company that cannot arrive.
//! An announced image stops counting as "on its way" the moment the batching task takes it off
//! the queue, so the task never waits for images it already has, and never sends a batch
//! without the rest of a request whose first images it took.
//! Admission comes first: a request [`Batcher::reserve`]s its images' places before they are
//! decoded, so a full queue is refused at once (the caller answers 429, with a
//! [`Batcher::retry_after`] estimated from the model's recent throughput) and no CPU is spent on
//! images that would be refused. A job still queued at its deadline is never computed (503).

use std::{
    sync::{
        atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::panic::panic_message;

/// Batching knobs.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Largest batch handed to the model.
    pub max_batch_size: usize,
    /// Longest wait for a batch to fill once the compute thread is free.
    pub max_batch_delay: Duration,
    /// Images that may wait in the queue; beyond that, submissions are refused.
    pub max_queue: usize,
}

/// Why a job was not computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// The queue is full.
    #[error("the queue of model {0} is full")]
    QueueFull(String),
    /// The job's deadline passed while it was queued.
    #[error("the request timed out in the queue of model {0}")]
    Timeout(String),
    /// The batcher is stopping.
    #[error("model {0} is shutting down")]
    ShuttingDown(String),
    /// The forward pass failed (a bug or a device fault).
    #[error("inference failed: {0}")]
    Inference(String),
}

/// What a computed job gets back.
#[derive(Debug, Clone)]
pub struct JobOutput {
    /// The compute function's row for the job's image (the server's: its logits, then its
    /// embedding).
    pub row: Vec<f32>,
    /// Time from submission to the start of its batch's forward pass.
    pub queue_time: Duration,
    /// Duration of its batch's forward pass.
    pub inference_time: Duration,
    /// Size of the batch it ran in.
    pub batch_size: usize,
}

/// What a batcher runs on each batch: one output row per input row, in order, or an error
/// message (answered to every job of the batch as [`JobError::Inference`]).
pub trait Compute: FnMut(&[&[f32]]) -> Result<Vec<Vec<f32>>, String> + Send + 'static {}

impl<F> Compute for F where F: FnMut(&[&[f32]]) -> Result<Vec<Vec<f32>>, String> + Send + 'static {}

/// Observations the batcher reports (implemented by the server's metrics).
pub trait BatchObserver: Send + Sync + 'static {
    /// A batch of `size` ran in `inference`; its jobs waited `queue_times`.
    fn batch_done(&self, size: usize, inference: Duration, queue_times: &[Duration]);
    /// A job was dropped because its client went away.
    fn abandoned(&self);
}

const QUEUED: u8 = 0;
const TAKEN: u8 = 1;
const EXPIRED: u8 = 2;

/// A job's place in its life: queued, taken into a batch, or expired. Whoever moves it out of
/// `QUEUED` first decides: the batcher (it computes) or the waiting caller (it answers 503, or
/// left). Either way the job's queue slot (`permit`) is released at that moment, so dead jobs do
/// not hold capacity while the model is busy.
#[derive(Debug)]
struct JobState {
    phase: AtomicU8,
    permit: std::sync::Mutex<Option<OwnedSemaphorePermit>>,
}

impl JobState {
    fn leave_queue(&self, to: u8) -> bool {
        let won = self
            .phase
            .compare_exchange(QUEUED, to, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if won {
            if let Ok(mut p) = self.permit.lock() {
                p.take();
            }
        }
        won
    }

    fn take(&self) -> bool {
        self.leave_queue(TAKEN)
    }

    fn expire(&self) -> bool {
        self.leave_queue(EXPIRED)
    }
}

struct Job {
    input: Vec<f32>,
    /// Counted in `incoming` until the batching task receives it.
    announced: bool,
    submitted: Instant,
    deadline: Instant,
    state: Arc<JobState>,
    reply: oneshot::Sender<Result<JobOutput, JobError>>,
}

/// A submitted image, to be awaited with [`Ticket::wait`].
pub struct Ticket {
    rx: oneshot::Receiver<Result<JobOutput, JobError>>,
    state: Arc<JobState>,
    deadline: Instant,
    model: String,
}

impl Ticket {
    /// Waits for the result. At the deadline a job still queued is withdrawn (it will never be
    /// computed) and `Timeout` returned; a job already in a batch is waited for.
    pub async fn wait(mut self) -> Result<JobOutput, JobError> {
        let gone = || {
            JobError::Inference(format!(
                "the compute thread of model {} stopped",
                self.model
            ))
        };
        match tokio::time::timeout_at(self.deadline.into(), &mut self.rx).await {
            Ok(r) => r.unwrap_or_else(|_| Err(gone())),
            Err(_) if self.state.expire() => Err(JobError::Timeout(self.model.clone())),
            Err(_) => (&mut self.rx).await.unwrap_or_else(|_| Err(gone())),
        }
    }
}

/// Places in the queue reserved for a request's images ([`Batcher::reserve`]), while they are
/// decoded: they count against `max_queue`, and as "on their way" for the batch being filled.
/// [`Batcher::submit`] hands each image its place and its count; dropping the reservation
/// (a decoding error, a client gone) gives back what is left.
pub struct Reservation {
    permit: OwnedSemaphorePermit,
    incoming: Arc<AtomicUsize>,
    announced: usize,
}

impl Reservation {
    /// Places still held.
    pub fn len(&self) -> usize {
        self.permit.num_permits()
    }

    /// True when no place is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.incoming.fetch_sub(self.announced, Ordering::AcqRel);
    }
}

impl Drop for Ticket {
    /// A caller that stops waiting (client gone) frees the job's queue slot at once.
    fn drop(&mut self) {
        self.state.expire();
    }
}

/// The submission side of one model's batcher. Cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    model: String,
    tx: mpsc::UnboundedSender<Job>,
    incoming: Arc<AtomicUsize>,
    admission: Arc<Semaphore>,
    throughput: Arc<Throughput>,
    config: BatchConfig,
}

/// The model's recent throughput, images per second: an exponentially weighted mean over
/// batches (each weighs 1/8), kept as `f64` bits. Zero until the first batch.
#[derive(Debug, Default)]
struct Throughput(AtomicU64);

impl Throughput {
    fn record(&self, images: usize, took: Duration) {
        let rate = images as f64 / took.as_secs_f64().max(1e-6);
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let old = f64::from_bits(bits);
                let new = if old > 0.0 {
                    old + (rate - old) / 8.0
                } else {
                    rate
                };
                Some(new.to_bits())
            });
    }

    fn images_per_second(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

impl Batcher {
    /// Starts the batching task of model `model` (on the current tokio runtime) and its compute
    /// thread, which runs `compute` on each batch. Fails only if the thread cannot be started.
    pub fn spawn(
        model: &str,
        compute: impl Compute,
        config: BatchConfig,
        observer: Arc<dyn BatchObserver>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        // The compute thread asks for work on `ready` when it is free; batches go on `batches`.
        let (ready_tx, ready_rx) = mpsc::channel::<()>(1);
        let (batch_tx, batch_rx) = mpsc::channel::<Vec<Job>>(1);
        let admission = Arc::new(Semaphore::new(config.max_queue));
        let incoming = Arc::new(AtomicUsize::new(0));
        let throughput = Arc::new(Throughput::default());
        let model = model.to_string();
        let (thread_model, thread_observer, thread_throughput) =
            (model.clone(), observer.clone(), throughput.clone());
        std::thread::Builder::new()
            .name(format!("compute-{model}"))
            .spawn(move || {
                compute_thread(
                    &thread_model,
                    compute,
                    ready_tx,
                    batch_rx,
                    thread_observer,
                    &thread_throughput,
                )
            })?;
        tokio::spawn(batching_task(
            Lane {
                model: model.clone(),
                config,
                observer,
                incoming: incoming.clone(),
            },
            rx,
            ready_rx,
            batch_tx,
        ));
        Ok(Self {
            model,
            tx,
            incoming,
            admission,
            throughput,
            config,
        })
    }

    /// Images holding a place: reserved (being decoded) or queued (the `diracnet_queue_depth`
    /// gauge, read at scrape time).
    pub fn queue_depth(&self) -> usize {
        self.config.max_queue - self.admission.available_permits()
    }

    /// How long until the queue has room again, as a client should be told in `Retry-After`:
    /// the images holding a place over the model's recent throughput, rounded up to whole
    /// seconds, between 1 and 60 (1 before the first batch).
    pub fn retry_after(&self) -> Duration {
        let rate = self.throughput.images_per_second();
        let seconds = if rate > 0.0 {
            (self.queue_depth() as f64 / rate).ceil().clamp(1.0, 60.0)
        } else {
            1.0
        };
        Duration::from_secs_f64(seconds)
    }

    /// Reserves places for `n` images all or nothing, before they are decoded: `QueueFull` at
    /// once if the queue cannot take them all. While the reservation lives the images count as
    /// on their way: a batch that is not full waits for them, up to `max_batch_delay`.
    pub fn reserve(&self, n: usize) -> Result<Reservation, JobError> {
        let full = || JobError::QueueFull(self.model.clone());
        let count = u32::try_from(n).map_err(|_| full())?;
        let permit = match self.admission.clone().try_acquire_many_owned(count) {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::NoPermits) => return Err(full()),
            Err(tokio::sync::TryAcquireError::Closed) => {
                return Err(JobError::ShuttingDown(self.model.clone()))
            }
        };
        self.incoming.fetch_add(n, Ordering::AcqRel);
        Ok(Reservation {
            permit,
            incoming: self.incoming.clone(),
            announced: n,
        })
    }

    /// Queues `inputs` (normalised images), each in one of `reservation`'s places, and ends
    /// their announcement. Fails (queuing nothing) if the reservation holds fewer places.
    pub fn submit(
        &self,
        inputs: Vec<Vec<f32>>,
        deadline: Instant,
        reservation: &mut Reservation,
    ) -> Result<Vec<Ticket>, JobError> {
        if inputs.len() > reservation.len() {
            return Err(JobError::Inference(format!(
                "{} images for {} reserved places",
                inputs.len(),
                reservation.len()
            )));
        }
        let submitted = Instant::now();
        let mut tickets = Vec::with_capacity(inputs.len());
        for input in inputs {
            let (reply, rx) = oneshot::channel();
            let state = Arc::new(JobState {
                phase: AtomicU8::new(QUEUED),
                permit: std::sync::Mutex::new(reservation.permit.split(1)),
            });
            // The count moves from the reservation to the job before the job can be received.
            let counted = reservation.announced > 0;
            reservation.announced -= usize::from(counted);
            let job = Job {
                input,
                announced: counted,
                submitted,
                deadline,
                state: state.clone(),
                reply,
            };
            if self.tx.send(job).is_err() {
                // Never to be received: give its count back.
                self.incoming
                    .fetch_sub(usize::from(counted), Ordering::AcqRel);
                return Err(JobError::ShuttingDown(self.model.clone()));
            }
            tickets.push(Ticket {
                rx,
                state,
                deadline,
                model: self.model.clone(),
            });
        }
        Ok(tickets)
    }

    /// Submits `inputs` in their reserved places (see [`Batcher::submit`]) and waits for all of
    /// them (see [`Ticket::wait`]), in input order.
    pub async fn run(
        &self,
        inputs: Vec<Vec<f32>>,
        deadline: Instant,
        mut reservation: Reservation,
    ) -> Result<Vec<JobOutput>, JobError> {
        let tickets = self.submit(inputs, deadline, &mut reservation);
        drop(reservation);
        let mut outputs = Vec::new();
        for ticket in tickets? {
            outputs.push(ticket.wait().await?);
        }
        Ok(outputs)
    }

    /// Refuses further submissions; queued jobs are still computed.
    pub fn close(&self) {
        self.admission.close();
    }
}

/// Takes a job off the queue (ending its announcement) and keeps it for the batch if it is still
/// wanted; otherwise answers or drops it.
fn admit(job: Job, lane: &Lane) -> Option<Job> {
    let (model, observer) = (lane.model.as_str(), &*lane.observer);
    if job.announced {
        lane.incoming.fetch_sub(1, Ordering::AcqRel);
    }
    if job.reply.is_closed() {
        if job.state.expire() {
            observer.abandoned();
        }
        return None;
    }
    if Instant::now() >= job.deadline {
        if job.state.expire() {
            let _ = job.reply.send(Err(JobError::Timeout(model.to_string())));
        }
        return None;
    }
    if !job.state.take() {
        // The waiting caller withdrew it at its deadline.
        return None;
    }
    Some(job)
}

/// What the batching task shares with the submission side.
struct Lane {
    model: String,
    config: BatchConfig,
    observer: Arc<dyn BatchObserver>,
    incoming: Arc<AtomicUsize>,
}

async fn batching_task(
    lane: Lane,
    mut rx: mpsc::UnboundedReceiver<Job>,
    mut ready_rx: mpsc::Receiver<()>,
    batch_tx: mpsc::Sender<Vec<Job>>,
) {
    let config = lane.config;
    // Each round starts when the compute thread says it is free.
    while ready_rx.recv().await.is_some() {
        let mut batch: Vec<Job> = Vec::with_capacity(config.max_batch_size);
        // The first job still wanted (sleeping while the queue is empty).
        while batch.is_empty() {
            match rx.recv().await {
                Some(job) => batch.extend(admit(job, &lane)),
                None => return, // closed and drained
            }
        }
        // Whatever else is queued, up to the batch size; then, if not full and more images are
        // on their way (announced, still being decoded), wait at most max_batch_delay for them,
        // dispatching as soon as the batch fills.
        let until = tokio::time::Instant::now() + config.max_batch_delay;
        loop {
            while batch.len() < config.max_batch_size {
                match rx.try_recv() {
                    Ok(job) => batch.extend(admit(job, &lane)),
                    Err(_) => break,
                }
            }
            if batch.len() >= config.max_batch_size || lane.incoming.load(Ordering::SeqCst) == 0 {
                break;
            }
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(job)) => batch.extend(admit(job, &lane)),
                Ok(None) | Err(_) => break,
            }
        }
        if batch_tx.send(batch).await.is_err() {
            return;
        }
    }
}

fn compute_thread(
    model: &str,
    mut compute: impl Compute,
    ready_tx: mpsc::Sender<()>,
    mut batch_rx: mpsc::Receiver<Vec<Job>>,
    observer: Arc<dyn BatchObserver>,
    throughput: &Throughput,
) {
    loop {
        if ready_tx.blocking_send(()).is_err() {
            return;
        }
        let Some(batch) = batch_rx.blocking_recv() else {
            return;
        };
        let started = Instant::now();
        let inputs: Vec<&[f32]> = batch.iter().map(|j| j.input.as_slice()).collect();
        // A panic in the compute function must not kill the model: it fails this batch only.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compute(&inputs)))
            .map_err(|p| panic_message(&*p, "panic in the forward pass"))
            .and_then(|r| r);
        let inference = started.elapsed();
        let queue_times: Vec<Duration> = batch.iter().map(|j| started - j.submitted).collect();
        let size = batch.len();
        match result {
            Ok(rows) if rows.len() == size => {
                observer.batch_done(size, inference, &queue_times);
                throughput.record(size, inference);
                for ((job, row), queue_time) in batch.into_iter().zip(rows).zip(queue_times) {
                    let _ = job.reply.send(Ok(JobOutput {
                        row,
                        queue_time,
                        inference_time: inference,
                        batch_size: size,
                    }));
                }
            }
            other => {
                let e = match other {
                    Ok(rows) => format!("{} output rows for a batch of {size}", rows.len()),
                    Err(e) => e,
                };
                tracing::error!(model, error = %e, "inference failed");
                for job in batch {
                    let _ = job.reply.send(Err(JobError::Inference(e.clone())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Quiet;

    impl BatchObserver for Quiet {
        fn batch_done(&self, _: usize, _: Duration, _: &[Duration]) {}
        fn abandoned(&self) {}
    }

    /// The test's side of a batcher started with [`Batcher::spawn`]: the compute function
    /// reports each batch's rows on `batches` and, when the batcher was made `held`, computes
    /// only once `release` says so. It answers each row with its first value, and panics on a
    /// row starting with a negative value.
    struct Model {
        batches: mpsc::UnboundedReceiver<Vec<f32>>,
        release: std::sync::mpsc::Sender<()>,
    }

    fn batcher(delay: Duration, held: bool) -> (Batcher, Model) {
        let config = BatchConfig {
            max_batch_size: 32,
            max_batch_delay: delay,
            max_queue: 64,
        };
        let (batch_tx, batches) = mpsc::unbounded_channel();
        let (release, release_rx) = std::sync::mpsc::channel::<()>();
        let compute = move |rows: &[&[f32]]| {
            let firsts: Vec<f32> = rows.iter().map(|r| r[0]).collect();
            let _ = batch_tx.send(firsts.clone());
            if held {
                let _ = release_rx.recv();
            }
            assert!(firsts.iter().all(|&v| v >= 0.0), "a negative row");
            Ok(firsts.into_iter().map(|v| vec![v]).collect())
        };
        let batcher = Batcher::spawn("m", compute, config, Arc::new(Quiet)).expect("thread");
        (batcher, Model { batches, release })
    }

    fn images(n: usize) -> Vec<Vec<f32>> {
        vec![vec![0.0]; n]
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(600)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_are_never_split_nor_wait_for_images_already_queued() {
        // A delay this long would show if the task waited for images it already had.
        let (batcher, mut model) = batcher(Duration::from_secs(5), false);
        for round in 0..200 {
            let started = Instant::now();
            let outputs = batcher.run(images(3), far(), batcher.reserve(3).expect("room"));
            let (outputs, batch) = tokio::join!(outputs, model.batches.recv());
            assert_eq!(
                batch.expect("a batch").len(),
                3,
                "round {round}: the request was split"
            );
            assert_eq!(outputs.expect("answers").len(), 3);
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "round {round}: waited {:?} for queued images",
                started.elapsed()
            );
            assert_eq!(batcher.incoming.load(Ordering::SeqCst), 0);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_waits_for_announced_images_up_to_the_delay() {
        let (batcher, mut model) = batcher(Duration::from_secs(5), false);
        // B is reserved (being decoded) when A is queued: the batch waits for B.
        let mut b_reserved = batcher.reserve(1).expect("room");
        let mut a_reserved = batcher.reserve(1).expect("room");
        let a = batcher.submit(images(1), far(), &mut a_reserved);
        drop(a_reserved);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let b = batcher.submit(images(1), far(), &mut b_reserved);
        drop(b_reserved);
        let batch = model.batches.recv().await.expect("a batch");
        assert_eq!(batch.len(), 2);
        drop((a, b));

        // A reservation that ends without images (a decoding error) stops counting, and gives
        // its places back.
        drop(batcher.reserve(2).expect("room"));
        assert_eq!(batcher.incoming.load(Ordering::SeqCst), 0);
        assert_eq!(batcher.queue_depth(), 0);
        let started = Instant::now();
        let mut one = batcher.reserve(1).expect("room");
        let c = batcher.submit(images(1), far(), &mut one);
        drop(one);
        let batch = model.batches.recv().await.expect("a batch");
        assert_eq!(batch.len(), 1);
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(c);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_refuses_and_a_job_past_its_deadline_is_never_computed() {
        let (batcher, mut model) = batcher(Duration::ZERO, true);
        // The model is busy with A; B waits in the queue.
        let reserve = |n| batcher.reserve(n).expect("room");
        let a = batcher.submit(vec![vec![1.0]], far(), &mut reserve(1));
        assert_eq!(model.batches.recv().await, Some(vec![1.0]));
        let soon = Instant::now() + Duration::from_millis(50);
        let b = batcher.submit(vec![vec![2.0]], soon, &mut reserve(1));
        // 62 more fill the queue (64) with a reservation for 1 (an image being decoded); one
        // more is refused whole, at once.
        let rest = batcher.submit(images(62), far(), &mut reserve(62));
        let decoding = reserve(1);
        assert_eq!(batcher.queue_depth(), 64);
        assert!(matches!(batcher.reserve(1), Err(JobError::QueueFull(_))));
        assert!(matches!(batcher.reserve(65), Err(JobError::QueueFull(_))));
        // More images than places reserved is refused, queuing nothing.
        let mut two = decoding;
        assert!(batcher.submit(images(2), far(), &mut two).is_err());
        assert_eq!(batcher.queue_depth(), 64);
        drop(two);
        let b = b.expect("room").pop().expect("a ticket");
        assert!(matches!(b.wait().await, Err(JobError::Timeout(_))));
        // B left the queue at its deadline: the next batch is 32 of the other 62, without B.
        model.release.send(()).expect("compute thread");
        let a = a.expect("room").pop().expect("a ticket").wait().await;
        assert_eq!(a.expect("computed").row, vec![1.0]);
        let batch = model.batches.recv().await.expect("a batch");
        assert_eq!(batch, vec![0.0; 32], "the largest batch, without B");
        drop(rest);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_batch_fails_alone_and_the_model_goes_on() {
        let (batcher, mut model) = batcher(Duration::ZERO, false);
        let bad = batcher
            .run(vec![vec![-1.0]], far(), batcher.reserve(1).expect("room"))
            .await;
        assert!(
            matches!(bad, Err(JobError::Inference(ref m)) if m.contains("a negative row")),
            "{bad:?}"
        );
        let good = batcher
            .run(vec![vec![3.0]], far(), batcher.reserve(1).expect("room"))
            .await;
        assert_eq!(good.expect("computed")[0].row, vec![3.0]);
        assert_eq!(model.batches.recv().await, Some(vec![-1.0]));
        assert_eq!(model.batches.recv().await, Some(vec![3.0]));
    }

    #[test]
    fn retry_after_is_the_queue_over_the_recent_throughput() {
        let throughput = Throughput::default();
        assert_eq!(throughput.images_per_second(), 0.0);
        throughput.record(10, Duration::from_millis(100));
        assert!((throughput.images_per_second() - 100.0).abs() < 1e-9);
        // Each batch moves the mean an eighth of the way.
        throughput.record(2, Duration::from_millis(100));
        assert!((throughput.images_per_second() - 90.0).abs() < 1e-9);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retry_after_grows_with_the_queue() {
        let (batcher, _model) = batcher(Duration::ZERO, true);
        assert_eq!(
            batcher.retry_after(),
            Duration::from_secs(1),
            "no batch yet"
        );
        batcher.throughput.record(4, Duration::from_secs(1));
        let held = batcher.reserve(40).expect("room");
        assert_eq!(batcher.retry_after(), Duration::from_secs(10));
        let more = batcher.reserve(24).expect("room");
        assert_eq!(batcher.retry_after(), Duration::from_secs(16));
        drop((held, more));
        assert_eq!(
            batcher.retry_after(),
            Duration::from_secs(1),
            "at least 1 s"
        );
    }
}
