//! The crate's one error type.

use crate::{DType, Device};

/// Everything that can go wrong in mgm-tensor. Each variant names the operation and the values a
/// user needs to fix the call (shapes, dtypes, file and tensor names).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two shapes that must agree do not.
    #[error("{op}: shapes {lhs:?} and {rhs:?} do not match{}", detail_suffix(.detail))]
    ShapeMismatch {
        /// The operation that was called.
        op: &'static str,
        /// Shape of the first operand.
        lhs: Vec<usize>,
        /// Shape of the second operand.
        rhs: Vec<usize>,
        /// What exactly disagrees, e.g. "inner dims 3 != 4".
        detail: String,
    },
    /// Shapes that cannot be broadcast together (NumPy rules).
    #[error("{op}: shapes {lhs:?} and {rhs:?} cannot be broadcast together")]
    BroadcastIncompatible {
        /// The operation that was called.
        op: &'static str,
        /// Shape of the first operand.
        lhs: Vec<usize>,
        /// Shape of the second operand.
        rhs: Vec<usize>,
    },
    /// A shape argument is invalid for the tensor it applies to.
    #[error("{op}: invalid shape for tensor of shape {shape:?}: {msg}")]
    InvalidShape {
        /// The operation that was called.
        op: &'static str,
        /// Shape of the tensor the op was applied to.
        shape: Vec<usize>,
        /// What was wrong.
        msg: String,
    },
    /// A dimension index is out of range.
    #[error("{op}: dimension {dim} is out of range for a tensor of rank {rank} (shape {shape:?})")]
    DimOutOfRange {
        /// The operation that was called.
        op: &'static str,
        /// The requested dimension (possibly negative).
        dim: isize,
        /// Rank of the tensor.
        rank: usize,
        /// Shape of the tensor.
        shape: Vec<usize>,
    },
    /// An index or range is out of bounds.
    #[error("{op}: {msg}")]
    OutOfBounds {
        /// The operation that was called.
        op: &'static str,
        /// What was out of bounds.
        msg: String,
    },
    /// Two operands have different dtypes where the op needs them equal.
    #[error("{op}: dtype mismatch: {lhs} and {rhs}")]
    DTypeMismatch {
        /// The operation that was called.
        op: &'static str,
        /// Dtype of the first operand.
        lhs: DType,
        /// Dtype of the second operand.
        rhs: DType,
    },
    /// The op does not support this dtype.
    #[error("{op}: dtype {dtype} is not supported{}", detail_suffix(.detail))]
    UnsupportedDType {
        /// The operation that was called.
        op: &'static str,
        /// The dtype it was called with.
        dtype: DType,
        /// Which dtypes are supported, or why not.
        detail: String,
    },
    /// Two operands live on different devices.
    #[error("{op}: device mismatch: {lhs} and {rhs}")]
    DeviceMismatch {
        /// The operation that was called.
        op: &'static str,
        /// Device of the first operand.
        lhs: Device,
        /// Device of the second operand.
        rhs: Device,
    },
    /// The requested device cannot be used.
    #[error("{op}: device {device} is not available: {msg}")]
    DeviceUnavailable {
        /// The operation that was called.
        op: &'static str,
        /// The requested device.
        device: Device,
        /// Why.
        msg: String,
    },
    /// A typed accessor was called with the wrong element type.
    #[error("{op}: tensor has dtype {actual}, but {expected} was requested")]
    UnexpectedDType {
        /// The accessor that was called.
        op: &'static str,
        /// The dtype asked for.
        expected: DType,
        /// The tensor's dtype.
        actual: DType,
    },
    /// Autograd was asked for something it cannot do.
    #[error("backward: {0}")]
    Backward(String),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file is truncated, corrupt, or holds something we cannot load.
    #[error("{path}: {}{msg}", tensor_prefix(.tensor))]
    SafeTensors {
        /// The file.
        path: String,
        /// The tensor concerned, when one is.
        tensor: Option<String>,
        /// What is wrong.
        msg: String,
    },
    /// A PyTorch checkpoint (`torch.save` zip with a pickle) is corrupt, truncated, or asks
    /// for something the restricted unpickler refuses to do.
    #[error("{path}: {msg}")]
    TorchCheckpoint {
        /// The file.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// A named tensor was not found (in a file or a VarStore).
    #[error("tensor {name:?} not found in {source_desc}")]
    TensorNotFound {
        /// The name looked up.
        name: String,
        /// Where it was looked up (file names).
        source_desc: String,
    },
    /// Parameters missing from or unexpected in a checkpoint.
    #[error("{path}: {}", missing_unexpected(.missing, .unexpected))]
    MissingOrUnexpected {
        /// The checkpoint file(s).
        path: String,
        /// Names the model needs that the checkpoint lacks.
        missing: Vec<String>,
        /// Names the checkpoint has that the model did not use.
        unexpected: Vec<String>,
    },
    /// A parameter loaded by name has the wrong shape.
    #[error("{name}: expected shape {expected:?}, found {actual:?} in {path}")]
    ParameterShape {
        /// Parameter name.
        name: String,
        /// The shape the layer expects.
        expected: Vec<usize>,
        /// The shape in the checkpoint.
        actual: Vec<usize>,
        /// The checkpoint file.
        path: String,
    },
    /// A call that is invalid for the layer or op as configured.
    #[error("{op}: {msg}")]
    InvalidInput {
        /// The operation or layer.
        op: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// A compute kernel rejected its arguments (names the kernel and the sizes).
    #[error(transparent)]
    Kernel(#[from] mgm_kernels::Error),
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(" ({detail})")
    }
}

fn tensor_prefix(tensor: &Option<String>) -> String {
    match tensor {
        Some(t) => format!("tensor {t:?}: "),
        None => String::new(),
    }
}

fn missing_unexpected(missing: &[String], unexpected: &[String]) -> String {
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("missing parameters: {}", missing.join(", ")));
    }
    if !unexpected.is_empty() {
        parts.push(format!("unexpected parameters: {}", unexpected.join(", ")));
    }
    parts.join("; ")
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::ShapeMismatch`].
    pub fn shape_mismatch(
        op: &'static str,
        lhs: &[usize],
        rhs: &[usize],
        detail: impl Into<String>,
    ) -> Self {
        Error::ShapeMismatch {
            op,
            lhs: lhs.to_vec(),
            rhs: rhs.to_vec(),
            detail: detail.into(),
        }
    }

    /// Shorthand for [`Error::InvalidShape`].
    pub fn invalid_shape(op: &'static str, shape: &[usize], msg: impl Into<String>) -> Self {
        Error::InvalidShape {
            op,
            shape: shape.to_vec(),
            msg: msg.into(),
        }
    }

    /// Shorthand for [`Error::UnsupportedDType`].
    pub fn unsupported_dtype(op: &'static str, dtype: DType, detail: impl Into<String>) -> Self {
        Error::UnsupportedDType {
            op,
            dtype,
            detail: detail.into(),
        }
    }

    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid_input(op: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidInput {
            op,
            msg: msg.into(),
        }
    }

    /// Shorthand for [`Error::OutOfBounds`].
    pub fn out_of_bounds(op: &'static str, msg: impl Into<String>) -> Self {
        Error::OutOfBounds {
            op,
            msg: msg.into(),
        }
    }
}
