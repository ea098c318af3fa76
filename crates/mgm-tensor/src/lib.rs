//! mgm-tensor: the n-dimensional array under every mgm-rs crate.
//!
//! A [`Tensor`] is cheap to clone (shared storage plus a view layout), comes in f32, f64, f16,
//! bf16, i64, u32 and u8, and supports NumPy broadcasting, views without copies, reductions,
//! matmul through the `gemm` crate (bf16 included), convolutions, interpolation, indexing, and
//! reverse-mode autograd through [`Var`] leaves. Weights load zero-copy from safetensors files,
//! and [`nn`] holds the layers the model crates compose.
//!
//! ```
//! use mgm_tensor::{DType, Device, Tensor, Var};
//! let w = Var::from_tensor(&Tensor::randn(0, &[3, 2], 0.0, 1.0, DType::F32, Device::Cpu)?)?;
//! let x = Tensor::from_vec(vec![1f32, 2., 3., 4., 5., 6.], &[2, 3])?;
//! let loss = x.matmul(&w.as_tensor())?.sqr()?.mean_all()?;
//! let grads = loss.backward()?;
//! assert_eq!(grads.get_var(&w).unwrap().shape(), &[3, 2]);
//! # Ok::<(), mgm_tensor::Error>(())
//! ```
//!
//! Numerical semantics follow PyTorch (see DESIGN.md section 3 of the workspace); f16 and bf16
//! compute in f32 internally.

mod autograd;
mod device;
mod dtype;
mod error;
mod ndarray_interop;
pub mod nn;
pub mod ops;
mod random;
pub mod safetensors;
pub mod shape;
pub mod storage;
mod tensor;
pub mod torch_pickle;

pub use autograd::{
    Backward, Gradients, NoGradGuard, Var, attach, checkpoint, is_grad_enabled, needs_grad,
    no_grad, on_pool,
};
pub use device::Device;
pub use dtype::{DType, Float, WithDType};
pub use error::{Error, Result};
pub use ops::binary::{BinaryOp, CmpOp};
pub use ops::conv::Conv2dParams;
pub use ops::interpolate::InterpolateMode;
pub use ops::unary::Unary;
pub use shape::Layout;
pub use tensor::{Tensor, TensorId};
