//! Vision-to-LLM projectors: identity, linear and `mlpNx_gelu`, as MGM and LLaVA build them.

use mgm_tensor::Tensor;
use mgm_tensor::nn::{Activation, Linear, Module, VarStore};

use crate::error::{Result, bad_config, invalid};

const WHAT: &str = "projector";

/// The `mm_projector_type` of an MGM / LLaVA config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProjectorType {
    /// `identity`: features pass unchanged (input width must equal output width).
    Identity,
    /// `linear`: one `Linear(in, out)`.
    Linear,
    /// `mlp{depth}x_gelu`: `Linear(in, out)` then `depth - 1` times (exact GELU,
    /// `Linear(out, out)`).
    Mlp {
        /// Linear layers (2 for `mlp2x_gelu`).
        depth: usize,
    },
}

impl ProjectorType {
    /// Parses `identity`, `linear` or `mlp{N}x_gelu` (N >= 1).
    pub fn parse(name: &str) -> Result<ProjectorType> {
        match name {
            "identity" => return Ok(ProjectorType::Identity),
            "linear" => return Ok(ProjectorType::Linear),
            _ => {}
        }
        name.strip_prefix("mlp")
            .and_then(|r| r.strip_suffix("x_gelu"))
            .and_then(|d| d.parse::<usize>().ok())
            .filter(|&d| d >= 1)
            .map(|depth| ProjectorType::Mlp { depth })
            .ok_or_else(|| {
                bad_config(
                    WHAT,
                    format!(
                        "unknown projector type {name:?} (expected identity, linear or \
                         mlp<N>x_gelu such as mlp2x_gelu)"
                    ),
                )
            })
    }

    fn depth(self) -> usize {
        match self {
            ProjectorType::Identity => 0,
            ProjectorType::Linear => 1,
            ProjectorType::Mlp { depth } => depth,
        }
    }
}

/// A projector: linear layers with an activation between each pair.
#[derive(Clone, Debug)]
pub struct Projector {
    layers: Vec<Linear>,
    activation: Activation,
    in_dim: usize,
    out_dim: usize,
}

impl Projector {
    /// Loads a projector in MGM / LLaVA-1.5's `nn.Sequential` layout: a `linear` projector is
    /// `weight` / `bias` directly under `vs`, an MLP's linear layers are `0`, `2`, `4`, ...
    /// (GELU exact between them).
    ///
    /// ```
    /// use mgm_fusion::{Projector, ProjectorType};
    /// use mgm_tensor::{nn::VarStore, DType, Device, Tensor};
    /// let vs = VarStore::new_trainable(0);
    /// let p = Projector::load(&vs.pp("mm_projector"), ProjectorType::parse("mlp2x_gelu")?, 8, 6)?;
    /// let y = p.forward(&Tensor::ones(&[1, 4, 8], DType::F32, Device::Cpu)?)?;
    /// assert_eq!(y.shape(), &[1, 4, 6]);
    /// # Ok::<(), mgm_fusion::Error>(())
    /// ```
    pub fn load(vs: &VarStore, ty: ProjectorType, in_dim: usize, out_dim: usize) -> Result<Self> {
        if ty == ProjectorType::Identity && in_dim != out_dim {
            return Err(bad_config(
                WHAT,
                format!("an identity projector cannot map width {in_dim} to {out_dim}"),
            ));
        }
        let layers = match ty {
            ProjectorType::Linear => vec![Linear::load(vs, in_dim, out_dim, true)?],
            _ => (0..ty.depth())
                .map(|i| {
                    let from = if i == 0 { in_dim } else { out_dim };
                    Linear::load(&vs.pp(&(2 * i).to_string()), from, out_dim, true)
                })
                .collect::<mgm_tensor::Result<_>>()?,
        };
        Ok(Projector {
            layers,
            activation: Activation::GeluErf,
            in_dim,
            out_dim,
        })
    }

    /// Loads a two-layer MLP whose layers have their own names: `names[0]` (`in_dim ->
    /// hidden`), `activation`, `names[1]` (`hidden -> out_dim`), with biases when `bias`.
    /// transformers' `LlavaMultiModalProjector` is `linear_1`, `linear_2` with `hidden =
    /// out_dim`; MoE experts and modality adapters are `fc1`, `fc2` with exact GELU.
    pub fn load_named(
        vs: &VarStore,
        names: [&str; 2],
        activation: Activation,
        bias: bool,
        dims: [usize; 3],
    ) -> Result<Self> {
        let [in_dim, hidden, out_dim] = dims;
        Ok(Projector {
            layers: vec![
                Linear::load(&vs.pp(names[0]), in_dim, hidden, bias)?,
                Linear::load(&vs.pp(names[1]), hidden, out_dim, bias)?,
            ],
            activation,
            in_dim,
            out_dim,
        })
    }

    /// Input width.
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Projects `[..., in_dim]` features to `[..., out_dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.shape().last() != Some(&self.in_dim) {
            return Err(invalid(
                WHAT,
                format!(
                    "features {:?} do not end in the projector's input width {}",
                    x.shape(),
                    self.in_dim
                ),
            ));
        }
        let mut y = x.clone();
        let last = self.layers.len().saturating_sub(1);
        for (i, l) in self.layers.iter().enumerate() {
            y = if i < last {
                l.forward_fused(&y, self.activation, None)?
            } else {
                l.forward(&y)?
            };
        }
        Ok(y)
    }
}
