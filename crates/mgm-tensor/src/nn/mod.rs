//! Neural-network building blocks shared by the model crates: the [`VarStore`] that loads
//! parameters by the checkpoint's own dotted names, and the layers composed from tensor ops.
//!
//! ```
//! use mgm_tensor::nn::{Linear, Module, VarStore};
//! use mgm_tensor::{DType, Device, Tensor};
//! let vs = VarStore::new_trainable(0);
//! let fc = Linear::load(&vs.pp("fc"), 4, 3, true)?;
//! let y = fc.forward(&Tensor::ones(&[2, 4], DType::F32, Device::Cpu)?)?;
//! assert_eq!(y.shape(), &[2, 3]);
//! # Ok::<(), mgm_tensor::Error>(())
//! ```

mod attention;
mod layers;
mod var_store;

pub use attention::{
    MultiHeadAttention, ProjNames, scaled_dot_product_attention,
    scaled_dot_product_attention_merged,
};
pub use layers::{Conv2d, Embedding, LayerNorm, Linear, Module, RmsNorm};
/// The pointwise activations layers fuse into their outputs (defined with the kernels).
pub use mgm_kernels::activation::Activation;
pub use var_store::{Init, Param, VarStore};
