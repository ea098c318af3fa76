//! Mixture-of-experts routing over fusion experts: a linear router, top-k experts per token
//! with softmax weights renormalised over the chosen k (as Mixtral), an optional expert
//! capacity with the dropped assignments counted, and the load-balancing auxiliary loss of
//! transformers' `load_balancing_loss_func` (Switch Transformer):
//! `E * sum_e f_e P_e`, `f_e` the assignments to expert `e` (all k slots, before capacity) per
//! token and `P_e` the mean router probability of `e`.

use mgm_tensor::nn::{Activation, Linear, Module, VarStore};

use crate::projector::Projector;
use mgm_tensor::{DType, Device, Tensor};

use crate::error::{Result, bad_config, invalid};

const WHAT: &str = "MoE router";

/// What the router decided for a batch of tokens.
#[derive(Clone, Debug)]
pub struct Routing {
    /// Router probabilities `[T, E]` (softmax of the logits; carries gradients).
    pub probs: Tensor,
    /// The chosen experts, `experts[t * k + s]` for slot `s` of token `t` (slot 0 the most
    /// probable).
    pub experts: Vec<usize>,
    /// The chosen experts' weights `[T, k]`: probabilities renormalised over the k chosen,
    /// zero for a dropped assignment (carries gradients).
    pub weights: Tensor,
    /// Whether assignment `t * k + s` fit in its expert's capacity.
    pub kept: Vec<bool>,
    /// Assignments dropped for capacity.
    pub dropped: usize,
    /// Assignments each expert may take, when a capacity factor is set.
    pub capacity: Option<usize>,
    /// Kept assignments per expert.
    pub load: Vec<usize>,
    /// The load-balancing loss (a scalar; gradients reach the router through `P_e`).
    pub aux_loss: Tensor,
}

/// A linear router (`gate`, no bias) choosing `top_k` of `num_experts`.
#[derive(Clone, Debug)]
pub struct MoeRouter {
    gate: Linear,
    num_experts: usize,
    top_k: usize,
    capacity_factor: Option<f64>,
}

impl MoeRouter {
    /// Loads `gate.weight` `[num_experts, dim]` under `vs`. With a `capacity_factor` `c`,
    /// each expert takes at most `ceil(c T k / E)` assignments of a `T`-token batch: first
    /// slot 0 of every token in order, then slot 1, and so on (first choices win), the rest
    /// dropped.
    pub fn load(
        vs: &VarStore,
        dim: usize,
        num_experts: usize,
        top_k: usize,
        capacity_factor: Option<f64>,
    ) -> Result<Self> {
        if num_experts == 0 || top_k == 0 || top_k > num_experts {
            return Err(bad_config(
                WHAT,
                format!("top_k must be in 1..={num_experts} (the expert count), got {top_k}"),
            ));
        }
        if let Some(c) = capacity_factor.filter(|c| !(c.is_finite() && *c > 0.0)) {
            return Err(bad_config(
                WHAT,
                format!("capacity factor must be positive, got {c}"),
            ));
        }
        Ok(MoeRouter {
            gate: Linear::load(&vs.pp("gate"), dim, num_experts, false)?,
            num_experts,
            top_k,
            capacity_factor,
        })
    }

