//! Allocator for tensor work. The encoder allocates and frees the same large buffers every
//! layer and every step (activations, gradients, attention scores of tens of MiB). glibc serves
//! blocks above its mmap threshold with fresh pages, which the kernel must fault in and zero,
//! and unmaps them on free: measured with perf, page faults and page clearing took about a
//! sixth to a half of the CPU time of the train and embed stages.
//!
//! [`TensorAllocator`] keeps freed large blocks in size classes (1/8 steps between powers of
//! two) and hands them out again, so a steady-state training step touches no new pages. It
//! holds at most half the machine's memory (the training benchmark's process peaks at 2.5 GB
//! resident); beyond that, freed blocks go back to the system. It caches only while tensor work
//! runs ([`TensorWork`]): other work (reading Parquet, searching) frees blocks of ever-new
//! sizes that the cache would hold and never hand out again (the search of a 1M x 768 corpus
//! kept 800 MiB of a reader's growing buffers so). Small blocks go straight to the system
//! allocator. Fresh large blocks ask for huge pages (`advise_huge_pages`). Binaries opt in with
//! `#[global_allocator]`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Blocks of this size or smaller are not cached: glibc reuses them well on its own.
const CACHED_MIN: usize = 1 << 20;
/// Size classes per power of two.
const STEPS: usize = 8;
/// Powers of two covered: 2^20 ..= 2^63.
const CLASSES: usize = (usize::BITS as usize - 20) * STEPS;
/// The alignment glibc's malloc guarantees; blocks needing more are not cached.
const MAX_ALIGN: usize = 16;
/// The size of a huge page (x86-64, aarch64 with 4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;

/// How many [`TensorWork`] guards are alive.
static TENSOR_WORK: AtomicUsize = AtomicUsize::new(0);

/// While one is alive, [`TensorAllocator`] keeps freed large blocks for reuse; once none is,
/// the next large allocation or free returns the cache to the system. Held by what runs
/// tensors (a trainer, an embedder, the embedded LLM) for as long as it exists.
#[derive(Debug)]
pub struct TensorWork(());

impl TensorWork {
    pub fn begin() -> TensorWork {
        TENSOR_WORK.fetch_add(1, Ordering::Relaxed);
        TensorWork(())
    }
}

impl Drop for TensorWork {
    fn drop(&mut self) {
        TENSOR_WORK.fetch_sub(1, Ordering::Relaxed);
    }
}

fn tensor_work_running() -> bool {
    TENSOR_WORK.load(Ordering::Relaxed) > 0
}

/// Freed blocks of one size class (raw addresses, so the lists are `Send`).
struct Bin(Mutex<Vec<usize>>);

pub struct TensorAllocator {
    bins: [Bin; CLASSES],
    cached: AtomicUsize,
    /// The most bytes kept in the cache (0: not yet read from the system).
    limit: AtomicUsize,
}

impl TensorAllocator {
    pub const fn new() -> TensorAllocator {
        TensorAllocator {
            bins: [const { Bin(Mutex::new(Vec::new())) }; CLASSES],
            cached: AtomicUsize::new(0),
            limit: AtomicUsize::new(0),
        }
    }

    fn limit(&self) -> usize {
        match self.limit.load(Ordering::Relaxed) {
            0 => {
                let limit = physical_memory() / 2;
                self.limit.store(limit, Ordering::Relaxed);
                limit
            }
            limit => limit,
        }
    }

    /// A cached block of class `index` (of `block` bytes), if one is free. With no tensor work
    /// running, the cache goes back to the system first.
    fn reuse(&self, index: usize, block: usize) -> Option<*mut u8> {
        if !tensor_work_running() {
            self.release();
            return None;
        }
        let addr = self.bins[index].0.lock().ok()?.pop()?;
        self.cached.fetch_sub(block, Ordering::Relaxed);
        Some(addr as *mut u8)
    }

    /// Returns every cached block to the system.
    fn release(&self) {
        if self.cached.load(Ordering::Relaxed) == 0 {
            return;
        }
        for (index, bin) in self.bins.iter().enumerate() {
            let Ok(mut bin) = bin.0.lock() else { continue };
            if bin.is_empty() {
                // (The largest classes' sizes do not fit in usize; no block of theirs exists.)
                continue;
            }
            let block = class_block(index);
            for addr in bin.drain(..) {
                self.cached.fetch_sub(block, Ordering::Relaxed);
                // SAFETY: cached blocks came from `System` with this class's block layout.
                unsafe { System.dealloc(addr as *mut u8, block_layout(block)) }
            }
        }
    }
}

impl Default for TensorAllocator {
    fn default() -> Self {
        Self::new()
    }
}

