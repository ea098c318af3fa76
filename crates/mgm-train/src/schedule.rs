//! Learning-rate schedules as a factor on every group's base lr, by optimizer step.

/// A learning-rate schedule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    /// Always 1.
    Constant,
    /// Linear warmup from 0 over `warmup` steps, then cosine decay to `min_ratio` at `total`
    /// and `min_ratio` after it (transformers' `get_cosine_schedule_with_warmup` up to
    /// `total` when `min_ratio` is 0; past `total` its curve rises again).
    WarmupCosine {
        /// Warmup steps.
        warmup: u64,
        /// Total steps.
        total: u64,
        /// The factor the decay ends at.
        min_ratio: f64,
    },
}

impl Schedule {
    /// The factor for optimizer step `step` (0-based: the first update uses `factor(0)`).
    pub fn factor(&self, step: u64) -> f64 {
        match *self {
            Schedule::Constant => 1.0,
            Schedule::WarmupCosine {
                warmup,
                total,
                min_ratio,
            } => {
                if step < warmup {
                    return step as f64 / warmup.max(1) as f64;
                }
                let span = total.saturating_sub(warmup).max(1) as f64;
                let progress = ((step - warmup) as f64 / span).min(1.0);
                let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                min_ratio + (1.0 - min_ratio) * cos
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Schedule;

    /// transformers' lr_lambda, written out: step / warmup, then
    /// max(0, 0.5 (1 + cos(pi progress))).
    #[test]
    fn warmup_cosine_follows_transformers() {
        let s = Schedule::WarmupCosine {
            warmup: 10,
            total: 110,
            min_ratio: 0.0,
        };
        for step in [0u64, 1, 5, 9, 10, 11, 35, 60, 109, 110] {
            let want = if step < 10 {
                step as f64 / 10.0
            } else {
                let p = (step - 10) as f64 / 100.0;
                (0.5 * (1.0 + (std::f64::consts::PI * p).cos())).max(0.0)
            };
            assert!((s.factor(step) - want).abs() < 1e-12, "step {step}");
        }
        assert_eq!(Schedule::Constant.factor(1000), 1.0);
        let floor = Schedule::WarmupCosine {
            warmup: 0,
            total: 10,
            min_ratio: 0.1,
        };
        assert!((floor.factor(10) - 0.1).abs() < 1e-12 && (floor.factor(0) - 1.0).abs() < 1e-12);
    }
}
