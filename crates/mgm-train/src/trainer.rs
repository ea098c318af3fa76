//! One optimizer step over several micro-batches: accumulate the gradients of each
//! micro-batch's loss, weighted so that the sum equals the big batch's mean, then (f16) unscale
//! and check, clip by the global L2 norm, and update at the schedule's lr.

use mgm_tensor::Tensor;

use crate::grads::Grads;
use crate::optim::Optimizer;
use crate::scaler::{LossScaler, ScaleOutcome};
use crate::schedule::Schedule;
use crate::{Error, Result};

/// An optimizer with its schedule, clipping and optional loss scaling.
pub struct Trainer {
    /// The optimizer.
    pub opt: Optimizer,
    /// The lr schedule.
    pub schedule: Schedule,
    /// Clip the global gradient norm to this (the seed uses 2.0); `None`: no clipping.
    pub clip: Option<f64>,
    /// Dynamic loss scaling (f16 training).
    pub scaler: Option<LossScaler>,
    /// Optimizer steps taken (skipped ones count: the schedule moves on, as with GradScaler).
    pub step: u64,
}

/// What one step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// The big batch's loss: the micro-batch losses weighted by their weights.
    pub loss: f64,
    /// The schedule's factor used (times each group's lr).
    pub lr_factor: f64,
    /// The gradient norm before clipping (after unscaling); NaN when the step was skipped.
    pub grad_norm: f64,
    /// The loss scaler skipped the step on an inf/NaN gradient: (scale used, scale now).
    pub skipped: Option<(f64, f64)>,
}

impl Trainer {
    /// A trainer without clipping or loss scaling.
    pub fn new(opt: Optimizer, schedule: Schedule) -> Trainer {
        Trainer {
            opt,
            schedule,
            clip: None,
            scaler: None,
            step: 0,
        }
    }

    /// One optimizer step over micro-batches `0..weights.len()`: `loss_of(i)` builds
    /// micro-batch i's mean loss, and its gradient is accumulated with weight
    /// `weights[i] / sum(weights)` (the number of counted tokens or samples in it), so that the
    /// update equals one step on the concatenated batch.
    pub fn step(
        &mut self,
        weights: &[f64],
        mut loss_of: impl FnMut(usize) -> Result<Tensor>,
    ) -> Result<StepReport> {
        let total: f64 = weights.iter().sum();
        if weights.is_empty() || total.is_nan() || total <= 0.0 {
            return Err(Error::Input(format!(
                "Trainer::step: micro-batch weights {weights:?} (need at least one, positive sum)"
            )));
        }
        self.opt.zero_grad();
        let mut loss = 0.0;
        for (i, w) in weights.iter().enumerate() {
            let l = loss_of(i)?;
            if l.numel() != 1 {
                return Err(Error::Input(format!(
                    "Trainer::step: micro-batch {i}'s loss has shape {:?}, not one value",
                    l.shape()
                )));
            }
            loss += l.to_scalar_f64()? * w / total;
            let mut scaled = l.mul_scalar(w / total)?;
            if let Some(s) = &self.scaler {
                scaled = s.scale_loss(&scaled)?;
            }
            scaled.backward()?;
        }
        let mut grads = Grads::collect(&self.opt)?;
        let lr_factor = self.schedule.factor(self.step);
        self.step += 1;
        if let Some(s) = &mut self.scaler
            && let ScaleOutcome::Skip { from, to } = s.unscale_and_update(&mut grads)
        {
            self.opt.zero_grad();
            return Ok(StepReport {
                loss,
                lr_factor,
                grad_norm: f64::NAN,
                skipped: Some((from, to)),
            });
        }
        let grad_norm = match self.clip {
            Some(max) => grads.clip_global_norm(max),
            None => grads.global_norm(),
        };
        self.opt.step(&grads, lr_factor)?;
        self.opt.zero_grad();
        Ok(StepReport {
            loss,
            lr_factor,
            grad_norm,
            skipped: None,
        })
    }
}
