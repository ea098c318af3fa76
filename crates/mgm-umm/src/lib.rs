//! mgm-umm: memory management for mgm-rs models.
//!
//! - [`pool`]: a caching buffer pool with size-class bins, reuse of freed buffers and
//!   statistics (allocated, reserved, peak, hits, misses), like PyTorch's caching allocator.
//! - [`ring`]: a fixed-capacity ring buffer of `[N, D]` feature slots whose writes return
//!   handles with a generation: reading a handle whose slot was overwritten since is an error,
//!   never stale data, and batch writes that straddle the end wrap around.
//! - [`paged`]: paged KV-cache bookkeeping: fixed-size blocks, a block table per sequence,
//!   prefix sharing by fork with copy-on-write.
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

mod error;
pub mod paged;
pub mod pool;
pub mod ring;

pub use error::{Error, Result};
