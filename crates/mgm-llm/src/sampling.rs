//! Choosing the next token from logits, with transformers' processors in transformers' order:
//! repetition penalty, (min-new-tokens EOS suppression), then temperature, top-k and top-p;
//! greedy is the argmax (first index on ties, as `torch.argmax`). Sampling draws from a
//! ChaCha8 generator seeded by the caller, so a seed reproduces a generation exactly (but not
//! PyTorch's random stream).
//!
//! ```
//! use mgm_llm::sampling::{Sampler, SamplingParams};
//! let mut s = Sampler::new(SamplingParams::greedy());
//! assert_eq!(s.sample(&[0.1, 2.0, -1.0], &[]).unwrap(), 1);
//! ```

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// How to pick tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1: off).
    pub top_p: f32,
    /// transformers' repetition penalty over the prompt and the tokens so far (1: off).
    pub repetition_penalty: f32,
    /// Seed of the sampling generator.
    pub seed: u64,
}

impl SamplingParams {
    /// Argmax decoding.
    pub fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }

    /// Errors for values transformers rejects too.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::input("SamplingParams", msg));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!("temperature {} must be >= 0", self.temperature));
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(format!(
                "repetition_penalty {} must be > 0",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// A seeded token chooser.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler; the generator starts from `params.seed`.
    pub fn new(params: SamplingParams) -> Sampler {
        Sampler {
            params,
            rng: ChaCha8Rng::seed_from_u64(params.seed),
        }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks a token from one row of logits; `history` is every token so far (prompt and
    /// generated), for the repetition penalty.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        self.sample_suppressing(logits, history, &[])
    }

    /// As [`Sampler::sample`] with `suppress` tokens made impossible (transformers'
    /// `min_new_tokens` suppresses EOS this way).
    pub fn sample_suppressing(
        &mut self,
        logits: &[f32],
        history: &[u32],
        suppress: &[u32],
    ) -> Result<u32> {
        self.params.validate()?;
        if logits.is_empty() {
            return Err(Error::input("Sampler", "empty logits"));
        }
        let mut x = logits.to_vec();
        let p = self.params.repetition_penalty;
        if p != 1.0 {
            let mut seen = vec![false; x.len()];
            for &t in history {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
            for (v, s) in x.iter_mut().zip(&seen) {
                if *s {
                    *v = if *v < 0.0 { *v * p } else { *v / p };
                }
            }
        }
        for &t in suppress {
            if let Some(v) = x.get_mut(t as usize) {
                *v = f32::NEG_INFINITY;
            }
        }
        if self.params.temperature == 0.0 {
            return Ok(argmax(&x));
        }
        let inv_t = 1.0 / self.params.temperature;
        for v in &mut x {
            *v *= inv_t;
        }
        // indices by descending score (stable: equal scores keep index order)
        let mut order: Vec<usize> = (0..x.len()).collect();
        order.sort_by(|&a, &b| x[b].total_cmp(&x[a]));
        let mut keep = order.len();
        if self.params.top_k > 0 {
            keep = keep.min(self.params.top_k);
        }
        let m = x[order[0]];
        let probs: Vec<f64> = order[..keep]
            .iter()
            .map(|&i| f64::from(x[i] - m).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        if self.params.top_p < 1.0 {
            // the smallest prefix whose mass reaches top_p (at least one token)
            let mut acc = 0.0;
            let mut n = 0;
            for pr in &probs {
                acc += pr / total;
                n += 1;
                if acc >= f64::from(self.params.top_p) {
                    break;
                }
            }
            keep = n.max(1);
        }
        let total: f64 = probs[..keep].iter().sum();
        if !total.is_finite() || total <= 0.0 {
            return Ok(argmax(&x));
        }
        let mut r = self.rng.random::<f64>() * total;
        for (j, pr) in probs[..keep].iter().enumerate() {
            r -= pr;
            if r <= 0.0 {
                return Ok(order[j] as u32);
            }
        }
        Ok(order[keep - 1] as u32)
    }
}

/// The first index of the largest value (NaN never wins unless everything is NaN).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] || x[best].is_nan() && !v.is_nan() {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.2]), 1);
    }

    #[test]
    fn repetition_penalty_follows_transformers() {
        // token 0 (positive, seen) is divided, token 2 (negative, seen) multiplied
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&[3.0, 2.0, -1.0], &[0, 2]).unwrap(), 1);
    }

    #[test]
    fn seeded_sampling_repeats_and_respects_top_k() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 42,
        };
        let logits = [0.0f32, 1.0, 0.5, 0.9];
        let draw = |p| {
            let mut s = Sampler::new(p);
            (0..200)
                .map(|_| s.sample(&logits, &[]).unwrap())
                .collect::<Vec<_>>()
        };
        let a = draw(params);
        assert_eq!(a, draw(params));
        assert!(a.iter().all(|&t| t == 1 || t == 3), "top-2 are 1 and 3");
        assert!(a.contains(&1) && a.contains(&3));
    }

    #[test]
    fn top_p_keeps_the_smallest_sufficient_set() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            repetition_penalty: 1.0,
            seed: 1,
        });
        // token 2 alone holds more than half the mass
        for _ in 0..100 {
            assert_eq!(s.sample(&[0.0, 0.0, 5.0], &[]).unwrap(), 2);
        }
    }

    #[test]
    fn bad_parameters_are_errors() {
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.0,
            ..SamplingParams::greedy()
        });
        let e = s.sample(&[1.0], &[]).unwrap_err().to_string();
        assert!(e.contains("top_p"), "{e}");
    }
}
