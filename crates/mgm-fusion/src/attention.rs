//! Cross-modal attention blocks of the seed design: attention with a temperature, a gate with
//! a residual ratio, and multi-scale cross-attention from visual queries to text.

use mgm_tensor::nn::{Init, MultiHeadAttention, Param, ProjNames, VarStore};
use mgm_tensor::{DType, Device, Tensor};

use crate::error::{Result, bad_config, invalid};

/// Multi-head attention of one modality's queries over another's keys and values, with the
/// scores divided by a temperature: `softmax(q k^T / (sqrt(d) t)) v` (t < 1 sharpens).
#[derive(Clone, Debug)]
pub struct CrossModalAttention {
    attn: MultiHeadAttention,
    temperature: f64,
}

impl CrossModalAttention {
    /// Loads `q_proj`, `k_proj`, `v_proj`, `out_proj` (`dim -> dim`, with bias) under `vs`.
    ///
    /// ```
    /// use mgm_fusion::CrossModalAttention;
    /// use mgm_tensor::{nn::VarStore, DType, Device, Tensor};
    /// let xattn = CrossModalAttention::load(&VarStore::new_trainable(0), 8, 2, 0.5)?;
    /// let image = Tensor::randn(0, &[1, 5, 8], 0.0, 1.0, DType::F32, Device::Cpu)?;
    /// let text = Tensor::randn(1, &[1, 3, 8], 0.0, 1.0, DType::F32, Device::Cpu)?;
    /// assert_eq!(xattn.forward(&image, &text, None)?.shape(), &[1, 5, 8]);
    /// # Ok::<(), mgm_fusion::Error>(())
    /// ```
    pub fn load(vs: &VarStore, dim: usize, num_heads: usize, temperature: f64) -> Result<Self> {
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(bad_config(
                "cross-modal attention",
                format!("temperature must be positive and finite, got {temperature}"),
            ));
        }
        let attn = MultiHeadAttention::load(vs, dim, num_heads, ProjNames::CLIP, true)?;
        let scale = 1.0 / ((attn.head_dim() as f64).sqrt() * temperature);
        Ok(CrossModalAttention {
            attn: attn.with_scale(scale),
            temperature,
        })
    }

    /// The temperature.
    pub fn temperature(&self) -> f64 {
        self.temperature
    }

    /// Queries `xq` `[B, Tq, dim]` over `xkv` `[B, Tk, dim]`; `mask` broadcastable to `[B, H,
    /// Tq, Tk]` (u8: nonzero = attend). Returns `[B, Tq, dim]`.
    pub fn forward(&self, xq: &Tensor, xkv: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        Ok(self.attn.attend(xq, xkv, mask)?)
    }
}

/// How a [`Gate`] weighs the branch it admits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GateKind {
    /// A constant factor `g`.
    Fixed(f64),
    /// One learned scalar `a`, factor `tanh(a)` (starts at 0: the branch is off at first, as
    /// Flamingo's gated cross-attention).
    Scalar,
    /// One learned `a` per channel, factor `tanh(a)`.
    Vector,
}

/// `out = r x + g * y`: a residual `x` kept with ratio `r` plus a gated branch `y`.
#[derive(Clone, Debug)]
pub struct Gate {
    kind: GateKind,
    param: Option<Param>,
    residual_ratio: f64,
}

impl Gate {
    /// A gate over `dim` channels; a learned one loads (or creates, zero) `gate` under `vs`.
    pub fn load(vs: &VarStore, kind: GateKind, dim: usize, residual_ratio: f64) -> Result<Self> {
        let param = match kind {
            GateKind::Fixed(g) if !g.is_finite() => {
                return Err(bad_config("gate", format!("fixed gate {g} is not finite")));
            }
            GateKind::Fixed(_) => None,
            GateKind::Scalar => Some(vs.param_or_init("gate", &[1], Init::Zeros)?),
            GateKind::Vector => Some(vs.param_or_init("gate", &[dim], Init::Zeros)?),
        };
        Ok(Gate {
            kind,
            param,
            residual_ratio,
        })
    }

    /// The factor on the branch now (`g`, or `tanh(a)` per channel).
    pub fn factor(&self) -> Result<Tensor> {
        Ok(match (&self.kind, &self.param) {
            (GateKind::Fixed(g), _) => Tensor::full(*g, &[1], DType::F32, Device::Cpu)?,
            (_, Some(p)) => p.tensor().tanh()?,
            _ => unreachable!("learned gates hold their parameter"),
        })
    }

    /// `r x + factor * y` (`x`, `y` of one shape, channels last).
    pub fn forward(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        if x.shape() != y.shape() {
            return Err(invalid(
                "gate",
                format!("residual {:?} and branch {:?} differ", x.shape(), y.shape()),
            ));
        }
        let g = self.factor()?.to_dtype(y.dtype())?;
        Ok(x.mul_scalar(self.residual_ratio)?.add(&y.mul(&g)?)?)
    }
}

/// Multi-scale cross-attention: the visual tokens of every scale attend to the text (one
/// [`CrossModalAttention`] per scale, `scale{i}` under the prefix) and each scale's result is
/// concatenated with its input on channels: `[B, T_s, dim]` -> `[B, T_s, 2 dim]`.
#[derive(Clone, Debug)]
pub struct MultiScaleCrossAttention {
    scales: Vec<CrossModalAttention>,
}

impl MultiScaleCrossAttention {
    /// `scales` attention blocks of `dim` channels and `num_heads` heads.
    pub fn load(
        vs: &VarStore,
        scales: usize,
        dim: usize,
        num_heads: usize,
        temperature: f64,
    ) -> Result<Self> {
        Ok(MultiScaleCrossAttention {
            scales: (0..scales)
                .map(|i| {
                    CrossModalAttention::load(
                        &vs.pp(&format!("scale{i}")),
                        dim,
                        num_heads,
                        temperature,
                    )
                })
                .collect::<Result<_>>()?,
        })
    }

    /// One `[B, T_s, dim]` tensor per scale attends to `text` `[B, L, dim]` (`mask` over the
    /// text broadcastable to `[B, H, T_s, L]`).
    pub fn forward(
        &self,
        visual: &[Tensor],
        text: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Vec<Tensor>> {
        if visual.len() != self.scales.len() {
            return Err(invalid(
                "multi-scale cross-attention",
                format!(
                    "{} visual scales for {} attention blocks",
                    visual.len(),
                    self.scales.len()
                ),
            ));
        }
        visual
            .iter()
            .zip(&self.scales)
            .map(|(v, a)| Ok(Tensor::cat(&[v.clone(), a.forward(v, text, mask)?], -1)?))
            .collect()
    }
}
