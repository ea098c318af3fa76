//! (filled by the op-family work in progress)
