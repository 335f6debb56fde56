//! Dynamic batching: a bounded queue per model, a batching task, and one compute thread. This
//! is where the batching policy lives. It knows nothing of HTTP, images or the network: it
//! batches rows of `f32` and hands each batch to the compute function it was given.
//!
//! ```text
//! handlers ──submit()──▶ [queue: unbounded channel, admission bounded by a semaphore]
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
//! delay is only spent when a request is known to be coming (a handler [`Batcher::announce`]s
//! images before decoding them), so a lone request never waits for company that cannot arrive.
//! An announced image stops counting as "on its way" the moment the batching task takes it off
//! the queue, so the task never waits for images it already has, and never sends a batch
//! without the rest of a request whose first images it took.
//! A full queue is refused at once (the caller answers 429); a job still queued at its deadline is
//! never computed (503).

use std::{
    sync::{
        atomic::{AtomicU8, AtomicUsize, Ordering},
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
    /// Logits for the job's image.
    pub logits: Vec<f32>,
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

/// Images announced but not yet queued, while the guard lives; [`Batcher::run`] hands each
/// image's count to its job as it queues it.
pub struct Announced {
    incoming: Arc<AtomicUsize>,
    n: usize,
}

impl Drop for Announced {
    fn drop(&mut self) {
        self.incoming.fetch_sub(self.n, Ordering::AcqRel);
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
    config: BatchConfig,
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
        let model = model.to_string();
        let (thread_model, thread_observer) = (model.clone(), observer.clone());
        std::thread::Builder::new()
            .name(format!("compute-{model}"))
            .spawn(move || {
                compute_thread(&thread_model, compute, ready_tx, batch_rx, thread_observer)
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
            config,
        })
    }

    /// Images waiting in the queue (the `diracnet_queue_depth` gauge, read at scrape time).
    pub fn queue_depth(&self) -> usize {
        self.config.max_queue - self.admission.available_permits()
    }

    /// Tells the batcher that `n` images are on their way (being decoded) until the guard drops:
    /// a batch that is not full waits for them, up to `max_batch_delay`.
    pub fn announce(&self, n: usize) -> Announced {
        self.incoming.fetch_add(n, Ordering::AcqRel);
        Announced {
            incoming: self.incoming.clone(),
            n,
        }
    }

    /// Queues `inputs` (normalised images) all or nothing: if the queue cannot take them all,
    /// nothing is queued and `QueueFull` is returned. Each queued image takes over one count of
    /// `announced`, if any is left.
    pub fn submit(
        &self,
        inputs: Vec<Vec<f32>>,
        deadline: Instant,
        announced: &mut Announced,
    ) -> Result<Vec<Ticket>, JobError> {
        let n = u32::try_from(inputs.len()).map_err(|_| JobError::QueueFull(self.model.clone()))?;
        let mut permit = match self.admission.clone().try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                return Err(JobError::QueueFull(self.model.clone()))
            }
            Err(tokio::sync::TryAcquireError::Closed) => {
                return Err(JobError::ShuttingDown(self.model.clone()))
            }
        };
        let submitted = Instant::now();
        let mut tickets = Vec::with_capacity(inputs.len());
        for input in inputs {
            let (reply, rx) = oneshot::channel();
            let state = Arc::new(JobState {
                phase: AtomicU8::new(QUEUED),
                permit: std::sync::Mutex::new(permit.split(1)),
            });
            // The count moves from the guard to the job before the job can be received.
            let counted = announced.n > 0;
            announced.n -= usize::from(counted);
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

    /// Submits `inputs` (ending their announcement, see [`Batcher::submit`]) and waits for all
    /// of them (see [`Ticket::wait`]), in input order.
    pub async fn run(
        &self,
        inputs: Vec<Vec<f32>>,
        deadline: Instant,
        mut announced: Announced,
    ) -> Result<Vec<JobOutput>, JobError> {
        let tickets = self.submit(inputs, deadline, &mut announced);
        drop(announced);
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
                for ((job, logits), queue_time) in batch.into_iter().zip(rows).zip(queue_times) {
                    let _ = job.reply.send(Ok(JobOutput {
                        logits,
                        queue_time,
                        inference_time: inference,
                        batch_size: size,
                    }));
                }
            }
            other => {
                let e = match other {
                    Ok(rows) => format!("{} rows of logits for a batch of {size}", rows.len()),
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
            let outputs = batcher.run(images(3), far(), batcher.announce(3));
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
        // B is announced (being decoded) when A is queued: the batch waits for B.
        let b_announced = batcher.announce(1);
        let mut a_announced = batcher.announce(1);
        let a = batcher.submit(images(1), far(), &mut a_announced);
        drop(a_announced);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut b_announced = b_announced;
        let b = batcher.submit(images(1), far(), &mut b_announced);
        drop(b_announced);
        let batch = model.batches.recv().await.expect("a batch");
        assert_eq!(batch.len(), 2);
        drop((a, b));

        // An announcement that ends without images (a decoding error) stops counting.
        drop(batcher.announce(2));
        assert_eq!(batcher.incoming.load(Ordering::SeqCst), 0);
        let started = Instant::now();
        let mut none = batcher.announce(0);
        let c = batcher.submit(images(1), far(), &mut none);
        let batch = model.batches.recv().await.expect("a batch");
        assert_eq!(batch.len(), 1);
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(c);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_refuses_and_a_job_past_its_deadline_is_never_computed() {
        let (batcher, mut model) = batcher(Duration::ZERO, true);
        // The model is busy with A; B waits in the queue.
        let a = batcher.submit(vec![vec![1.0]], far(), &mut batcher.announce(0));
        assert_eq!(model.batches.recv().await, Some(vec![1.0]));
        let soon = Instant::now() + Duration::from_millis(50);
        let b = batcher.submit(vec![vec![2.0]], soon, &mut batcher.announce(0));
        // 63 more fill the queue (64); one more is refused whole.
        let rest = batcher.submit(images(63), far(), &mut batcher.announce(0));
        assert_eq!(batcher.queue_depth(), 64);
        let refused = batcher.submit(images(1), far(), &mut batcher.announce(0));
        assert!(matches!(refused, Err(JobError::QueueFull(_))));
        let b = b.expect("room").pop().expect("a ticket");
        assert!(matches!(b.wait().await, Err(JobError::Timeout(_))));
        // B left the queue at its deadline: the next batch is 32 of the other 63, without B.
        model.release.send(()).expect("compute thread");
        let a = a.expect("room").pop().expect("a ticket").wait().await;
        assert_eq!(a.expect("computed").logits, vec![1.0]);
        let batch = model.batches.recv().await.expect("a batch");
        assert_eq!(batch, vec![0.0; 32], "the largest batch, without B");
        drop(rest);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_batch_fails_alone_and_the_model_goes_on() {
        let (batcher, mut model) = batcher(Duration::ZERO, false);
        let bad = batcher
            .run(vec![vec![-1.0]], far(), batcher.announce(1))
            .await;
        assert!(
            matches!(bad, Err(JobError::Inference(ref m)) if m.contains("a negative row")),
            "{bad:?}"
        );
        let good = batcher
            .run(vec![vec![3.0]], far(), batcher.announce(1))
            .await;
        assert_eq!(good.expect("computed")[0].logits, vec![3.0]);
        assert_eq!(model.batches.recv().await, Some(vec![-1.0]));
        assert_eq!(model.batches.recv().await, Some(vec![3.0]));
    }
}
