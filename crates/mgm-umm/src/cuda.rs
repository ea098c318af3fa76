//! The device half of the caching pool (feature `cuda`): device buffers in the same size-class
//! bins and with the same statistics as the host [`crate::pool::CachingAlloc`], allocated on a
//! device's stream through cudarc. Without a driver, [`CudaPool::new`] is an error, never a
//! panic.
//!
//! ```no_run
//! use mgm_umm::cuda::CudaPool;
//! let pool = CudaPool::new(0)?; // Err("cuda: no CUDA driver library ...") without a GPU
//! let b = pool.alloc(1 << 20)?;
//! pool.free(b);
//! let again = pool.alloc(1 << 20)?; // the same device block
//! assert_eq!(pool.stats().hits, 1);
//! # drop(again);
//! # Ok::<(), mgm_umm::Error>(())
//! ```

use std::sync::{Arc, Mutex};

use cudarc::driver::CudaSlice;
use mgm_kernels::cuda::Gpu;

use crate::pool::{Counters, MIN_POOLED, PoolStats, class_of};
use crate::{Error, Result};

/// A device buffer on loan from a [`CudaPool`]: its size class's bytes, of which `len` were
/// asked for. Contents are whatever the last user left.
pub struct CudaBlock {
    buf: CudaSlice<u8>,
    len: usize,
    class: usize,
}

impl CudaBlock {
    /// The device buffer (its whole size class).
    pub fn slice(&self) -> &CudaSlice<u8> {
        &self.buf
    }

    /// The device buffer, writable.
    pub fn slice_mut(&mut self) -> &mut CudaSlice<u8> {
        &mut self.buf
    }

    /// Bytes asked for.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no byte was asked for.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A caching pool of device memory on one GPU.
pub struct CudaPool {
    gpu: Arc<Gpu>,
    bins: Mutex<Vec<Vec<CudaSlice<u8>>>>,
    counters: Counters,
}

fn cuda_err(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Device(format!("cuda: {what}: {e}"))
}

impl CudaPool {
    /// A pool on device `ordinal`; an error when there is no driver or no such device.
    pub fn new(ordinal: usize) -> Result<CudaPool> {
        let gpu = Gpu::new(ordinal).map_err(|e| Error::Device(e.to_string()))?;
        Ok(CudaPool::on(Arc::new(gpu)))
    }

    /// A pool on an opened device.
    pub fn on(gpu: Arc<Gpu>) -> CudaPool {
        CudaPool {
            gpu,
            bins: Mutex::new(Vec::new()),
            counters: Counters::new(),
        }
    }

    /// `len` bytes of device memory: a cached block of the same size class if there is one.
    /// Requests under [`MIN_POOLED`] bytes take the smallest class.
    pub fn alloc(&self, len: usize) -> Result<CudaBlock> {
        let (class, bin) = class_of(len.max(MIN_POOLED), 1).ok_or_else(|| Error::InvalidInput {
            what: "CudaPool::alloc",
            msg: format!("{len} bytes is larger than the largest size class"),
        })?;
        let cached = {
            let mut bins = self.bins.lock().unwrap_or_else(|e| e.into_inner());
            bins.get_mut(bin).and_then(Vec::pop)
        };
        let hit = cached.is_some();
        let buf = match cached {
            Some(b) => b,
            None => {
                // SAFETY: the bytes are uninitialised device memory; the pool's contract is
                // that contents are unspecified until written, like a caching allocator's
                unsafe { self.gpu.stream().alloc::<u8>(class) }
                    .map_err(cuda_err("allocating device memory"))?
            }
        };
        self.counters.lend(class, hit);
        Ok(CudaBlock { buf, len, class })
    }

    /// Returns a block to its bin.
    pub fn free(&self, b: CudaBlock) {
        let (_, bin) = class_of(b.class, 1).expect("a block's class is a class");
        let mut bins = self.bins.lock().unwrap_or_else(|e| e.into_inner());
        if bins.len() <= bin {
            bins.resize_with(bin + 1, Vec::new);
        }
        bins[bin].push(b.buf);
        drop(bins);
        self.counters.give_back(b.class);
    }

    /// Frees every cached block on the device.
    pub fn empty_cache(&self) {
        let mut bins = self.bins.lock().unwrap_or_else(|e| e.into_inner());
        let freed: usize = bins
            .iter()
            .enumerate()
            .map(|(bin, v)| v.len() * (MIN_POOLED << bin))
            .sum();
        bins.clear();
        drop(bins);
        self.counters.release(freed);
    }

    /// The statistics now.
    pub fn stats(&self) -> PoolStats {
        self.counters.stats()
    }
}
