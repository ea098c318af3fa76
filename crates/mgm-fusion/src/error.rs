//! The crate's one error type.

/// Everything that can go wrong in mgm-fusion.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation or a weight load failed (the message names op, shapes, tensor).
    #[error(transparent)]
    Tensor(#[from] mgm_tensor::Error),
    /// Input a module cannot take (wrong rank or width, a grid that does not divide).
    #[error("{what}: {msg}")]
    InvalidInput {
        /// The module that was called.
        what: &'static str,
        /// What was wrong.
        msg: String,
    },
    /// A configuration value a module cannot use (an unknown projector type, `top_k` of 0).
    #[error("{what}: {msg}")]
    BadConfig {
        /// The module or key.
        what: &'static str,
        /// What is wrong with the value.
        msg: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn invalid(what: &'static str, msg: impl Into<String>) -> Error {
    Error::InvalidInput {
        what,
        msg: msg.into(),
    }
}

pub(crate) fn bad_config(what: &'static str, msg: impl Into<String>) -> Error {
    Error::BadConfig {
        what,
        msg: msg.into(),
    }
}
