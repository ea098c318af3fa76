//! Training losses as tensor ops (differentiable), with PyTorch's definitions.

use mgm_tensor::{DType, Tensor, Var};

use crate::{Error, Result};

/// The label id that no loss counts (PyTorch's `ignore_index` default).
pub const IGNORE_INDEX: i64 = -100;

/// transformers' causal-LM loss: position t's logits predict label t + 1 (the labels are the
/// input ids, with -100 where nothing is predicted, e.g. the prompt and the image), averaged
/// over the counted positions; `label_smoothing` as in `F.cross_entropy`. `logits` `[B, T, V]`,
/// `labels` i64 `[B, T]`.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor, label_smoothing: f64) -> Result<Tensor> {
    let (ls, ss) = (logits.shape(), labels.shape());
    if ls.len() != 3 || ss.len() != 2 || ls[..2] != ss[..] || labels.dtype() != DType::I64 {
        return Err(Error::Input(format!(
            "causal_lm_loss: logits {ls:?} and labels {:?} {ss:?} (need [B, T, V] and i64 [B, T])",
            labels.dtype()
        )));
    }
    let (b, t, v) = (ls[0], ls[1], ls[2]);
    if t < 2 {
        return Err(Error::Input(format!(
            "causal_lm_loss: a sequence of {t} token(s) predicts nothing"
        )));
    }
    let x = logits.narrow(1, 0, t - 1)?.reshape(&[b * (t - 1), v])?;
    let y = labels.narrow(1, 1, t - 1)?.reshape(&[b * (t - 1)])?;
    Ok(x.cross_entropy(&y, IGNORE_INDEX, label_smoothing)?)
}

/// Symmetric InfoNCE (CLIP's loss): rows of `a` and `b` `[N, D]` are L2-normalized, the
/// logits are `a b^T / temperature`, and the loss is the mean of the cross-entropies of
/// matching row i to column i and column i to row i.
pub fn info_nce(a: &Tensor, b: &Tensor, temperature: f64) -> Result<Tensor> {
    if a.rank() != 2 || a.shape() != b.shape() || a.shape()[0] == 0 {
        return Err(Error::Input(format!(
            "info_nce: embeddings {:?} and {:?} (need the same [N, D], N > 0)",
            a.shape(),
            b.shape()
        )));
    }
    if temperature.is_nan() || temperature <= 0.0 {
        return Err(Error::Input(format!(
            "info_nce: temperature {temperature} must be positive"
        )));
    }
    let n = a.shape()[0];
    let unit = |x: &Tensor| -> Result<Tensor> {
        let norm = x.sqr()?.sum(1, true)?.sqrt()?;
        Ok(x.div(&norm)?)
    };
    let logits = unit(a)?
        .matmul(&unit(b)?.t()?)?
        .mul_scalar(1.0 / temperature)?;
    let labels = Tensor::from_vec((0..n as i64).collect::<Vec<_>>(), &[n])?;
    let ab = logits.cross_entropy(&labels, IGNORE_INDEX, 0.0)?;
    let ba = logits
        .t()?
        .contiguous()?
        .cross_entropy(&labels, IGNORE_INDEX, 0.0)?;
    Ok(ab.add(&ba)?.mul_scalar(0.5)?)
}

/// `coefficient * sum of squares` over `params` (L2 regularisation added to a loss).
pub fn l2(params: &[&Var], coefficient: f64) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for p in params {
        let s = p.as_tensor().to_dtype(DType::F32)?.sqr()?.sum_all()?;
        total = Some(match total {
            Some(t) => t.add(&s)?,
            None => s,
        });
    }
    match total {
        Some(t) => Ok(t.mul_scalar(coefficient)?),
        None => Ok(Tensor::scalar(0f32)),
    }
}

/// Weights of a sum of named losses that follow the per-modality validation losses: a term
/// whose validation loss is above the others' mean gets more weight (the seed's remedy for one
/// modality lagging), w_i = (L_i / mean L)^strength, rescaled to a mean of 1. Strength 0 keeps
/// them equal.
#[derive(Clone, Debug, PartialEq)]
pub struct AdaptiveWeights {
    names: Vec<String>,
    weights: Vec<f64>,
    strength: f64,
}

impl AdaptiveWeights {
    /// Equal weights over `names`.
    pub fn new(names: &[&str], strength: f64) -> AdaptiveWeights {
        AdaptiveWeights {
            names: names.iter().map(|n| n.to_string()).collect(),
            weights: vec![1.0; names.len()],
            strength,
        }
    }

    /// The current weight of each name.
    pub fn weights(&self) -> Vec<(&str, f64)> {
        self.names
            .iter()
            .map(|n| n.as_str())
            .zip(self.weights.iter().copied())
            .collect()
    }

    /// Re-weights from validation losses, one per name in order.
    pub fn update(&mut self, val_losses: &[f64]) -> Result<()> {
        if val_losses.len() != self.names.len()
            || val_losses.iter().any(|l| !l.is_finite() || *l <= 0.0)
        {
            return Err(Error::Input(format!(
                "AdaptiveWeights::update: {} validation losses {val_losses:?} for {} terms \
                 (need one positive, finite loss per term)",
                val_losses.len(),
                self.names.len()
            )));
        }
        let mean = val_losses.iter().sum::<f64>() / val_losses.len() as f64;
        let raw: Vec<f64> = val_losses
            .iter()
            .map(|l| (l / mean).powf(self.strength))
            .collect();
        let m = raw.iter().sum::<f64>() / raw.len() as f64;
        self.weights = raw.iter().map(|w| w / m).collect();
        Ok(())
    }

    /// `sum_i w_i * losses[i]` (the terms in the order of the names).
    pub fn combine(&self, losses: &[Tensor]) -> Result<Tensor> {
        if losses.len() != self.names.len() {
            return Err(Error::Input(format!(
                "AdaptiveWeights::combine: {} losses for {} terms",
                losses.len(),
                self.names.len()
            )));
        }
        let mut total: Option<Tensor> = None;
        for (l, w) in losses.iter().zip(&self.weights) {
            let t = l.mul_scalar(*w)?;
            total = Some(match total {
                Some(s) => s.add(&t)?,
                None => t,
            });
        }
        total.ok_or_else(|| Error::Input("AdaptiveWeights::combine: no terms".into()))
    }
}
