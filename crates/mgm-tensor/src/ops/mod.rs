//! Tensor operations. Each file adds methods to [`crate::Tensor`] and keeps every op's forward
//! and backward side by side.

pub mod binary;
pub mod conv;
pub mod index;
pub mod interpolate;
pub mod matmul;
pub mod norm;
pub mod reduce;
pub mod softmax;
pub mod unary;
pub mod view;
