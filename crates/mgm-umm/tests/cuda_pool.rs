//! The device pool (feature `cuda`): without a driver, opening it is an error that says so;
//! with one, a freed block is handed out again and the statistics count it.
#![cfg(feature = "cuda")]

use mgm_umm::cuda::CudaPool;

#[test]
fn the_device_pool_reuses_blocks_or_says_there_is_no_driver() {
    match CudaPool::new(0) {
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("cuda") || msg.contains("CUDA"), "{msg}");
        }
        Ok(pool) => {
            let a = pool.alloc(3000).expect("device memory");
            assert_eq!(a.len(), 3000);
            pool.free(a);
            let b = pool.alloc(4096).expect("the cached block");
            let s = pool.stats();
            assert_eq!(
                (s.hits, s.misses, s.allocated, s.reserved),
                (1, 1, 4096, 4096)
            );
            pool.free(b);
            pool.empty_cache();
            assert_eq!(pool.stats().reserved, 0);
        }
    }
}
