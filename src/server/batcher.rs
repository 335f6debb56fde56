//! Dynamic batching: a bounded queue per model, a batching task, and one compute thread.
//!
//! ```text
//! handlers ──submit()──▶ [queue: unbounded channel, admission bounded by a semaphore]
//!                              │
//!                  batching task (tokio) — waits until the compute thread is free, then takes
//!                  what is queued up to max_batch_size; if fewer, waits at most
//!                  max_batch_delay for more (dispatching at once when the batch fills);
//!                  skips jobs whose client left and fails jobs past their deadline
//!                              │ one batch at a time
//!                  compute thread (std::thread) — candle forward pass, then answers each
//!                  job through its own oneshot
//! ```
//!
//! The semantics are Triton's dynamic batcher with `max_queue_delay`: a full queue is refused at
//! once (the caller answers 429), a job still queued at its deadline is never computed (503).

use std::{
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::classify::Classifier;

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

/// Observations the batcher reports (implemented by the server's metrics).
pub trait BatchObserver: Send + Sync + 'static {
    /// A batch of `size` ran in `inference`; its jobs waited `queue_times`.
    fn batch_done(&self, size: usize, inference: Duration, queue_times: &[Duration]);
    /// A job was dropped because its client went away.
    fn abandoned(&self);
    /// The queue now holds `depth` images.
    fn queue_depth(&self, depth: usize);
}

const QUEUED: u8 = 0;
const TAKEN: u8 = 1;
const EXPIRED: u8 = 2;

/// A job's place in its life: queued, taken into a batch, or expired. Whoever moves it out of
/// `QUEUED` first decides: the batcher (it computes) or the waiting caller (it answers 503).
#[derive(Debug, Default)]
struct JobState(AtomicU8);

