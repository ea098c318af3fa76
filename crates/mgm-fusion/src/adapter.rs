//! Modality adapters: a 2-layer MLP from one modality's width (text, image patches, audio mel
//! frames) into the shared fusion width.

use mgm_tensor::Tensor;
use mgm_tensor::nn::{Activation, Linear, Module, VarStore};

use crate::error::{Result, invalid};

/// The seed design's shared width.
pub const SHARED_DIM: usize = 768;

/// `fc2(GELU(fc1(x)))`: `in_dim -> shared_dim -> shared_dim`.
#[derive(Clone, Debug)]
pub struct ModalityAdapter {
    fc1: Linear,
    fc2: Linear,
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
            fc1: Linear::load(&vs.pp("fc1"), in_dim, shared_dim, true)?,
            fc2: Linear::load(&vs.pp("fc2"), shared_dim, shared_dim, true)?,
        })
    }

    /// Maps `[..., in_dim]` to `[..., shared_dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.shape().last() != Some(&self.fc1.in_features()) {
            return Err(invalid(
                "modality adapter",
                format!(
                    "features {:?} do not end in the adapter's input width {}",
                    x.shape(),
                    self.fc1.in_features()
                ),
            ));
        }
        Ok(self
            .fc2
            .forward(&self.fc1.forward_fused(x, Activation::GeluErf, None)?)?)
    }
}
