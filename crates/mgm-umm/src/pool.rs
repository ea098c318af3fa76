//! A caching allocator for host memory, like PyTorch's caching allocator: freed blocks are kept
//! in bins by size class (the next power of two of the request, from [`MIN_POOLED`] bytes up)
//! and handed out again for requests of the same class, so a steady-state loop that allocates
//! the same tensor shapes stops calling the system allocator (no `mmap`/`munmap`, no page
//! faults and re-zeroing of fresh pages). Smaller requests, and ones aligned to more than 64
//! bytes, go to the system allocator untouched.
//!
//! [`CachingAlloc`] is a [`GlobalAlloc`]: installed as a program's `#[global_allocator]`, every
//! buffer mgm-tensor allocates (each `Vec` behind a tensor's storage) goes through it; that is
//! what "enabled" means. Statistics follow PyTorch's: bytes allocated (held by live blocks),
//! reserved (live plus cached), the peak of allocated, hits and misses;
//! [`CachingAlloc::empty_cache`] returns the cached blocks to the system.
//!
//! ```
//! use mgm_umm::pool::CachingAlloc;
//! #[global_allocator]
//! static ALLOC: CachingAlloc = CachingAlloc::new();
//! # fn main() {
//! for _ in 0..3 {
//!     drop(vec![0f32; 1 << 16]); // the same 256 KiB block each time
//! }
//! let s = ALLOC.stats();
//! assert!(s.hits >= 2 && s.reserved >= 1 << 18);
//! # }
//! ```
//!
//! Device memory has its own pool with the same bins and statistics:
//! [`crate::cuda::CudaPool`] (feature `cuda`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// The smallest request the pool caches, in bytes (smaller ones go to the system allocator).
pub const MIN_POOLED: usize = 512;
/// Alignment of every pooled block (a request aligned to more bypasses the pool).
const ALIGN: usize = 64;
/// Size classes `2^9 ..= 2^(9 + CLASSES - 1)` bytes.
const CLASSES: usize = 40;

/// What a pool has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes of the live blocks (their size classes).
    pub allocated: usize,
    /// Bytes held: live plus cached.
    pub reserved: usize,
    /// The largest `allocated` so far.
    pub peak: usize,
    /// Requests served from the cache.
    pub hits: u64,
    /// Requests that went to the system (or device) allocator.
    pub misses: u64,
}

/// The size class (bytes) and bin of a pooled request of `size` bytes, or `None` when the
/// request is not pooled.
pub fn class_of(size: usize, align: usize) -> Option<(usize, usize)> {
    if size < MIN_POOLED || align > ALIGN {
        return None;
    }
    let class = size.checked_next_power_of_two()?;
    let bin = (class.trailing_zeros() - MIN_POOLED.trailing_zeros()) as usize;
    (bin < CLASSES).then_some((class, bin))
}

