//! Neural-network building blocks shared by the model crates: the [`VarStore`] that loads
//! parameters by the checkpoint's own dotted names, and the layers composed from tensor ops.

mod var_store;

pub use var_store::{Init, Param, VarStore};
