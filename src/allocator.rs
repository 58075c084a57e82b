//! Allocator tuning for tensor work. glibc serves allocations above its mmap threshold (at most
//! 32 MiB) with fresh pages that the kernel must zero, and unmaps them on free; the encoder
//! allocates and frees tensors of hundreds of MiB per layer (attention scores), so without this
//! about half of the CPU time went to page faults and page clearing (measured with perf on the
//! embed and train stages). Pinning the threshold at glibc's maximum (32 MiB) from the start
//! keeps freed buffers up to that size in the heap for reuse; larger tensors are still mapped
//! afresh, which is why `embed` packs small batches (1,024 tokens by default).

/// Call once at program start, before the allocator is busy.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before other threads start
    // allocating and with documented parameter names and values.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