/// The counters every pool keeps (atomics, so reading them needs no lock).
#[derive(Default)]
pub(crate) struct Counters {
    allocated: AtomicUsize,
    reserved: AtomicUsize,
    peak: AtomicUsize,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Counters {
    pub(crate) const fn new() -> Counters {
        Counters {
            allocated: AtomicUsize::new(0),
            reserved: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// A block of `class` bytes goes out (`hit`: from the cache).
    pub(crate) fn lend(&self, class: usize, hit: bool) {
        if hit {
            self.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            self.reserved.fetch_add(class, Ordering::Relaxed);
        }
        let now = self.allocated.fetch_add(class, Ordering::Relaxed) + class;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    /// A block of `class` bytes comes back to the cache.
    pub(crate) fn give_back(&self, class: usize) {
        self.allocated.fetch_sub(class, Ordering::Relaxed);
    }

    /// `bytes` of cached blocks went back to the system.
    pub(crate) fn release(&self, bytes: usize) {
        self.reserved.fetch_sub(bytes, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> PoolStats {
        PoolStats {
            allocated: self.allocated.load(Ordering::Relaxed),
            reserved: self.reserved.load(Ordering::Relaxed),
            peak: self.peak.load(Ordering::Relaxed),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }
}

/// Heads of the per-class free lists; a free block's first word points to the next one.
struct Bins([*mut u8; CLASSES]);

// SAFETY: the pointers are blocks only the pool owns while they are in a bin, and every access
// goes through the mutex.
unsafe impl Send for Bins {}

/// The host caching allocator (see the module doc). `const`-constructible, so it can be a
/// `static` `#[global_allocator]`; an instance can also be used on its own.
pub struct CachingAlloc {
    bins: Mutex<Bins>,
    counters: Counters,
}

impl Default for CachingAlloc {
    fn default() -> Self {
        CachingAlloc::new()
    }
}

impl CachingAlloc {
    /// An empty pool.
    pub const fn new() -> CachingAlloc {
        CachingAlloc {
            bins: Mutex::new(Bins([std::ptr::null_mut(); CLASSES])),
            counters: Counters::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bins> {
        // every update under the lock is one pointer swap: a poisoned lock holds sound data
        self.bins.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The statistics now.
    pub fn stats(&self) -> PoolStats {
        self.counters.stats()
    }

    /// Returns every cached (free) block to the system allocator.
    pub fn empty_cache(&self) {
        let mut freed = 0;
        let mut bins = self.lock();
        for (bin, head) in bins.0.iter_mut().enumerate() {
            let class = MIN_POOLED << bin;
            while !head.is_null() {
                let block = *head;
                // SAFETY: a block in a bin is a live system allocation of `class` bytes at
                // ALIGN whose first word is the next pointer (written by `dealloc`).
                unsafe {
                    *head = block.cast::<*mut u8>().read();
                    System.dealloc(block, Layout::from_size_align_unchecked(class, ALIGN));
                }
                freed += class;
            }
        }
        drop(bins);
        self.counters.release(freed);
    }

    /// A block of `class` bytes from bin `bin`, or a fresh one; `zeroed` clears `size` bytes.
    ///
    /// # Safety
    /// `class`/`bin` come from [`class_of`].
    unsafe fn take(&self, class: usize, bin: usize, size: usize, zeroed: bool) -> *mut u8 {
        let cached = {
            let mut bins = self.lock();
            let head = bins.0[bin];
            if !head.is_null() {
                // SAFETY: see `empty_cache`
                bins.0[bin] = unsafe { head.cast::<*mut u8>().read() };
            }
            head
        };
        if !cached.is_null() {
            self.counters.lend(class, true);
            if zeroed {
                // SAFETY: the block has `class >= size` bytes
                unsafe { cached.write_bytes(0, size) };
            }
            return cached;
        }
        // SAFETY: class is a nonzero power of two >= ALIGN
        let layout = unsafe { Layout::from_size_align_unchecked(class, ALIGN) };
        // SAFETY: nonzero size
        let p = unsafe {
            if zeroed {
                System.alloc_zeroed(layout)
            } else {
                System.alloc(layout)
            }
        };
        if !p.is_null() {
            self.counters.lend(class, false);
        }
        p
    }
}

// SAFETY: pooled blocks are system allocations of their class size at 64-byte alignment, handed
// to one caller at a time (a block leaves its bin under the lock); every other request is the
// system allocator's.
unsafe impl GlobalAlloc for CachingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class_of(layout.size(), layout.align()) {
            // SAFETY: from class_of
            Some((class, bin)) => unsafe { self.take(class, bin, layout.size(), false) },
            // SAFETY: forwarded as given
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match class_of(layout.size(), layout.align()) {
            // SAFETY: from class_of
            Some((class, bin)) => unsafe { self.take(class, bin, layout.size(), true) },
            // SAFETY: forwarded as given
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match class_of(layout.size(), layout.align()) {
            Some((class, bin)) => {
                let mut bins = self.lock();
                // SAFETY: `ptr` is one of our blocks of `class >= 512` bytes (the caller's
                // layout matches its allocation): its first word can hold the link
                unsafe { ptr.cast::<*mut u8>().write(bins.0[bin]) };
                bins.0[bin] = ptr;
                drop(bins);
                self.counters.give_back(class);
            }
            // SAFETY: forwarded as given
            None => unsafe { System.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = class_of(layout.size(), layout.align());
        let new = class_of(new_size, layout.align());
        match (old, new) {
            // the block already has room: a Vec growing inside its class moves nothing
            (Some((a, _)), Some((b, _))) if a == b => ptr,
            // SAFETY: both sides are the system allocator's
            (None, None) => unsafe { System.realloc(ptr, layout, new_size) },
            _ => {
                // SAFETY: the caller guarantees a valid new layout
                let new_layout =
                    unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
                // SAFETY: as for alloc
                let p = unsafe { self.alloc(new_layout) };
                if !p.is_null() {
                    // SAFETY: both blocks hold at least the smaller size
                    unsafe {
                        std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                }
                p
            }
        }
    }
}
