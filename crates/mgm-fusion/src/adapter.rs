//! Modality adapters: a 2-layer MLP from one modality's width (text, image patches, audio mel
//! frames) into the shared fusion width.

use mgm_tensor::Tensor;
use mgm_tensor::nn::{Activation, VarStore};

use crate::error::Result;
use crate::projector::Projector;

/// The seed design's shared width.
pub const SHARED_DIM: usize = 768;

/// `fc2(GELU(fc1(x)))`: `in_dim -> shared_dim -> shared_dim`.
#[derive(Clone, Debug)]
pub struct ModalityAdapter {
    mlp: Projector,
}

impl ModalityAdapter {
    /// Loads `fc1` and `fc2` under `vs` (a trainable store creates them with PyTorch's init).
    ///
    /// ```
    /// use mgm_fusion::{ModalityAdapter, SHARED_DIM};
    /// use mgm_tensor::{nn::VarStore, DType, Device, Tensor};
    /// let mel = ModalityAdapter::load(&VarStore::new_trainable(0).pp("audio"), 80, SHARED_DIM)?;
    /// let y = mel.forward(&Tensor::zeros(&[1, 10, 80], DType::F32, Device::Cpu)?)?;
    /// assert_eq!(y.shape(), &[1, 10, 768]);
    /// # Ok::<(), mgm_fusion::Error>(())
    /// ```
    pub fn load(vs: &VarStore, in_dim: usize, shared_dim: usize) -> Result<Self> {
        Ok(ModalityAdapter {
            mlp: Projector::load_named(
                vs,
                ["fc1", "fc2"],
                Activation::GeluErf,
                true,
                [in_dim, shared_dim, shared_dim],
            )?,
        })
    }

    /// Maps `[..., in_dim]` to `[..., shared_dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.mlp.forward(x)
    }
}
