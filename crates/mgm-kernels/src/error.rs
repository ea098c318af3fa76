//! The crate's one error type.

/// What went wrong in a kernel call: names the kernel and the offending sizes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A slice does not have the length the shape arguments imply.
    #[error("{kernel}: `{arg}` has {got} elements, expected {expected} ({shape})")]
    Length {
        /// Kernel family, e.g. `layer_norm_gelu`.
        kernel: &'static str,
        /// Argument name as in the function signature.
        arg: &'static str,
        /// Length passed.
        got: usize,
        /// Length the shape implies.
        expected: usize,
        /// The shape arguments, spelled out, e.g. `rows=4, cols=7`.
        shape: String,
    },
    /// A shape or parameter is outside what the kernel supports.
    #[error("{kernel}: {msg}")]
    Param {
        /// Kernel family.
        kernel: &'static str,
        /// What is wrong, with the values.
        msg: String,
    },
    /// The CUDA path failed: no driver, no device, or a driver call error.
    #[error("cuda: {0}")]
    Cuda(String),
}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Checks that `arg` has `expected` elements.
pub(crate) fn check_len(
    kernel: &'static str,
    arg: &'static str,
    got: usize,
    expected: usize,
    shape: impl FnOnce() -> String,
) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::Length {
            kernel,
            arg,
            got,
            expected,
            shape: shape(),
        })
    }
}
