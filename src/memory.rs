//! Process memory: allocator settings for a server that allocates and frees MB-sized buffers on
//! every request (the decoded image, the network input, a forward pass's activations), and the
//! peak resident set that benchmarks report.

/// Makes glibc malloc keep freed buffers for reuse instead of handing them back to the kernel,
/// which by default it does and then page-faults them in again on the next request: a quarter
/// of preprocessing time went to the kernel.
///
/// Buffers up to glibc's largest mmap threshold (32 MiB on 64-bit) come from the heap; larger
/// ones (activations of big batches) still come from `mmap` and go back when freed. The price:
/// the process keeps the memory it has freed, up to 256 MiB at the top of each heap, so resident
/// memory stays near its peak instead of falling between bursts.
///
/// Does nothing when the operator tunes malloc through the environment (`MALLOC_MMAP_THRESHOLD_`,
/// `MALLOC_TRIM_THRESHOLD_`, `GLIBC_TUNABLES`), or on other C libraries. Call it once, first
/// thing in `main`.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tuned = [
            "MALLOC_MMAP_THRESHOLD_",
            "MALLOC_TRIM_THRESHOLD_",
            "GLIBC_TUNABLES",
        ];
        if tuned.iter().any(|v| std::env::var_os(v).is_some()) {
            return;
        }
        // glibc's DEFAULT_MMAP_THRESHOLD_MAX: 4 MiB per byte of `long`.
        let max_mmap_threshold = (4 << 20) * std::mem::size_of::<libc::c_long>() as libc::c_int;
        // SAFETY: `mallopt` only sets allocator parameters; it takes no pointers. A setting it
        // refuses (return value 0) leaves glibc's default in place, which is harmless.
        unsafe {
            // A fixed threshold also turns off glibc's sliding one.
            libc::mallopt(libc::M_MMAP_THRESHOLD, max_mmap_threshold);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        }
    }
}

/// Peak resident set size of this process, MiB (Linux; `None` elsewhere).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
