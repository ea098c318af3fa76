//! Optimizers over named parameters: AdamW and SGD with momentum, with parameter groups chosen
//! by name patterns, the arithmetic of PyTorch's single-tensor (CPU) implementations.
//!
//! Each parameter that a group takes gets its own state (step count, moments or momentum
//! buffer) on its first gradient, as `torch.optim` does; frozen parameters get none. The
//! update runs in f32 on a master copy: for an f32 model that is the parameter itself, for a
//! bf16/f16 model an f32 copy kept here and rounded into the model after every step.

use mgm_tensor::{DType, Tensor, Var};

use crate::grads::Grads;
use crate::{Error, Result};

/// One parameter group: which parameters (glob patterns over the full name, `*` matching any
/// run of characters; no pattern takes every parameter not taken by an earlier group) and
/// its hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupSpec {
    /// A name for logs and checkpoints.
    pub name: String,
    /// Name patterns; empty matches everything.
    pub patterns: Vec<String>,
    /// Base learning rate (a schedule multiplies it).
    pub lr: f64,
    /// AdamW's (beta1, beta2); SGD reads beta1 as its momentum.
    pub betas: (f64, f64),
    /// AdamW's epsilon.
    pub eps: f64,
    /// Weight decay: decoupled for AdamW, added to the gradient for SGD (as PyTorch).
    pub weight_decay: f64,
}

impl GroupSpec {
    /// A group with PyTorch's AdamW defaults (betas (0.9, 0.999), eps 1e-8, weight decay 0.01).
    pub fn new(name: &str, patterns: &[&str], lr: f64) -> GroupSpec {
        GroupSpec {
            name: name.into(),
            patterns: patterns.iter().map(|p| p.to_string()).collect(),
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }

    /// The same group with other betas.
    pub fn betas(mut self, b1: f64, b2: f64) -> GroupSpec {
        self.betas = (b1, b2);
        self
    }

    /// The same group with another weight decay.
    pub fn weight_decay(mut self, wd: f64) -> GroupSpec {
        self.weight_decay = wd;
        self
    }

    /// The same group with another epsilon.
    pub fn eps(mut self, eps: f64) -> GroupSpec {
        self.eps = eps;
        self
    }

    fn matches(&self, name: &str) -> bool {
        self.patterns.is_empty() || self.patterns.iter().any(|p| glob(p, name))
    }
}

/// `pattern` with `*` as any run of characters, matched against the whole of `name`.
pub fn glob(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// Which update rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// Adam with decoupled weight decay (`torch.optim.AdamW`).
    AdamW,
    /// SGD with momentum (`torch.optim.SGD`, dampening 0; `nesterov` as its flag).
    Sgd {
        /// Nesterov momentum.
        nesterov: bool,
    },
}

/// One trained parameter and its state.
pub(crate) struct ParamState {
    pub(crate) name: String,
    pub(crate) var: Var,
    pub(crate) group: usize,
    /// Updates applied to this parameter (PyTorch's per-parameter `step`).
    pub(crate) step: u64,
    /// AdamW: [exp_avg, exp_avg_sq]; SGD: [momentum_buffer]; empty before the first update.
    pub(crate) bufs: Vec<Vec<f32>>,
    /// The f32 master copy of a bf16/f16 parameter.
    pub(crate) master: Option<Vec<f32>>,
}

/// An optimizer over named parameters.
pub struct Optimizer {
    kind: Kind,
    groups: Vec<GroupSpec>,
    pub(crate) params: Vec<ParamState>,
    /// Parameters a frozen pattern took: never updated, but their gradients are cleared with
    /// the others' so that they do not pile up.
    frozen: Vec<(String, Var)>,
}

impl Optimizer {
    /// AdamW over `params`: each parameter goes to the first group that matches it, unless a
    /// `frozen` pattern matches it first. A parameter that no group takes is an error (naming
    /// it), so that nothing is silently left untrained.
    pub fn adamw(
        params: Vec<(String, Var)>,
        groups: Vec<GroupSpec>,
        frozen: &[&str],
    ) -> Result<Optimizer> {
        Self::new(Kind::AdamW, params, groups, frozen)
    }

