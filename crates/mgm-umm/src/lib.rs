//! mgm-umm: memory management for mgm-rs models.
//!
//! - [`pool`]: a caching allocator with size-class bins, reuse of freed blocks and
//!   statistics (allocated, reserved, peak, hits, misses), like PyTorch's caching allocator;
//!   a `#[global_allocator]`, so mgm-tensor's buffers go through it when a program installs
//!   it. The device pool is `cuda::CudaPool` (feature `cuda`).
//! - [`ring`]: a fixed-capacity ring buffer of `[N, D]` feature slots whose writes return
//!   handles with a generation: reading a handle whose slot was overwritten since is an error,
//!   never stale data, and batch writes that straddle the end wrap around.
//! - [`paged`]: paged KV-cache bookkeeping: fixed-size blocks, a block table per sequence,
//!   prefix sharing by fork with copy-on-write.
//! - [`pipeline`]: encode request N+1 while decoding request N, bounded and in order.
//! - [`CheckpointPolicy`]: which layers keep their activations under activation
//!   checkpointing.
//!
//! ```
//! use mgm_umm::ring::FeatureCache;
//! let mut cache = FeatureCache::new(2, 3)?; // 2 slots of 3 floats
//! let a = cache.write(&[1., 2., 3.])?;
//! let _b = cache.write(&[4., 5., 6.])?;
//! assert_eq!(cache.read(a)?, &[1., 2., 3.]);
//! let _c = cache.write(&[7., 8., 9.])?; // wraps onto a's slot
//! assert!(cache.read(a).is_err());
//! # Ok::<(), mgm_umm::Error>(())
//! ```

#[cfg(feature = "cuda")]
pub mod cuda;
mod error;
pub mod paged;
pub mod pipeline;
pub mod pool;
pub mod ring;

pub use error::{Error, Result};

/// Activation checkpointing: keep the activations of every `every`-th layer (layers 0, k, 2k,
/// ...) and recompute the others in backward; the seed design keeps 1/4 (`every` 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointPolicy {
    every: usize,
}

impl CheckpointPolicy {
    /// Keeps every `every`-th layer (`every` >= 1; 1 keeps all, no recomputation).
    pub fn every(every: usize) -> Result<CheckpointPolicy> {
        if every == 0 {
            return Err(Error::InvalidInput {
                what: "CheckpointPolicy::every",
                msg: "every must be >= 1".into(),
            });
        }
        Ok(CheckpointPolicy { every })
    }

    /// The seed design's policy: one layer in four.
    pub fn seed() -> CheckpointPolicy {
        CheckpointPolicy { every: 4 }
    }

    /// Whether layer `i` keeps its activations.
    pub fn keeps(&self, layer: usize) -> bool {
        layer.is_multiple_of(self.every)
    }

    /// Layers of `n` that keep their activations.
    pub fn kept(&self, n: usize) -> usize {
        n.div_ceil(self.every)
    }
}
