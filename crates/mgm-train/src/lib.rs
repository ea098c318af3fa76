//! mgm-train: training for mgm-rs models, with PyTorch's semantics.
//!
//! - [`Optimizer`]: AdamW (decoupled weight decay, bias correction) and SGD with momentum over
//!   named parameters, groups chosen by name patterns ([`GroupSpec`]), frozen parameters
//!   without state, f32 master weights for bf16/f16 parameters.
//! - [`Schedule`]: linear warmup + cosine decay, or constant.
//! - [`Grads`]: a step's gradients in f32, global-L2-norm clipping like `clip_grad_norm_`.
//! - [`LossScaler`]: dynamic loss scaling for f16 (skip and halve on inf/NaN, grow after N
//!   clean steps) like `torch.amp.GradScaler`.
//! - [`Trainer`]: one step over micro-batches (gradient accumulation equal to the big batch).
//! - [`loss`]: causal-LM cross-entropy (ignore_index -100, label smoothing), symmetric
//!   InfoNCE, L2, adaptive weights of a sum of per-modality losses.
//! - [`activation`]: activation checkpointing of a layer stack by a `CheckpointPolicy`.
//! - [`batching`]: batches to a token budget, grouped by modality and length.
//! - [`checkpoint`]: weights + optimizer + trainer state, written to a temporary directory and
//!   renamed, so a failed write never replaces the last good checkpoint.
//!
//! ```
//! use mgm_tensor::{Tensor, Var};
//! use mgm_train::{GroupSpec, Optimizer, Schedule, Trainer};
//! let w = Var::from_tensor(&Tensor::from_vec(vec![3f32], &[1])?)?;
//! let opt = Optimizer::sgd(vec![("w".into(), w.clone())], vec![GroupSpec::new("all", &[], 0.1).weight_decay(0.0).betas(0.0, 0.0)], &[], false)?;
//! let mut t = Trainer::new(opt, Schedule::Constant);
//! t.step(&[1.0], |_| Ok(w.as_tensor().sqr()?.sum_all()?))?; // d(w^2)/dw = 6
//! assert!((w.as_tensor().to_vec::<f32>()?[0] - 2.4).abs() < 1e-6);
//! # Ok::<(), mgm_train::Error>(())
//! ```

pub mod activation;
pub mod batching;
pub mod checkpoint;
mod grads;
pub mod loss;
pub mod optim;
mod scaler;
mod schedule;
mod trainer;

pub use grads::Grads;
pub use optim::{GroupSpec, Kind, Optimizer};
pub use scaler::{LossScaler, ScaleOutcome};
pub use schedule::Schedule;
pub use trainer::{StepReport, Trainer};

/// Everything that can go wrong in mgm-train.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] mgm_tensor::Error),
    /// An optimizer, schedule or group setting that cannot work.
    #[error("training config: {0}")]
    Config(String),
    /// Inputs of the wrong shape or type.
    #[error("{0}")]
    Input(String),
    /// A checkpoint file that is missing, truncated or inconsistent.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint {
        /// The file or directory.
        path: String,
        /// What was wrong.
        msg: String,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// A tensor's values as f32 (any float dtype).
pub(crate) fn f32s(t: &mgm_tensor::Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(mgm_tensor::DType::F32)?.to_vec::<f32>()?)
}
