//! mgm-kernels: the raw compute under mgm-tensor, one module per kernel family.
//!
//! Each family (`softmax`, `rms_norm`, `layer_norm_gelu`, `windowed_attention`, `topk_attention`)
//! has a `reference` (plain loops, f64 accumulation, the version a reader checks by eye), a fast
//! `cpu` version with the same signature, its hand-written PTX (`kernels/<family>.ptx`, available
//! as [`ptx::SOURCES`]) with its launch (grid, block, `.param` order) built by `launch`, and, behind the `cuda` feature,
//! a cudarc launcher. [`gemm`] is the f32 matrix multiply under every linear layer and attention
//! (reference, portable, AVX-512 and AMX-BF16 backends, fused bias/activation/residual
//! epilogue; no PTX yet), and [`activation`] the pointwise functions the kernels fuse. The
//! crate works on slices and knows nothing of `Tensor`.
//!
//! ```
//! use mgm_kernels::softmax;
//! let x = [1.0f32, 2.0, 3.0, f32::NEG_INFINITY];
//! let mut y = [0.0f32; 4];
//! softmax::cpu(&x, &mut y, 1, 4)?;
//! assert!((y.iter().sum::<f32>() - 1.0).abs() < 1e-6 && y[3] == 0.0);
//! # Ok::<(), mgm_kernels::Error>(())
//! ```

pub mod activation;
pub mod attention;
mod error;
pub mod launch;
pub mod ptx;
pub mod simd;

pub mod gemm;
pub mod layer_norm_gelu;
pub mod parallel;
pub mod quant;
pub mod rms_norm;
pub mod softmax;
pub mod topk_attention;
pub mod windowed_attention;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use error::{Error, Result};
pub use launch::{KernelArg, KernelLaunch, LaunchDims};
