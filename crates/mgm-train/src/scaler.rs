//! Dynamic loss scaling for f16 training, with `torch.amp.GradScaler`'s rules: the loss is
//! multiplied by the scale before backward; the gradients are divided by it; a step whose
//! gradients hold an inf or NaN is skipped and the scale multiplied by `backoff`; after
//! `growth_interval` clean steps in a row the scale is multiplied by `growth`.

use mgm_tensor::Tensor;

use crate::Result;
use crate::grads::Grads;

/// A dynamic loss scaler.
#[derive(Clone, Debug, PartialEq)]
pub struct LossScaler {
    /// The current scale.
    pub scale: f64,
    /// Factor after `growth_interval` clean steps (2).
    pub growth: f64,
    /// Factor after an overflow (0.5).
    pub backoff: f64,
    /// Clean steps before growing.
    pub growth_interval: u64,
    /// Clean steps since the last growth or overflow.
    pub clean_steps: u64,
}

/// What [`LossScaler::unscale_and_update`] decided for one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScaleOutcome {
    /// The gradients are finite and unscaled: take the step.
    Step,
    /// An inf or NaN: skip the step; the scale went from `from` to `to`.
    Skip {
        /// The scale the step used.
        from: f64,
        /// The scale after backing off.
        to: f64,
    },
}

impl Default for LossScaler {
    /// GradScaler's defaults: scale 2^16, growth 2, backoff 0.5, interval 2000.
    fn default() -> Self {
        LossScaler::new(65536.0, 2000)
    }
}

impl LossScaler {
    /// A scaler starting at `scale` that doubles after `growth_interval` clean steps.
    pub fn new(scale: f64, growth_interval: u64) -> LossScaler {
        LossScaler {
            scale,
            growth: 2.0,
            backoff: 0.5,
            growth_interval,
            clean_steps: 0,
        }
    }

    /// `loss * scale`, to backpropagate instead of `loss`.
    pub fn scale_loss(&self, loss: &Tensor) -> Result<Tensor> {
        Ok(loss.mul_scalar(self.scale)?)
    }

    /// Divides `grads` by the scale, checks them and updates the scale (both as GradScaler's
    /// `unscale_` + `step` + `update`): on an inf or NaN the caller must skip the step.
    pub fn unscale_and_update(&mut self, grads: &mut Grads) -> ScaleOutcome {
        // the division as GradScaler does it: multiply by the f32 reciprocal
        grads.scale((1.0 / self.scale) as f32);
        if !grads.all_finite() {
            let from = self.scale;
            self.scale *= self.backoff;
            self.clean_steps = 0;
            return ScaleOutcome::Skip {
                from,
                to: self.scale,
            };
        }
        self.clean_steps += 1;
        if self.clean_steps >= self.growth_interval {
            self.scale *= self.growth;
            self.clean_steps = 0;
        }
        ScaleOutcome::Step
    }
}