/// The size class of a cacheable layout and the block size it stands for.
fn class(layout: Layout) -> Option<(usize, usize)> {
    let size = layout.size();
    if size <= CACHED_MIN || layout.align() > MAX_ALIGN {
        return None;
    }
    // size lies in (2^p, 2^(p+1)]; the classes split that range into STEPS equal parts.
    let p = (usize::BITS - 1 - (size - 1).leading_zeros()) as usize;
    let step = 1usize << (p - 3);
    let index = (size - 1 - (1 << p)) / step;
    let block = (1 << p) + (index + 1) * step;
    Some(((p - 20) * STEPS + index, block))
}

/// How a class's blocks are allocated from the system. Blocks of a huge page or more start on
/// a huge page boundary, so that huge pages back all of them but the tail: an unaligned block
/// of a few MiB had up to 2 MiB of 4 KiB pages at each end (measured on the evaluation
/// benchmark, loading a run of 18 MB: 4,000 page faults, 1,500 with aligned blocks).
fn block_layout(block: usize) -> Layout {
    let align = if block >= HUGE_PAGE {
        HUGE_PAGE
    } else {
        MAX_ALIGN
    };
    // SAFETY: `block` is a class size, non-zero and far below isize::MAX rounded to `align`;
    // `align` is a power of two.
    unsafe { Layout::from_size_align_unchecked(block, align) }
}

/// The block size of class `index` (the inverse of [`class`]).
fn class_block(index: usize) -> usize {
    let p = index / STEPS + 20;
    (1 << p) + (index % STEPS + 1) * (1 << (p - 3))
}

// SAFETY: every block handed out is either fresh from `System` or a block of the same size
// class previously allocated from `System` with the class's block size and an alignment of at
// most MAX_ALIGN (which System always provides), and freed by its owner; blocks are returned
// to `System` with the exact layout they were allocated with.
unsafe impl GlobalAlloc for TensorAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class(layout) {
            None => unsafe { System.alloc(layout) },
            Some((index, block)) => match self.reuse(index, block) {
                Some(p) => p,
                None => unsafe {
                    let p = System.alloc(block_layout(block));
                    advise_huge_pages(p, block);
                    p
                },
            },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match class(layout) {
            None => unsafe { System.alloc_zeroed(layout) },
            Some((index, block)) => match self.reuse(index, block) {
                Some(p) => {
                    unsafe { ptr::write_bytes(p, 0, layout.size()) };
                    p
                }
                None => unsafe {
                    let p = System.alloc_zeroed(block_layout(block));
                    advise_huge_pages(p, block);
                    p
                },
            },
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        let Some((index, block)) = class(layout) else {
            return unsafe { System.dealloc(p, layout) };
        };
        if tensor_work_running() {
            if self.cached.fetch_add(block, Ordering::Relaxed) + block <= self.limit()
                && let Ok(mut bin) = self.bins[index].0.lock()
            {
                bin.push(p as usize);
                return;
            }
            self.cached.fetch_sub(block, Ordering::Relaxed);
        } else {
            self.release();
        }
        unsafe { System.dealloc(p, block_layout(block)) }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (class(layout), class(new_layout)) {
            (None, None) => unsafe { System.realloc(p, layout, new_size) },
            (Some((a, _)), Some((b, _))) if a == b => p,
            _ => {
                let q = unsafe { self.alloc(new_layout) };
                if !q.is_null() {
                    unsafe {
                        ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                        self.dealloc(p, layout);
                    }
                }
                q
            }
        }
    }
}

