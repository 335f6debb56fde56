//! Process-wide allocator settings for a server that allocates and frees MB-sized buffers on
//! every request (the decoded image, the network input, a forward pass's activations).

/// Makes glibc malloc keep freed buffers of up to 32 MiB for reuse instead of handing them back
/// to the kernel, which by default it does and then page-faults them in again on the next
/// request: a quarter of preprocessing time went to the kernel. Buffers above 32 MiB (activations
/// of large batches) still come from `mmap` and go back when freed. Does nothing on other C
/// libraries. Call it once, first thing in `main`.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets allocator parameters; it is thread-safe and takes no pointers.
    unsafe {
        // A fixed threshold also turns off glibc's sliding one. 32 MiB is glibc's maximum.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        // Only trim the heap's top when over 256 MiB of it are free.
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}