    /// SGD with momentum `group.betas.0` (0: plain SGD) and coupled weight decay.
    pub fn sgd(
        params: Vec<(String, Var)>,
        groups: Vec<GroupSpec>,
        frozen: &[&str],
        nesterov: bool,
    ) -> Result<Optimizer> {
        Self::new(Kind::Sgd { nesterov }, params, groups, frozen)
    }

    fn new(
        kind: Kind,
        params: Vec<(String, Var)>,
        groups: Vec<GroupSpec>,
        frozen: &[&str],
    ) -> Result<Optimizer> {
        if groups.is_empty() {
            return Err(Error::Config(
                "an optimizer needs at least one group".into(),
            ));
        }
        for g in &groups {
            let ok = [g.lr, g.eps, g.weight_decay]
                .iter()
                .all(|x| x.is_finite() && *x >= 0.0)
                && (0.0..1.0).contains(&g.betas.0)
                && (0.0..1.0).contains(&g.betas.1);
            if !ok {
                return Err(Error::Config(format!(
                    "group {:?}: lr {}, betas {:?}, eps {}, weight decay {} (need lr, eps, \
                     decay >= 0 and betas in [0, 1))",
                    g.name, g.lr, g.betas, g.eps, g.weight_decay
                )));
            }
        }
        let mut states = Vec::new();
        let mut frozen_names = Vec::new();
        for (name, var) in params {
            if frozen.iter().any(|p| glob(p, &name)) {
                frozen_names.push((name, var));
                continue;
            }
            let Some(group) = groups.iter().position(|g| g.matches(&name)) else {
                return Err(Error::Config(format!(
                    "parameter {name:?} matches no group ({}) and no frozen pattern",
                    groups
                        .iter()
                        .map(|g| format!("{}: {:?}", g.name, g.patterns))
                        .collect::<Vec<_>>()
                        .join("; ")
                )));
            };
            let dtype = var.as_tensor().dtype();
            let master = match dtype {
                DType::F32 => None,
                DType::BF16 | DType::F16 => Some(crate::f32s(&var.as_tensor())?),
                other => {
                    return Err(Error::Config(format!(
                        "parameter {name:?} is {other:?}; only f32, bf16 and f16 train"
                    )));
                }
            };
            states.push(ParamState {
                name,
                var,
                group,
                step: 0,
                bufs: Vec::new(),
                master,
            });
        }
        Ok(Optimizer {
            kind,
            groups,
            params: states,
            frozen: frozen_names,
        })
    }

    /// The update rule.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The groups.
    pub fn groups(&self) -> &[GroupSpec] {
        &self.groups
    }

    /// The trained parameters' names and their group names, in order.
    pub fn trained(&self) -> Vec<(&str, &str)> {
        self.params
            .iter()
            .map(|p| (p.name.as_str(), self.groups[p.group].name.as_str()))
            .collect()
    }

    /// The trained parameters' names and variables, in order (what [`Grads::collect`] reads).
    pub fn vars(&self) -> Vec<(&str, &Var)> {
        self.params
            .iter()
            .map(|p| (p.name.as_str(), &p.var))
            .collect()
    }