/// Asks Linux to back the 2 MiB-aligned inside of a fresh block with huge pages: transparent
/// huge pages in `madvise` mode, as many distributions ship them, serve only the memory that
/// asks. The search's exact pass reads corpus rows scattered over hundreds of MiB, and with 4
/// KiB pages nearly every row missed the TLB (measured: the AVX-512 search went from 0.171 to
/// 0.157 s). numpy asks the same for its arrays, so the peers had them already.
fn advise_huge_pages(p: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        let (start, end) = (
            (p as usize).next_multiple_of(HUGE_PAGE),
            (p as usize + len) / HUGE_PAGE * HUGE_PAGE,
        );
        if !p.is_null() && end > start {
            // SAFETY: the range lies inside the block just allocated; the advice changes how
            // its pages are backed, never their contents. A refusal (no THP in the kernel)
            // leaves ordinary pages.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (p, len);
}

/// Bytes of physical memory (4 GiB where the system does not say).
fn physical_memory() -> usize {
    #[cfg(unix)]
    // SAFETY: sysconf only reads system configuration values.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    #[cfg(not(unix))]
    let (pages, page) = (0, 0);
    match usize::try_from(pages).ok().zip(usize::try_from(page).ok()) {
        Some((pages, page)) if pages > 0 && page > 0 => pages.saturating_mul(page),
        _ => 4 << 30,
    }
}

/// Call once at program start, before the allocator is busy: glibc keeps freed memory below
/// 32 MiB (its largest mmap threshold) in its heap rather than unmapping it.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before other threads start
    // allocating and with documented parameter names and values.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh large block starts on a huge page and is advised for huge pages from its first
    /// byte: its mapping there carries the `hg` flag in /proc/self/smaps (the kernel's record
    /// of MADV_HUGEPAGE).
    #[cfg(target_os = "linux")]
    #[test]
    fn large_blocks_ask_for_huge_pages() {
        let allocator = TensorAllocator::new();
        let layout = Layout::from_size_align(5 << 20, 8).unwrap();
        // SAFETY: a valid layout; the block is freed with it below.
        let p = unsafe { allocator.alloc(layout) } as usize;
        assert_ne!(p, 0);
        assert_eq!(p % HUGE_PAGE, 0, "block at {p:#x}");
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        let mut flags = None;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((start, end)) = range.split_once('-')
                && let (Ok(start), Ok(end)) = (
                    usize::from_str_radix(start, 16),
                    usize::from_str_radix(end, 16),
                )
            {
                inside = start <= p && p < end;
            } else if inside && let Some(f) = line.strip_prefix("VmFlags:") {
                flags = Some(f.split_whitespace().map(str::to_string).collect::<Vec<_>>());
            }
        }
        // SAFETY: allocated above with this layout.
        unsafe { allocator.dealloc(p as *mut u8, layout) };
        let flags = flags.expect("the block's mapping in /proc/self/smaps");
        assert!(flags.iter().any(|f| f == "hg"), "VmFlags {flags:?}");
    }

    #[test]
    fn classes_cover_each_size_with_at_most_an_eighth_to_spare() {
        let mut last = (0, 0);
        let sizes = (CACHED_MIN + 1..CACHED_MIN * 9).step_by(4093);
        for size in sizes.chain([CACHED_MIN * 64 + 1]) {
            let (index, block) = class(Layout::from_size_align(size, 8).unwrap()).unwrap();
            assert!(
                block >= size && block - size <= size / 8 + 1,
                "{size} -> {block}"
            );
            assert!((index, block) >= last, "classes grow with the size");
            last = (index, block);
        }
        assert_eq!(class(Layout::from_size_align(CACHED_MIN, 8).unwrap()), None);
        assert_eq!(
            class(Layout::from_size_align(CACHED_MIN + 1, 64).unwrap()),
            None
        );
    }

    /// The tests that start or depend on tensor work run one at a time.
    static TENSOR_TESTS: Mutex<()> = Mutex::new(());

    fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
        TENSOR_TESTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[test]
    fn a_freed_block_is_handed_out_again_for_its_class() {
        let _serial = one_at_a_time();
        let _work = TensorWork::begin();
        let a = TensorAllocator::new();
        let layout = Layout::from_size_align(3 << 20, 8).unwrap();
        let smaller = Layout::from_size_align((3 << 20) - 1000, 8).unwrap();
        unsafe {
            let p = a.alloc(layout);
            p.write_bytes(7, layout.size());
            a.dealloc(p, layout);
            let q = a.alloc_zeroed(smaller);
            assert_eq!(p, q, "same class, same block");
            assert!(
                std::slice::from_raw_parts(q, smaller.size())
                    .iter()
                    .all(|&b| b == 0)
            );
            let r = a.realloc(q, smaller, 8 << 20);
            assert_ne!(r, q);
            a.dealloc(r, Layout::from_size_align(8 << 20, 8).unwrap());
        }
    }

    /// Outside tensor work nothing is cached, and what tensor work left is returned at the
    /// next large allocation.
    #[test]
    fn the_cache_is_returned_once_tensor_work_ends() {
        let _serial = one_at_a_time();
        let a = TensorAllocator::new();
        let layout = Layout::from_size_align(5 << 20, 8).unwrap();
        let other = Layout::from_size_align(9 << 20, 8).unwrap();
        unsafe {
            let work = TensorWork::begin();
            let p = a.alloc(layout);
            a.dealloc(p, layout);
            assert_eq!(a.cached.load(Ordering::Relaxed), class(layout).unwrap().1);
            drop(work);
            let q = a.alloc(other);
            assert_eq!(
                a.cached.load(Ordering::Relaxed),
                0,
                "released when work ended"
            );
            a.dealloc(q, other);
            assert_eq!(
                a.cached.load(Ordering::Relaxed),
                0,
                "not cached outside work"
            );
        }
    }

    #[test]
    fn class_block_inverts_class() {
        for size in [CACHED_MIN + 1, 3 << 20, (5 << 20) + 7, 1 << 33] {
            let (index, block) = class(Layout::from_size_align(size, 8).unwrap()).unwrap();
            assert_eq!(class_block(index), block, "{size}");
        }
    }
}
