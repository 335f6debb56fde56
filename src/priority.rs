//! Thread priorities: the model's threads before the HTTP side.
//!
//! On a CPU server the threads that answer HTTP and the threads that run the model share the same
//! cores. Under a flood of requests the server must refuse (a retry storm answered with 429s at
//! tens of thousands a second), the scheduler would split the cores evenly between them, and the
//! model would lose most of its throughput to answering "come back later". So `serve` gives its
//! async (HTTP) threads a higher *nice* value than the model's: when both want a core, the
//! model gets it; when the model is idle, the HTTP side has the whole machine.
//!
//! Only lowering a priority needs no privilege, and a thread inherits the nice value of the
//! thread that creates it. So the threads that must keep the normal priority (the model's pool,
//! the preprocessing pool, each model's compute thread) are created by the main thread, never
//! from an async task; the `serve` test checks the priority of each kind.

use std::io;

/// Sets the calling thread's nice value (0–19; higher yields more). On Linux the nice value
/// belongs to each thread; elsewhere this does nothing.
pub fn set_current_thread_nice(nice: i32) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `gettid` and `setpriority` take no pointers; on Linux `PRIO_PROCESS` with a
        // thread id sets that one thread's nice value.
        let done = unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
        };
        if done != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
    Ok(())
}

/// The calling thread's nice value (0 where it cannot be read).
pub fn current_thread_nice() -> i32 {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: as above; `getpriority` may return -1 as a value, and an error (only for a bad
        // id, which ours is not) then reads as -1, which is harmless for a report.
        unsafe {
            let tid = libc::gettid();
            libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t)
        }
    }
    #[cfg(not(target_os = "linux"))]
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_lowers_its_own_priority_and_no_other() {
        let before = current_thread_nice();
        let (niced, after_own) = std::thread::spawn(move || {
            set_current_thread_nice(before + 5).unwrap();
            // A thread created now inherits the lowered priority.
            let child = std::thread::spawn(current_thread_nice).join().unwrap();
            (current_thread_nice(), child)
        })
        .join()
        .unwrap();
        if cfg!(target_os = "linux") {
            assert_eq!(niced, before + 5);
            assert_eq!(after_own, before + 5);
        }
        // The spawning thread kept its own.
        assert_eq!(current_thread_nice(), before);
    }
}