    /// Names of the parameters a frozen pattern took.
    pub fn frozen(&self) -> Vec<&str> {
        self.frozen.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// How many parameters hold optimizer state (frozen ones never do).
    pub fn params_with_state(&self) -> usize {
        self.params.iter().filter(|p| !p.bufs.is_empty()).count()
    }

    /// Clears every parameter's accumulated gradient, frozen ones included.
    pub fn zero_grad(&self) {
        for p in &self.params {
            p.var.zero_grad();
        }
        for (_, v) in &self.frozen {
            v.zero_grad();
        }
    }

    /// One update with `grads` (from [`Grads::collect`] on this optimizer, after any
    /// unscaling and clipping), each group's lr times `lr_scale` (the schedule's factor).
    /// Parameters without a gradient are skipped, state and all, as in PyTorch.
    pub fn step(&mut self, grads: &Grads, lr_scale: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(Error::Config(format!(
                "{} gradients for {} parameters: collect them from this optimizer",
                grads.len(),
                self.params.len()
            )));
        }
        for (p, g) in self.params.iter_mut().zip(grads.values()) {
            let Some(g) = g else { continue };
            let spec = &self.groups[p.group];
            let lr = spec.lr * lr_scale;
            let mut value = match &p.master {
                Some(m) => m.clone(),
                None => crate::f32s(&p.var.as_tensor())?,
            };
            if g.len() != value.len() {
                return Err(Error::Config(format!(
                    "gradient of {:?} has {} values, the parameter {}",
                    p.name,
                    g.len(),
                    value.len()
                )));
            }
            p.step += 1;
            match self.kind {
                Kind::AdamW => adamw(&mut value, g, &mut p.bufs, p.step, lr, spec),
                Kind::Sgd { nesterov } => sgd(&mut value, g, &mut p.bufs, lr, spec, nesterov),
            }
            let t = p.var.as_tensor();
            let new = Tensor::from_vec(value.clone(), t.shape())?.to_dtype(t.dtype())?;
            p.var.set(&new)?;
            if let Some(m) = &mut p.master {
                *m = value;
            }
        }
        Ok(())
    }
}

/// `torch.optim.AdamW`'s single-tensor update, operation by operation in f32: decay, the
/// moments (`lerp_`, `mul_` + `addcmul_`), then `addcdiv_` with the bias corrections
/// computed in f64 as Python floats.
fn adamw(p: &mut [f32], g: &[f32], bufs: &mut Vec<Vec<f32>>, step: u64, lr: f64, s: &GroupSpec) {
    if bufs.is_empty() {
        *bufs = vec![vec![0.0; p.len()], vec![0.0; p.len()]];
    }
    let (b1, b2) = s.betas;
    let decay = (1.0 - lr * s.weight_decay) as f32;
    let w1 = (1.0 - b1) as f32;
    let (b2f, w2) = (b2 as f32, (1.0 - b2) as f32);
    let bc1 = 1.0 - b1.powi(step as i32);
    let bc2_sqrt = (1.0 - b2.powi(step as i32)).sqrt() as f32;
    let step_size = -(lr / bc1) as f32;
    let eps = s.eps as f32;
    let (m, v) = bufs.split_at_mut(1);
    let (m, v) = (&mut m[0], &mut v[0]);
    for i in 0..p.len() {
        p[i] *= decay;
        // torch's lerp: start + w (end - start) for a weight below one half, else
        // end - (end - start)(1 - w)
        m[i] = if w1 < 0.5 {
            m[i] + w1 * (g[i] - m[i])
        } else {
            g[i] - (g[i] - m[i]) * (1.0 - w1)
        };
        v[i] = v[i] * b2f + w2 * g[i] * g[i];
        let denom = v[i].sqrt() / bc2_sqrt + eps;
        p[i] += step_size * m[i] / denom;
    }
}

/// `torch.optim.SGD`'s single-tensor update (dampening 0).
fn sgd(p: &mut [f32], g: &[f32], bufs: &mut Vec<Vec<f32>>, lr: f64, s: &GroupSpec, nesterov: bool) {
    let (mom, wd, lr) = (s.betas.0 as f32, s.weight_decay as f32, lr as f32);
    let d: Vec<f32> = g.iter().zip(p.iter()).map(|(g, p)| g + wd * p).collect();
    let step: Vec<f32> = if mom != 0.0 {
        if bufs.is_empty() {
            bufs.push(d.clone());
        } else {
            for (b, d) in bufs[0].iter_mut().zip(&d) {
                *b = *b * mom + d;
            }
        }
        if nesterov {
            d.iter().zip(&bufs[0]).map(|(d, b)| d + mom * b).collect()
        } else {
            bufs[0].clone()
        }
    } else {
        d
    };
    for (p, s) in p.iter_mut().zip(step) {
        *p += -lr * s;
    }
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn glob_matches_whole_names() {
        assert!(glob("model.*", "model.layers.0.w"));
        assert!(glob("*proj*", "model.mm_projector.0.weight"));
        assert!(glob("*.bias", "a.b.bias"));
        assert!(!glob("*.bias", "a.b.bias2"));
        assert!(glob("a*b*c", "aXbYc"));
        assert!(!glob("a*b*c", "aXcYb"));
        assert!(glob("exact", "exact") && !glob("exact", "exact2"));
        assert!(!glob("ab*ba", "aba"));
    }
}
