//! A caching buffer pool: freed buffers are kept in bins by size class (the next power of two
//! of the requested length, at least 64 elements) and handed out again for requests of the
//! same class, so a steady-state loop that allocates the same shapes stops calling the system
//! allocator. Statistics follow PyTorch's caching allocator: bytes allocated (held by live
//! buffers), reserved (live plus cached), the peak of allocated, and hits / misses.

use std::sync::Mutex;

/// Smallest size class, in elements.
const MIN_CLASS: usize = 64;

/// What the pool has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes of the live buffers (their size classes).
    pub allocated: usize,
    /// Bytes held: live plus cached.
    pub reserved: usize,
    /// The largest `allocated` so far.
    pub peak: usize,
    /// Requests served from the cache.
    pub hits: u64,
    /// Requests that allocated.
    pub misses: u64,
}

#[derive(Default)]
struct Inner {
    /// Cached buffers by size class (`class = 2^i` elements at index `i`).
    bins: Vec<Vec<Vec<f32>>>,
    stats: PoolStats,
}

/// A thread-safe caching pool of f32 buffers.
#[derive(Default)]
pub struct CachingPool {
    inner: Mutex<Inner>,
}

/// A buffer on loan from a [`CachingPool`]. Its contents are whatever its last user left (as a
/// caching allocator's are); [`PooledBuf::zeroed`] clears them.
#[derive(Debug)]
pub struct PooledBuf {
    buf: Vec<f32>,
    len: usize,
}

impl PooledBuf {
    /// The requested elements.
    pub fn as_slice(&self) -> &[f32] {
        &self.buf[..self.len]
    }

    /// The requested elements, writable.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.buf[..self.len]
    }

    /// Sets every element to 0 and returns the buffer.
    pub fn zeroed(mut self) -> PooledBuf {
        self.as_mut_slice().fill(0.0);
        self
    }

    /// The elements requested.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no element was requested.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Address of the storage (to tell buffers apart).
    pub fn as_ptr(&self) -> *const f32 {
        self.buf.as_ptr()
    }
}

fn class_of(len: usize) -> (usize, usize) {
    let class = len.max(MIN_CLASS).next_power_of_two();
    (class, class.trailing_zeros() as usize)
}

impl CachingPool {
    /// An empty pool.
    pub fn new() -> CachingPool {
        CachingPool::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // a panic while holding the lock leaves consistent data (every update is one step)
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer of `len` elements: a cached one of the same size class if there is one.
    pub fn alloc(&self, len: usize) -> PooledBuf {
        let (class, bin) = class_of(len);
        let mut g = self.lock();
        if g.bins.len() <= bin {
            g.bins.resize_with(bin + 1, Vec::new);
        }
        let buf = match g.bins[bin].pop() {
            Some(b) => {
                g.stats.hits += 1;
                b
            }
            None => {
                g.stats.misses += 1;
                g.stats.reserved += class * 4;
                vec![0.0; class]
            }
        };
        g.stats.allocated += class * 4;
        g.stats.peak = g.stats.peak.max(g.stats.allocated);
        PooledBuf { buf, len }
    }

    /// Returns a buffer to its bin.
    pub fn free(&self, b: PooledBuf) {
        let (class, bin) = class_of(b.buf.len());
        let mut g = self.lock();
        g.stats.allocated -= class * 4;
        if g.bins.len() <= bin {
            g.bins.resize_with(bin + 1, Vec::new);
        }
        g.bins[bin].push(b.buf);
    }

    /// Releases every cached (free) buffer to the system.
    pub fn empty_cache(&self) {
        let mut g = self.lock();
        let cached: usize = g
            .bins
            .iter()
            .map(|b| b.iter().map(|v| v.len() * 4).sum::<usize>())
            .sum();
        g.bins.clear();
        g.stats.reserved -= cached;
    }

    /// The statistics now.
    pub fn stats(&self) -> PoolStats {
        self.lock().stats
    }
}