    /// Experts.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Experts per token.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Routes `x` `[T, dim]`.
    ///
    /// ```
    /// use mgm_fusion::MoeRouter;
    /// use mgm_tensor::{nn::VarStore, DType, Device, Tensor};
    /// let router = MoeRouter::load(&VarStore::new_trainable(0), 8, 4, 2, Some(1.0))?;
    /// let r = router.route(&Tensor::randn(0, &[6, 8], 0.0, 1.0, DType::F32, Device::Cpu)?)?;
    /// assert_eq!((r.weights.shape(), r.capacity), (&[6, 2][..], Some(3)));
    /// assert_eq!(r.load.iter().sum::<usize>() + r.dropped, 12);
    /// # Ok::<(), mgm_fusion::Error>(())
    /// ```
    pub fn route(&self, x: &Tensor) -> Result<Routing> {
        let (t, k, e) = match x.shape() {
            &[t, d] if d == self.gate.in_features() => (t, self.top_k, self.num_experts),
            s => {
                return Err(invalid(
                    WHAT,
                    format!("tokens {s:?} are not [T, {}]", self.gate.in_features()),
                ));
            }
        };
        let probs = self.gate.forward(x)?.to_dtype(DType::F32)?.softmax(-1)?;
        let (top, idx) = probs.topk(k, -1, true)?;
        let experts: Vec<usize> = idx
            .to_dtype(DType::I64)?
            .to_vec::<i64>()?
            .into_iter()
            .map(|i| i as usize)
            .collect();
        let renorm = top.div(&top.sum(-1, true)?)?;
        let capacity = self
            .capacity_factor
            .map(|c| (c * (t * k) as f64 / e as f64).ceil() as usize);
        let mut load = vec![0usize; e];
        let mut kept = vec![true; t * k];
        for s in 0..k {
            for tok in 0..t {
                let ex = experts[tok * k + s];
                if capacity.is_some_and(|cap| load[ex] >= cap) {
                    kept[tok * k + s] = false;
                } else {
                    load[ex] += 1;
                }
            }
        }
        let dropped = kept.iter().filter(|&&v| !v).count();
        let weights = if dropped > 0 {
            let keep: Vec<f32> = kept.iter().map(|&v| f32::from(u8::from(v))).collect();
            renorm.mul(&Tensor::from_vec(keep, &[t, k])?)?
        } else {
            renorm
        };
        let mut counts = vec![0f32; e];
        for &ex in &experts {
            counts[ex] += 1.0;
        }
        let f = Tensor::from_vec(counts, &[e])?.mul_scalar(1.0 / t.max(1) as f64)?;
        let aux_loss = probs
            .mean(0, false)?
            .mul(&f)?
            .sum_all()?
            .mul_scalar(e as f64)?;
        Ok(Routing {
            probs,
            experts,
            weights,
            kept,
            dropped,
            capacity,
            load,
            aux_loss,
        })
    }
}

/// A mixture-of-experts layer: `y_t = sum_s w_{t,s} expert_{e(t,s)}(x_t)` over the kept
/// assignments.
#[derive(Clone, Debug)]
pub struct MoeLayer {
    router: MoeRouter,
    experts: Vec<Projector>,
}

impl MoeLayer {
    /// Loads `router.gate` and the experts `experts.{i}.{fc1,fc2}` (`fc2(GELU(fc1(x)))`,
    /// `dim -> hidden -> dim`) under `vs`.
    pub fn load(
        vs: &VarStore,
        dim: usize,
        hidden: usize,
        num_experts: usize,
        top_k: usize,
        capacity_factor: Option<f64>,
    ) -> Result<Self> {
        Ok(MoeLayer {
            router: MoeRouter::load(&vs.pp("router"), dim, num_experts, top_k, capacity_factor)?,
            experts: (0..num_experts)
                .map(|i| {
                    Projector::load_named(
                        &vs.pp(&format!("experts.{i}")),
                        ["fc1", "fc2"],
                        Activation::GeluErf,
                        true,
                        [dim, hidden, dim],
                    )
                })
                .collect::<Result<_>>()?,
        })
    }

    /// The router.
    pub fn router(&self) -> &MoeRouter {
        &self.router
    }

    /// Mixes `x` `[..., dim]`: returns the output (same shape) and the routing.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Routing)> {
        let shape = x.shape().to_vec();
        let dim = *shape.last().unwrap_or(&0);
        let t = x.numel() / dim.max(1);
        let flat = x.reshape(&[t, dim])?;
        let r = self.router.route(&flat)?;
        let k = self.router.top_k;
        let w = r.weights.reshape(&[t * k])?.to_dtype(x.dtype())?;
        let mut y = Tensor::zeros(&[t, dim], x.dtype(), Device::Cpu)?;
        for (ex, expert) in self.experts.iter().enumerate() {
            let slots: Vec<i64> = (0..t * k)
                .filter(|&a| r.kept[a] && r.experts[a] == ex)
                .map(|a| a as i64)
                .collect();
            if slots.is_empty() {
                continue;
            }
            let n = slots.len();
            let toks: Vec<i64> = slots.iter().map(|&a| a / k as i64).collect();
            let toks = Tensor::from_vec(toks, &[n])?;
            let we = w
                .index_select(0, &Tensor::from_vec(slots, &[n])?)?
                .unsqueeze(1)?;
            let out = expert.forward(&flat.index_select(0, &toks)?)?.mul(&we)?;
            y = y.index_add(0, &toks, &out)?;
        }
        Ok((y.reshape(&shape)?, r))
    }
}
