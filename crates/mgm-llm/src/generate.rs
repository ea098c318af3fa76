//! Generation with the KV cache: prompts of different lengths are left-padded into one batch
//! (positions numbered as transformers' `generate` does, `cumsum(mask) - 1`), prefilled in one
//! step, then decoded one token per row per step until every row has produced a stop token or
//! `max_new_tokens`. Finished rows continue with the pad token, as transformers' outputs do.
//! A prompt plus `max_new_tokens` longer than the model's context is an error up front, never
//! a silent truncation.
//!
//! [`Generation`] is an iterator of steps, so callers can stream: each item is the new token
//! of every row.

use mgm_tensor::Tensor;

use crate::model::{CausalLm, Positions};
use crate::sampling::{Sampler, SamplingParams};
use crate::{Error, KvCache, Result};

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// New tokens per row at most.
    pub max_new_tokens: usize,
    /// Stop tokens cannot be produced before this many new tokens (transformers'
    /// `min_new_tokens`).
    pub min_new_tokens: usize,
    /// Token choice.
    pub sampling: SamplingParams,
    /// A row stops after producing one of these (the model's EOS tokens by default).
    pub stop_tokens: Vec<u32>,
    /// What finished rows (and padding) carry (the model's pad token, else its first EOS,
    /// else 0).
    pub pad_token: Option<u32>,
}

impl GenerateOptions {
    /// Greedy decoding of up to `max_new_tokens` with `model`'s EOS as the stop tokens.
    pub fn greedy(model: &CausalLm, max_new_tokens: usize) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens,
            min_new_tokens: 0,
            sampling: SamplingParams::greedy(),
            stop_tokens: model.config().eos_token_ids.clone(),
            pad_token: None,
        }
    }
}

/// A running generation (an iterator of steps).
pub struct Generation<'m> {
    model: &'m CausalLm,
    opts: GenerateOptions,
    cache: KvCache,
    samplers: Vec<Sampler>,
    /// Every row's tokens so far (prompt without padding, then generated).
    history: Vec<Vec<u32>>,
    /// Next position id per row.
    next_pos: Vec<usize>,
    finished: Vec<bool>,
    /// Logits of the last step, `[B, V]`, to sample the next tokens from.
    last: Vec<Vec<f32>>,
    produced: usize,
    pad: u32,
}

