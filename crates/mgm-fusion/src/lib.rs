//! mgm-fusion: the modules that join vision features to a language model, each built from
//! mgm-tensor ops so it runs forward and, through autograd, backward.
//!
//! - [`projector`]: identity, linear and `mlpNx_gelu` projectors (MGM / LLaVA layouts).
//! - [`mining`]: MGM's patch-info mining (each low-res token attends to its own high-res
//!   window; DESIGN.md section 1).
//! - [`attention`]: cross-modal attention with a temperature, gates with a residual ratio,
//!   multi-scale cross-attention.
//! - [`moe`]: a top-k router with renormalised weights, capacity and the load-balancing loss,
//!   and an MoE layer over MLP experts.
//! - [`adapter`]: 2-layer MLP modality adapters into a shared width.
//!
//! ```
//! use mgm_fusion::{PatchInfoMining, Projector, ProjectorType};
//! use mgm_tensor::{nn::VarStore, DType, Device, Tensor};
//! let vs = VarStore::new_trainable(0);
//! let mining = PatchInfoMining::load(&vs, 8, 12)?;
//! let projector = Projector::load(&vs.pp("mm_projector"), ProjectorType::parse("mlp2x_gelu")?, 8, 16)?;
//! let x_lr = Tensor::randn(0, &[1, 4, 8], 0.0, 1.0, DType::F32, Device::Cpu)?;
//! let x_hr = Tensor::randn(1, &[1, 12, 4, 4], 0.0, 1.0, DType::F32, Device::Cpu)?;
//! let tokens = projector.forward(&mining.forward(&x_lr, &x_hr)?)?;
//! assert_eq!(tokens.shape(), &[1, 4, 16]);
//! # Ok::<(), mgm_fusion::Error>(())
//! ```

pub mod adapter;
pub mod attention;
mod error;
pub mod mining;
pub mod moe;
pub mod projector;

pub use adapter::{ModalityAdapter, SHARED_DIM};
pub use attention::{CrossModalAttention, Gate, GateKind, MultiScaleCrossAttention};
pub use error::{Error, Result};
pub use mining::PatchInfoMining;
pub use moe::{MoeLayer, MoeRouter, Routing};
pub use projector::{Projector, ProjectorType};
