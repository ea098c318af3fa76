//! The crate's one error type.

/// Everything that can go wrong in mgm-llm. Variants name the file, key, token or input a user
/// has to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation or a weight load failed (the message names op, shapes, file, tensor).
    #[error(transparent)]
    Tensor(#[from] mgm_tensor::Error),
    /// A kernel rejected its arguments.
    #[error(transparent)]
    Kernel(#[from] mgm_kernels::Error),
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A config file is not valid JSON, lacks a key, or has a value we cannot use.
    #[error("{path}: {msg}")]
    Config {
        /// The file.
        path: String,
        /// What is wrong, naming the key.
        msg: String,
    },
    /// The tokenizer failed to load or to encode/decode.
    #[error("tokenizer {path}: {msg}")]
    Tokenizer {
        /// The tokenizer file.
        path: String,
        /// What failed.
        msg: String,
    },
    /// A chat template does not parse or raised an error while rendering.
    #[error("chat template: {0}")]
    Template(String),
    /// A call's arguments are invalid for the model (shapes, token ids, lengths).
    #[error("{what}: {msg}")]
    Input {
        /// The function or input concerned.
        what: &'static str,
        /// What is wrong, with the values.
        msg: String,
    },
}

impl Error {
    /// Shorthand for [`Error::Input`].
    pub fn input(what: &'static str, msg: impl Into<String>) -> Self {
        Error::Input {
            what,
            msg: msg.into(),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