impl<'m> Generation<'m> {
    /// Prefills the prompts (one per row, any lengths >= 1).
    pub fn new(model: &'m CausalLm, prompts: &[Vec<u32>], opts: GenerateOptions) -> Result<Self> {
        opts.sampling.validate()?;
        if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
            return Err(Error::input(
                "generate",
                "every prompt needs at least one token",
            ));
        }
        let c = model.config();
        let b = prompts.len();
        let t = prompts.iter().map(Vec::len).max().unwrap_or(0);
        check_context(model, t, opts.max_new_tokens)?;
        let pad = opts
            .pad_token
            .or(c.pad_token_id)
            .or(c.eos_token_ids.first().copied())
            .unwrap_or(0);
        let mut ids = Vec::with_capacity(b * t);
        let mut mask = Vec::with_capacity(b * t);
        for p in prompts {
            for _ in p.len()..t {
                ids.push(i64::from(pad));
                mask.push(0i64);
            }
            ids.extend(p.iter().map(|&x| i64::from(x)));
            mask.extend(std::iter::repeat_n(1i64, p.len()));
        }
        let pos = Positions::from_mask(&mask, b, t);
        let embeds = model.embed(&Tensor::from_vec(ids, &[b, t])?)?;
        let next_pos = prompts.iter().map(Vec::len).collect();
        Self::start(model, &embeds, &pos, prompts.to_vec(), next_pos, pad, opts)
    }

    /// Prefills prompts given as input embeddings `[B, T, hidden]` (every position real, e.g.
    /// text with image features spliced in, as [`CausalLm::embed`] and a projector make them);
    /// `history` holds each row's prompt tokens for the repetition penalty (image positions
    /// have none).
    pub fn from_embeds(
        model: &'m CausalLm,
        embeds: &Tensor,
        history: Vec<Vec<u32>>,
        opts: GenerateOptions,
    ) -> Result<Self> {
        opts.sampling.validate()?;
        let (b, t) = match embeds.shape() {
            &[b, t, _] if b > 0 && t > 0 => (b, t),
            s => {
                return Err(Error::input(
                    "generate",
                    format!("prompt embeddings must be [batch, seq, hidden], got {s:?}"),
                ));
            }
        };
        if history.len() != b {
            return Err(Error::input(
                "generate",
                format!("{} token histories for {b} prompt rows", history.len()),
            ));
        }
        check_context(model, t, opts.max_new_tokens)?;
        let c = model.config();
        let pad = opts
            .pad_token
            .or(c.pad_token_id)
            .or(c.eos_token_ids.first().copied())
            .unwrap_or(0);
        let pos = Positions::contiguous(b, t, 0);
        Self::start(model, embeds, &pos, history, vec![t; b], pad, opts)
    }

    fn start(
        model: &'m CausalLm,
        embeds: &Tensor,
        pos: &Positions,
        history: Vec<Vec<u32>>,
        next_pos: Vec<usize>,
        pad: u32,
        opts: GenerateOptions,
    ) -> Result<Self> {
        let (b, t) = (embeds.shape()[0], embeds.shape()[1]);
        let mut cache = model.new_cache(b, t + opts.max_new_tokens)?;
        let logits = model.step_embeds_keep(embeds, pos, &mut cache, 1)?;
        let last = last_logits(&logits)?;
        let samplers = (0..b)
            .map(|i| {
                Sampler::new(SamplingParams {
                    seed: opts.sampling.seed.wrapping_add(i as u64),
                    ..opts.sampling
                })
            })
            .collect();
        Ok(Generation {
            model,
            samplers,
            history,
            next_pos,
            finished: vec![false; b],
            last,
            produced: 0,
            pad,
            cache,
            opts,
        })
    }

    /// Every row's generated tokens so far (including the stop token, then padding).
    pub fn generated(&self) -> Vec<Vec<u32>> {
        self.history
            .iter()
            .map(|h| h[h.len() - self.produced..].to_vec())
            .collect()
    }

    /// Picks every row's next token, feeds it back, and returns the tokens.
    fn advance(&mut self) -> Result<Vec<u32>> {
        let b = self.history.len();
        let suppress: &[u32] = if self.produced < self.opts.min_new_tokens {
            &self.opts.stop_tokens
        } else {
            &[]
        };
        let mut next = Vec::with_capacity(b);
        for r in 0..b {
            let tok = if self.finished[r] {
                self.pad
            } else {
                self.samplers[r].sample_suppressing(&self.last[r], &self.history[r], suppress)?
            };
            next.push(tok);
        }
        for (r, &tok) in next.iter().enumerate() {
            self.history[r].push(tok);
            if self.opts.stop_tokens.contains(&tok) {
                self.finished[r] = true;
            }
        }
        self.produced += 1;
        let done = self.produced >= self.opts.max_new_tokens || self.finished.iter().all(|&f| f);
        if !done {
            let pos = Positions {
                ids: self.next_pos.clone(),
                valid: vec![true; b],
            };
            let ids: Vec<i64> = next.iter().map(|&x| i64::from(x)).collect();
            let logits =
                self.model
                    .step(&Tensor::from_vec(ids, &[b, 1])?, &pos, &mut self.cache)?;
            self.last = last_logits(&logits)?;
            for p in &mut self.next_pos {
                *p += 1;
            }
        }
        Ok(next)
    }

    /// Whether generation has ended.
    pub fn is_done(&self) -> bool {
        self.produced >= self.opts.max_new_tokens || self.finished.iter().all(|&f| f)
    }

    /// The cache (for inspection).
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }
}

impl Iterator for Generation<'_> {
    type Item = Result<Vec<u32>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.is_done() {
            return None;
        }
        Some(self.advance())
    }
}

/// A prompt of `t` positions plus `new` tokens must fit the model's context.
fn check_context(model: &CausalLm, t: usize, new: usize) -> Result<()> {
    match model.max_context() {
        Some(ctx) if t + new > ctx => Err(Error::input(
            "generate",
            format!(
                "a prompt of {t} tokens plus {new} new tokens exceeds the model's context of \
                 {ctx} (max_position_embeddings)"
            ),
        )),
        _ => Ok(()),
    }
}

/// The logits of each row's last position: `[B, T, V]` -> B rows of V.
fn last_logits(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    let s = logits.shape().to_vec();
    let (b, t, v) = (s[0], s[1], s[2]);
    let all = logits.narrow(1, t - 1, 1)?.contiguous()?.to_vec::<f32>()?;
    Ok((0..b).map(|r| all[r * v..(r + 1) * v].to_vec()).collect())
}

/// Generates for every prompt and returns each row's new tokens (up to the first stop token,
/// which is included; padding after it is dropped).
pub fn generate(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    opts: GenerateOptions,
) -> Result<Vec<Vec<u32>>> {
    let stop = opts.stop_tokens.clone();
    let mut g = Generation::new(model, prompts, opts)?;
    for step in g.by_ref() {
        step?;
    }
    Ok(g.generated()
        .into_iter()
        .map(|row| match row.iter().position(|t| stop.contains(t)) {
            Some(i) => row[..=i].to_vec(),
            None => row,
        })
        .collect())
}
