//! Where a forward pass's time goes, op by op (`diracnet bench --profile`).
//!
//! Off by default, when recording costs one relaxed atomic load per layer. Once [`start`]ed,
//! each layer of the chain ([`super::layers`]) times its `forward` and adds it to its op's
//! total; ops of the same kind and shape (the three 512-channel 7×7 convs of DiracNet-18, say)
//! share one entry, with their calls counted. The times are wall-clock on the calling thread:
//! right for the CPU, whose ops finish before they return, not for a GPU, whose kernels run
//! asynchronously (`bench` refuses `--profile` there).

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

static ON: AtomicBool = AtomicBool::new(false);
static OPS: Mutex<Vec<Op>> = Mutex::new(Vec::new());

/// One kind of op, and the time its calls took.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    /// What ran, e.g. `conv3x3 [1, 7, 7, 512] direct-bf16`.
    pub name: String,
    /// Calls recorded.
    pub calls: u64,
    /// Their total wall time.
    pub total: Duration,
}

/// Starts recording, from no ops.
pub fn start() {
    OPS.lock().unwrap_or_else(|e| e.into_inner()).clear();
    ON.store(true, Ordering::Relaxed);
}

/// Stops recording and returns the ops recorded, in the order they first ran.
pub fn stop() -> Vec<Op> {
    ON.store(false, Ordering::Relaxed);
    std::mem::take(&mut *OPS.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Runs `f`, and, while recording, adds its wall time to op `name()` (made only then).
pub fn time<T>(name: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
    if !ON.load(Ordering::Relaxed) {
        return f();
    }
    let started = Instant::now();
    let out = f();
    let took = started.elapsed();
    let name = name();
    let mut ops = OPS.lock().unwrap_or_else(|e| e.into_inner());
    match ops.iter_mut().find(|op| op.name == name) {
        Some(op) => {
            op.calls += 1;
            op.total += took;
        }
        None => ops.push(Op {
            name,
            calls: 1,
            total: took,
        }),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_while_started_and_sums_calls_of_one_op() {
        // The only test that starts recording (the others run passes meanwhile, unrecorded
        // unless it is on: their layers' ops would join these, so only names here are checked).
        assert_eq!(time(|| unreachable!("named while off"), || 7), 7);
        start();
        for _ in 0..3 {
            time(
                || "profile-test a".into(),
                || std::thread::sleep(Duration::from_millis(2)),
            );
        }
        time(|| "profile-test b".into(), || ());
        let ops = stop();
        let a = ops.iter().find(|op| op.name == "profile-test a").unwrap();
        assert_eq!(a.calls, 3);
        assert!(a.total >= Duration::from_millis(6), "{a:?}");
        let at = |name: &str| ops.iter().position(|op| op.name == name).unwrap();
        assert!(
            at("profile-test a") < at("profile-test b"),
            "first-run order"
        );
        time(|| unreachable!("named after stop"), || ());
        assert!(stop().is_empty());
    }
}
