//! Mixtral's sparse mixture of experts, as transformers computes it: router logits
//! `gate(x)`, a softmax over all experts in f32, the top `k` probabilities renormalised to sum
//! to one, and each token's output `sum_e w_e expert_e(x)` with the LLaMA-style expert
//! `w2(silu(w1 x) * w3 x)`.
//!
//! Weights by the Hub checkpoints' names under `block_sparse_moe`: `gate.weight` `[E, hidden]`
//! and `experts.E.{w1, w3}.weight` `[inner, hidden]`, `experts.E.w2.weight` `[hidden, inner]`.

use mgm_tensor::nn::{Linear, Module, VarStore};
use mgm_tensor::{DType, Tensor};

use crate::config::DecoderConfig;
use crate::model::Mlp;
use crate::{Error, Result};

/// The mixture-of-experts feed-forward block.
#[derive(Clone, Debug)]
pub struct Moe {
    router: Linear,
    experts: Vec<Mlp>,
    top_k: usize,
}

/// Which experts one batch of tokens was sent to.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    /// `[tokens, k]` expert indices, most probable first.
    pub experts: Vec<usize>,
    /// `[tokens, k]` their renormalised weights (each row sums to 1).
    pub weights: Vec<f32>,
}

impl Moe {
    /// Loads the router and the experts from `vs` (the `block_sparse_moe` prefix).
    pub fn load(vs: &VarStore, c: &DecoderConfig) -> Result<Moe> {
        let (h, inner) = (c.hidden_size, c.intermediate_size);
        let router = Linear::load_mapped(&vs.pp("gate"), h, c.num_local_experts, false)?;
        let experts = (0..c.num_local_experts)
            .map(|e| {
                let x = vs.pp(&format!("experts.{e}"));
                Ok(Mlp {
                    gate: Linear::load_mapped(&x.pp("w1"), h, inner, false)?,
                    up: Linear::load_mapped(&x.pp("w3"), h, inner, false)?,
                    down: Linear::load_mapped(&x.pp("w2"), inner, h, false)?,
                    act: c.hidden_act,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Moe {
            router,
            experts,
            top_k: c.num_experts_per_tok,
        })
    }

    /// The router (`gate`) and every expert's layers with their names under the block.
    pub(crate) fn linears(&self) -> Vec<(String, &Linear)> {
        let mut v = vec![("gate".to_string(), &self.router)];
        for (e, m) in self.experts.iter().enumerate() {
            for (n, l) in [("w1", &m.gate), ("w3", &m.up), ("w2", &m.down)] {
                v.push((format!("experts.{e}.{n}"), l));
            }
        }
        v
    }

    /// Quantizes the experts (the router stays f32: it is small, and its top-k choice is
    /// sensitive to rounding).
    pub(crate) fn quantize_experts(
        &mut self,
        format: mgm_kernels::quant::QuantFormat,
    ) -> Result<()> {
        for m in &mut self.experts {
            for l in [&mut m.gate, &mut m.up, &mut m.down] {
                *l = l.quantize(format)?;
            }
        }
        Ok(())
    }

    /// The routing of `x` `[.., hidden]` (one row per token).
    pub fn route(&self, x: &Tensor) -> Result<Routing> {
        let h = *x
            .shape()
            .last()
            .ok_or_else(|| Error::input("Moe", "input must have a hidden dim"))?;
        let rows = x.numel() / h.max(1);
        let logits = self.router.forward(&x.reshape(&[rows, h])?)?;
        let probs = logits.to_dtype(DType::F32)?.softmax(-1)?;
        let (w, idx) = probs.topk(self.top_k, -1, true)?;
        let w = w.div(&w.sum(-1, true)?)?;
        Ok(Routing {
            experts: idx
                .to_vec::<i64>()?
                .into_iter()
                .map(|i| i as usize)
                .collect(),
            weights: w.to_vec::<f32>()?,
        })
    }

    /// `sum_e w_e expert_e(x)` for every token of `x` `[.., hidden]` (tensor ops, so autograd
    /// reaches the experts that were chosen, and the router through the weights).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let shape = x.shape().to_vec();
        let h = *shape
            .last()
            .ok_or_else(|| Error::input("Moe", "input must have a hidden dim"))?;
        let rows = x.numel() / h.max(1);
        let flat = x.reshape(&[rows, h])?;
        let logits = self.router.forward(&flat)?;
        let probs = logits.to_dtype(DType::F32)?.softmax(-1)?;
        let (w, idx) = probs.topk(self.top_k, -1, true)?;
        let w = w.div(&w.sum(-1, true)?)?.to_dtype(x.dtype())?;
        let idx_v = idx.to_vec::<i64>()?;
        let mut out = flat.zeros_like()?;
        for (e, expert) in self.experts.iter().enumerate() {
            // (token, slot) pairs routed to expert e
            let (mut toks, mut slots) = (Vec::new(), Vec::new());
            for (n, &ex) in idx_v.iter().enumerate() {
                if ex as usize == e {
                    toks.push((n / self.top_k) as i64);
                    slots.push(n as i64);
                }
            }
            if toks.is_empty() {
                continue;
            }
            let ti = Tensor::from_vec(toks, &[slots.len()])?;
            let si = Tensor::from_vec(slots.clone(), &[slots.len()])?;
            let xe = flat.index_select(0, &ti)?;
            let ye = expert.forward(&xe, None)?;
            let we = w
                .reshape(&[rows * self.top_k])?
                .index_select(0, &si)?
                .unsqueeze(1)?;
            out = out.index_add(0, &ti, &ye.mul(&we)?)?;
        }
        Ok(out.reshape(&shape)?)
    }
}
