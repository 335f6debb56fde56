//! Shutdown: the signal that starts it, and the drain that ends it.
//!
//! On SIGTERM/SIGINT the server stops taking inference requests (they get 503 at once, and
//! readiness turns 503), answers every request already in flight and every image already
//! queued, then closes the listener — all within `--shutdown-timeout-s`. [`Drain`] counts the
//! requests in flight: a handler holds an [`InflightGuard`] from the moment it is admitted.

use std::sync::{
    atomic::{AtomicBool, AtomicUsize, Ordering},
    Arc,
};

use tokio::sync::Notify;

/// Whether the server is draining, and how many inference requests are in flight.
#[derive(Debug, Default)]
pub struct Drain {
    draining: AtomicBool,
    inflight: AtomicUsize,
    idle: Notify,
}

impl Drain {
    /// Marks an inference request in flight until the guard drops; `None` (refuse it) once
    /// draining.
    pub fn enter(self: &Arc<Self>) -> Option<InflightGuard> {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        let guard = InflightGuard(self.clone());
        // Checked after counting, so `idle` never misses a request that got past here.
        (!self.is_draining()).then_some(guard)
    }

    /// True once the drain has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Inference requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }

    /// Begins the drain: from now on [`Drain::enter`] refuses.
    pub fn begin(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Resolves once no request is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.inflight.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Counts one inference request in flight.
#[derive(Debug)]
pub struct InflightGuard(Arc<Drain>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn the_drain_refuses_new_requests_and_waits_for_the_admitted() {
        let drain = Arc::new(Drain::default());
        let admitted = drain.enter().expect("not draining yet");
        drain.begin();
        assert!(drain.enter().is_none(), "refused once draining");
        let idle = tokio::spawn({
            let drain = drain.clone();
            async move { drain.idle().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!idle.is_finished(), "a request is still in flight");
        drop(admitted);
        tokio::time::timeout(Duration::from_secs(5), idle)
            .await
            .expect("idle once the last request ends")
            .expect("task");
    }
}