impl JobState {
    fn take(&self) -> bool {
        self.0
            .compare_exchange(QUEUED, TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn expire(&self) -> bool {
        self.0
            .compare_exchange(QUEUED, EXPIRED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

struct Job {
    input: Vec<f32>,
    submitted: Instant,
    deadline: Instant,
    state: Arc<JobState>,
    reply: oneshot::Sender<Result<JobOutput, JobError>>,
    /// Held while the job is queued: the queue's capacity.
    permit: Option<OwnedSemaphorePermit>,
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
        let gone = || JobError::ShuttingDown(self.model.clone());
        match tokio::time::timeout_at(self.deadline.into(), &mut self.rx).await {
            Ok(r) => r.unwrap_or_else(|_| Err(gone())),
            Err(_) if self.state.expire() => Err(JobError::Timeout(self.model.clone())),
            Err(_) => (&mut self.rx).await.unwrap_or_else(|_| Err(gone())),
        }
    }
}

/// The submission side of one model's batcher. Cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    model: String,
    tx: mpsc::UnboundedSender<Job>,
    admission: Arc<Semaphore>,
    config: BatchConfig,
    observer: Arc<dyn BatchObserver>,
}

impl Batcher {
    /// Starts the batching task (on the current tokio runtime) and the compute thread.
    pub fn spawn(
        classifier: Arc<Classifier>,
        config: BatchConfig,
        observer: Arc<dyn BatchObserver>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        // The compute thread asks for work on `ready` when it is free; batches go on `batches`.
        let (ready_tx, ready_rx) = mpsc::channel::<()>(1);
        let (batch_tx, batch_rx) = mpsc::channel::<Vec<Job>>(1);
        let admission = Arc::new(Semaphore::new(config.max_queue));
        let model = classifier.name.clone();
        tokio::spawn(batching_task(
            model.clone(),
            rx,
            ready_rx,
            batch_tx,
            config,
            observer.clone(),
            admission.clone(),
        ));
        let obs = observer.clone();
        std::thread::Builder::new()
            .name(format!("compute-{model}"))
            .spawn(move || compute_thread(classifier, ready_tx, batch_rx, obs))
            .expect("spawn compute thread");
        Self {
            model,
            tx,
            admission,
            config,
            observer,
        }
    }

    /// The batching knobs.
    pub fn config(&self) -> BatchConfig {
        self.config
    }

    /// Images waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.config.max_queue - self.admission.available_permits()
    }

    /// Queues `inputs` (normalised images) all or nothing: if the queue cannot take them all,
    /// nothing is queued and `QueueFull` is returned.
    pub fn submit(
        &self,
        inputs: Vec<Vec<f32>>,
        deadline: Instant,
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
            let state = Arc::new(JobState::default());
            let job = Job {
                input,
                submitted,
                deadline,
                state: state.clone(),
                reply,
                permit: permit.split(1),
            };
            if self.tx.send(job).is_err() {
                return Err(JobError::ShuttingDown(self.model.clone()));
            }
            tickets.push(Ticket {
                rx,
                state,
                deadline,
                model: self.model.clone(),
            });
        }
        self.observer.queue_depth(self.queue_depth());
        Ok(tickets)
    }

    /// Submits `inputs` and waits for all of them (see [`Ticket::wait`]), in input order.
    pub async fn run(
        &self,
        inputs: Vec<Vec<f32>>,
        deadline: Instant,
    ) -> Result<Vec<JobOutput>, JobError> {
        let mut outputs = Vec::with_capacity(inputs.len());
        for ticket in self.submit(inputs, deadline)? {
            outputs.push(ticket.wait().await?);
        }
        Ok(outputs)
    }

    /// Refuses further submissions; queued jobs are still computed.
    pub fn close(&self) {
        self.admission.close();
    }
}

/// Keeps a job for the batch if it is still wanted; otherwise answers or drops it. A kept job
/// leaves the queue: its admission permit is released.
fn admit(mut job: Job, model: &str, observer: &dyn BatchObserver) -> Option<Job> {
    job.permit = None;
    if job.reply.is_closed() {
        observer.abandoned();
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

async fn batching_task(
    model: String,
    mut rx: mpsc::UnboundedReceiver<Job>,
    mut ready_rx: mpsc::Receiver<()>,
    batch_tx: mpsc::Sender<Vec<Job>>,
    config: BatchConfig,
    observer: Arc<dyn BatchObserver>,
    admission: Arc<Semaphore>,
) {
    let report_depth = || observer.queue_depth(config.max_queue - admission.available_permits());
    // Each round starts when the compute thread says it is free.
    while ready_rx.recv().await.is_some() {
        let mut batch: Vec<Job> = Vec::with_capacity(config.max_batch_size);
        // The first job still wanted (sleeping while the queue is empty).
        while batch.is_empty() {
            match rx.recv().await {
                Some(job) => batch.extend(admit(job, &model, &*observer)),
                None => return, // closed and drained
            }
        }
        // Whatever else is queued, up to the batch size.
        while batch.len() < config.max_batch_size {
            match rx.try_recv() {
                Ok(job) => batch.extend(admit(job, &model, &*observer)),
                Err(_) => break,
            }
        }
        // Not full: wait at most max_batch_delay for more, dispatching as soon as it fills.
        let until = tokio::time::Instant::now() + config.max_batch_delay;
        while batch.len() < config.max_batch_size {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(job)) => batch.extend(admit(job, &model, &*observer)),
                Ok(None) | Err(_) => break,
            }
        }
        report_depth();
        if batch_tx.send(batch).await.is_err() {
            return;
        }
    }
}

fn compute_thread(
    classifier: Arc<Classifier>,
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
        let result = classifier.logits(&inputs);
        let inference = started.elapsed();
        let queue_times: Vec<Duration> = batch.iter().map(|j| started - j.submitted).collect();
        observer.batch_done(batch.len(), inference, &queue_times);
        let size = batch.len();
        match result {
            Ok(rows) => {
                for ((job, logits), queue_time) in batch.into_iter().zip(rows).zip(queue_times) {
                    let _ = job.reply.send(Ok(JobOutput {
                        logits,
                        queue_time,
                        inference_time: inference,
                        batch_size: size,
                    }));
                }
            }
            Err(e) => {
                tracing::error!(model = %classifier.name, error = %e, "inference failed");
                for job in batch {
                    let _ = job.reply.send(Err(JobError::Inference(e.to_string())));
                }
            }
        }
    }
}
