//! The crate's one error type.

/// Everything that can go wrong in mgm-umm.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A handle's slot was written again after the handle was issued.
    #[error(
        "feature cache slot {slot}: handle of generation {wanted} was overwritten (now generation {now})"
    )]
    Overwritten {
        /// The slot.
        slot: usize,
        /// The handle's generation.
        wanted: u64,
        /// The slot's generation now.
        now: u64,
    },
    /// A handle that no write of this cache issued (slot out of range or a future generation).
    #[error(
        "feature cache: handle (slot {slot}, generation {generation}) was not issued by this cache"
    )]
    ForeignHandle {
        /// The slot.
        slot: usize,
        /// The generation.
        generation: u64,
    },
    /// The device (CUDA) could not be opened or failed.
    #[error("{0}")]
    Device(String),
    /// Input of the wrong size or a configuration that cannot work.
    #[error("{what}: {msg}")]
    InvalidInput {
        /// What was called.
        what: &'static str,
        /// What was wrong.
        msg: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
