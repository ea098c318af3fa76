//! The crate's one error type.

/// Everything that can go wrong in mgm-vision. Variants name the file, config key, tensor or
/// input a user has to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation or a weight load failed (the message names op, shapes, file, tensor).
    #[error(transparent)]
    Tensor(#[from] mgm_tensor::Error),
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON config file does not parse.
    #[error("{path}: invalid JSON: {msg}")]
    Json {
        /// The file.
        path: String,
        /// The parser's message.
        msg: String,
    },
    /// A config file lacks a key the model needs.
    #[error("{path}: missing required key {key:?}")]
    MissingKey {
        /// The file.
        path: String,
        /// The key (dotted for nested objects, e.g. `vision_config.hidden_size`).
        key: String,
    },
    /// A config key has a value we cannot use.
    #[error("{path}: key {key:?}: {msg}")]
    BadConfig {
        /// The file.
        path: String,
        /// The key.
        key: String,
        /// What is wrong with the value.
        msg: String,
    },
    /// An image file or buffer cannot be decoded.
    #[error("{path}: cannot decode image: {msg}")]
    ImageDecode {
        /// The file (or the name given to an in-memory buffer).
        path: String,
        /// The decoder's message.
        msg: String,
    },
    /// Input the model or processor cannot take (wrong rank, size, dtype, empty batch).
    #[error("{what}: {msg}")]
    InvalidInput {
        /// The function or model that was called.
        what: &'static str,
        /// What was wrong.
        msg: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid_input(what: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidInput {
            what,
            msg: msg.into(),
        }
    }
}

impl From<mgm_kernels::Error> for Error {
    /// A kernel's argument error, reported like the tensor op it belongs to.
    fn from(e: mgm_kernels::Error) -> Self {
        Error::Tensor(e.into())
    }
}
