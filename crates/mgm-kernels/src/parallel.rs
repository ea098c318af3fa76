//! Running a whole computation on the rayon pool.
//!
//! A parallel loop started from a thread outside the pool hands its job to a worker and
//! sleeps until it finishes: a futex wake and sleep per loop. A decode step runs about 150
//! loops of 10-400 µs each, and in a VM each handoff cost 10-25 µs. [`on_pool`] makes that one
//! handoff per step: the step runs on a worker, whose loops split in place.

/// Runs `f` on a worker of the current rayon pool (in place when already on one) and returns
/// its result.
///
/// The job sees the worker's thread-locals, not the caller's: code that keeps per-thread state
/// (autograd's recording switch) goes through `mgm_tensor::on_pool`, which carries it over.
///
/// ```
/// let sum: u64 = mgm_kernels::parallel::on_pool(|| {
///     assert!(rayon::current_thread_index().is_some());
///     (1..=10u64).sum()
/// });
/// assert_eq!(sum, 55);
/// ```
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let mut out = None;
    rayon::scope(|_| out = Some(f()));
    out.expect("rayon::scope runs its closure to completion")
}
