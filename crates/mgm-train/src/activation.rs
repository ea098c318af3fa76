//! Activation checkpointing of a stack of layers by a [`CheckpointPolicy`]: the layers the
//! policy keeps record their activations as usual; every other layer runs under
//! [`mgm_tensor::checkpoint`] and is recomputed in backward.

use std::sync::Arc;

use mgm_tensor::{Tensor, checkpoint};
use mgm_umm::CheckpointPolicy;

use crate::Result;

/// A layer's forward: `x -> layer(x)`.
pub type LayerFn = dyn Fn(&Tensor) -> mgm_tensor::Result<Tensor> + Send + Sync;

/// One layer: its forward from the previous output, and the tensors of the `Var`s it reads.
pub struct Layer {
    /// `x -> layer(x)`.
    pub forward: Arc<LayerFn>,
    /// The parameter tensors it reads (`Var::as_tensor`).
    pub params: Vec<Tensor>,
}

/// Runs `layers` in order on `x`; layer `i` keeps its activations when `policy.keeps(i)`,
/// otherwise it is recomputed in backward.
pub fn run_layers(x: &Tensor, layers: &[Layer], policy: CheckpointPolicy) -> Result<Tensor> {
    let mut h = x.clone();
    for (i, l) in layers.iter().enumerate() {
        h = if policy.keeps(i) {
            (l.forward)(&h)?
        } else {
            let f = l.forward.clone();
            checkpoint(&[h], &l.params, move |a| f(&a[0]))?
        };
    }
    Ok(h)
}
