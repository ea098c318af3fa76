//! mgm: the assembled mgm-rs models and the library behind the `mgm` command.
//!
//! Today it holds [`forward`], the conformance runner that `mgm forward` calls: read a model
//! directory (config.json + safetensors), run named inputs, return outputs under transformers'
//! names.
//!
//! ```no_run
//! use std::path::Path;
//! let model = mgm::forward::Model::load(Path::new("tests/fixtures/clip_quick_gelu"), Default::default())?;
//! let inputs = mgm_tensor::safetensors::load("tests/fixtures/clip_quick_gelu/inputs.safetensors")?;
//! let outputs = model.forward(&inputs)?;
//! assert!(outputs.iter().any(|(name, _)| name == "last_hidden_state"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod default_model;
pub mod forward;
pub mod llava;
pub mod minigemini;
pub mod plot;
pub mod shapes;
pub mod train;

/// What went wrong loading or running a model; names the file, key or tensor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// config.json missing, unreadable or not JSON.
    #[error("{path}: {msg}")]
    Config {
        /// The config file.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// The architecture named by config.json is not one we implement.
    #[error("{path}: unsupported architecture `{arch}` (supported: {supported})")]
    UnsupportedArchitecture {
        /// The config file.
        path: String,
        /// `architectures[0]` or `model_type`.
        arch: String,
        /// The ones we support, comma-separated.
        supported: String,
    },
    /// A required input tensor is missing or has the wrong rank/dtype.
    #[error("input `{name}`: {msg}")]
    Input {
        /// Input tensor name.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// A tensor-level error (weights, shapes, safetensors).
    #[error(transparent)]
    Tensor(#[from] mgm_tensor::Error),
    /// A vision-tower error (config keys, weights, images).
    #[error(transparent)]
    Vision(#[from] mgm_vision::Error),
    /// A language-model error (config keys, weights, tokens, templates).
    #[error(transparent)]
    Llm(#[from] mgm_llm::Error),
    /// A fusion-module error (projector type, mining shapes).
    #[error(transparent)]
    Fusion(#[from] mgm_fusion::Error),
    /// A training error (optimizer settings, checkpoints).
    #[error(transparent)]
    Train(#[from] mgm_train::Error),
    /// A file that could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
