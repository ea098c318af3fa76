//! The gradients of one optimizer step, as f32 vectors in the optimizer's parameter order:
//! collected from the parameters' accumulated gradients (any float dtype), then unscaled,
//! checked and clipped before [`Optimizer::step`](crate::Optimizer::step).

use crate::{Optimizer, Result};

/// Per-parameter f32 gradients (`None`: the parameter got no gradient this step).
#[derive(Clone, Debug, PartialEq)]
pub struct Grads {
    values: Vec<Option<Vec<f32>>>,
}

impl Grads {
    /// The gradients accumulated in `opt`'s parameters since their last `zero_grad`.
    pub fn collect(opt: &Optimizer) -> Result<Grads> {
        let values = opt
            .vars()
            .into_iter()
            .map(|(_, v)| v.grad().map(|g| crate::f32s(&g)).transpose())
            .collect::<Result<Vec<_>>>()?;
        Ok(Grads { values })
    }

    /// Gradients given directly, in the optimizer's parameter order.
    pub fn from_values(values: Vec<Option<Vec<f32>>>) -> Grads {
        Grads { values }
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True for no parameters.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The values, in order.
    pub fn values(&self) -> &[Option<Vec<f32>>] {
        &self.values
    }

    /// True when every value is finite (what a loss scaler checks).
    pub fn all_finite(&self) -> bool {
        self.values
            .iter()
            .flatten()
            .flatten()
            .all(|x| x.is_finite())
    }

    /// Multiplies every value by `f`.
    pub fn scale(&mut self, f: f32) {
        for x in self.values.iter_mut().flatten().flatten() {
            *x *= f;
        }
    }

    /// The L2 norm over all values (accumulated in f64).
    pub fn global_norm(&self) -> f64 {
        self.values
            .iter()
            .flatten()
            .flatten()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt()
    }

    /// `torch.nn.utils.clip_grad_norm_`: scales by min(1, max_norm / (norm + 1e-6)) and returns
    /// the norm before clipping.
    pub fn clip_global_norm(&mut self, max_norm: f64) -> f64 {
        let norm = self.global_norm();
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        self.scale(coef as f32);
        norm
    }
}
