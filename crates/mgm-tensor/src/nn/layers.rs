//! The layers shared by every model crate: [`Linear`], [`Embedding`], [`LayerNorm`], [`RmsNorm`]
//! (plain and Gemma's `1 + w`) and [`Conv2d`]. Each holds [`Param`]s, so the same layer serves
//! inference (frozen tensors from a checkpoint) and training (`Var`s read at every forward), and
//! each loads by the checkpoint's own names (`weight`, `bias`) through a [`VarStore`] handle.

use rayon::prelude::*;

use crate::autograd::needs_grad;
use crate::nn::{Init, Param, VarStore};
use crate::{Conv2dParams, DType, Error, Result, Tensor};

/// A layer with one input and one output.
pub trait Module {
    /// Applies the layer.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
}

/// PyTorch's default bias init: uniform in `[-1/sqrt(fan_in), 1/sqrt(fan_in))`.
fn bias_init(fan_in: usize) -> Init {
    let bound = if fan_in == 0 {
        0.0
    } else {
        1.0 / (fan_in as f64).sqrt()
    };
    Init::Uniform {
        lo: -bound,
        hi: bound,
    }
}

/// `y = x W^T + b` over the last dim, like `torch.nn.Linear` (weight `[out, in]`).
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Param,
    bias: Option<Param>,
}

impl Linear {
    /// A layer from a `[out, in]` weight and an optional `[out]` bias.
    pub fn new(weight: impl Into<Param>, bias: Option<Param>) -> Result<Linear> {
        let weight = weight.into();
        let ws = weight.shape();
        if ws.len() != 2 {
            return Err(Error::invalid_shape(
                "Linear",
                &ws,
                "weight must be [out_features, in_features]",
            ));
        }
        if let Some(b) = &bias
            && b.shape() != [ws[0]]
        {
            return Err(Error::shape_mismatch(
                "Linear",
                &ws,
                &b.shape(),
                format!("bias must be [{}]", ws[0]),
            ));
        }
        // A frozen weight is kept as a transposed view of a contiguous `[in, out]` copy: gemm
        // multiplies that layout about 40% faster than the checkpoint's `[out, in]` read through
        // a transposed view (203 vs 142 GFLOP/s for CLIP-L's 577 x 1024 x 1024), and only the
        // copy stays resident (the mmapped original is not read again).
        let weight = match weight {
            Param::Frozen(w) if !w.t()?.is_contiguous() => Param::Frozen(w.t()?.contiguous()?.t()?),
            other => other,
        };
        Ok(Linear { weight, bias })
    }

    /// Loads `weight` (and `bias` when `bias` is true) from `vs`; a trainable store creates
    /// missing ones with PyTorch's default init.
    pub fn load(
        vs: &VarStore,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Linear> {
        let weight =
            vs.param_or_init("weight", &[out_features, in_features], Init::KaimingUniform)?;
        let bias = if bias {
            Some(vs.param_or_init("bias", &[out_features], bias_init(in_features))?)
        } else {
            None
        };
        Linear::new(weight, bias)
    }

    /// The `[out, in]` weight.
    pub fn weight(&self) -> &Param {
        &self.weight
    }

    /// The `[out]` bias, if any.
    pub fn bias(&self) -> Option<&Param> {
        self.bias.as_ref()
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.tensor();
        let in_features = w.shape()[1];
        if x.shape().last() != Some(&in_features) {
            return Err(Error::shape_mismatch(
                "Linear",
                x.shape(),
                w.shape(),
                format!("input's last dim must be in_features = {in_features}"),
            ));
        }
        let wt = w.t()?;
        let bias = self.bias.as_ref().map(Param::tensor);
        let frozen = matches!(self.weight, Param::Frozen(_))
            && self
                .bias
                .as_ref()
                .is_none_or(|b| matches!(b, Param::Frozen(_)));
        let fused = frozen
            && x.dtype() == DType::F32
            && wt.dtype() == DType::F32
            && wt.is_contiguous()
            && bias.as_ref().is_none_or(|b| b.dtype() == DType::F32)
            && !needs_grad(&[x]);
        if fused {
            return frozen_f32_forward(x, &wt, bias.as_ref());
        }
        let y = x.matmul(&wt)?;
        match bias {
            Some(b) => y.add(&b),
            None => Ok(y),
        }
    }
}

/// `x W^T + b` for a frozen f32 layer outside autograd: one gemm into rows pre-filled with the
/// bias (gemm accumulates onto them), instead of a matmul and a separate broadcast add.
fn frozen_f32_forward(x: &Tensor, wt: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (k, n) = (wt.shape()[0], wt.shape()[1]);
    let x = x.contiguous()?;
    let rows = x.numel() / k.max(1);
    let xs = x
        .as_contiguous_slice::<f32>()?
        .expect("contiguous f32 input");
    let ws = wt
        .as_contiguous_slice::<f32>()?
        .expect("contiguous f32 weight");
    let mut out = vec![0f32; rows * n];
    let read_dst = match bias {
        Some(b) => {
            let b = b.contiguous()?;
            let bs = b
                .as_contiguous_slice::<f32>()?
                .expect("contiguous f32 bias");
            out.par_chunks_mut(n.max(1))
                .for_each(|r| r.copy_from_slice(bs));
            true
        }
        None => false,
    };
    if rows > 0 && n > 0 && k > 0 {
        let par = if rows * n * k >= 1 << 18 {
            gemm::Parallelism::Rayon(rayon::current_num_threads())
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: `xs` is rows x k, `ws` k x n and `out` rows x n, all contiguous
        // row-major buffers of exactly those sizes owned or borrowed here; gemm reads and
        // writes within them and `out` is not aliased.
        unsafe {
            gemm::gemm(
                rows,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                read_dst,
                xs.as_ptr(),
                1,
                k as isize,
                ws.as_ptr(),
                1,
                n as isize,
                1.0f32,
                1.0f32,
                false,
                false,
                false,
                par,
            );
        }
    }
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("rank checked above") = n;
    Tensor::from_vec(out, &shape)
}

/// A lookup table of `[vocab, dim]` rows, like `torch.nn.Embedding`.
#[derive(Clone, Debug)]
pub struct Embedding {
    weight: Param,
}

impl Embedding {
    /// A layer over a `[vocab, dim]` table.
    pub fn new(weight: impl Into<Param>) -> Result<Embedding> {
        let weight = weight.into();
        if weight.shape().len() != 2 {
            return Err(Error::invalid_shape(
                "Embedding",
                &weight.shape(),
                "weight must be [num_embeddings, embedding_dim]",
            ));
        }
        Ok(Embedding { weight })
    }

    /// Loads `weight` from `vs` (trainable stores draw missing tables from N(0, 1) as PyTorch).
    pub fn load(vs: &VarStore, num_embeddings: usize, dim: usize) -> Result<Embedding> {
        let w = vs.param_or_init(
            "weight",
            &[num_embeddings, dim],
            Init::Normal {
                mean: 0.0,
                std: 1.0,
            },
        )?;
        Embedding::new(w)
    }

    /// The `[vocab, dim]` table (tied output heads read it).
    pub fn weight(&self) -> &Param {
        &self.weight
    }
}

impl Module for Embedding {
    /// `ids` (i64/u32/u8, any shape) to `ids.shape() + [dim]`.
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.weight.tensor().embedding(ids)
    }
}

/// LayerNorm over the last dim with optional affine weight and bias, like `torch.nn.LayerNorm`.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Option<Param>,
    bias: Option<Param>,
    eps: f64,
}

impl LayerNorm {
    /// A layer from optional `[dim]` weight and bias.
    pub fn new(weight: Option<Param>, bias: Option<Param>, eps: f64) -> LayerNorm {
        LayerNorm { weight, bias, eps }
    }

    /// Loads `weight` and `bias` of size `dim` (ones and zeros when a trainable store lacks
    /// them).
    pub fn load(vs: &VarStore, dim: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: Some(vs.param_or_init("weight", &[dim], Init::Ones)?),
            bias: Some(vs.param_or_init("bias", &[dim], Init::Zeros)?),
            eps,
        })
    }

    /// Loads only `weight` (`nn.LayerNorm(bias=False)`).
    pub fn load_no_bias(vs: &VarStore, dim: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: Some(vs.param_or_init("weight", &[dim], Init::Ones)?),
            bias: None,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.as_ref().map(Param::tensor);
        let b = self.bias.as_ref().map(Param::tensor);
        x.layer_norm(w.as_ref(), b.as_ref(), self.eps)
    }
}

/// RMSNorm over the last dim: `x / sqrt(mean(x^2) + eps) * w` (LLaMA), or `* (1 + w)` (Gemma).
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Param,
    eps: f64,
    unit_offset: bool,
}

impl RmsNorm {
    /// A layer from a `[dim]` weight; `unit_offset` selects Gemma's `1 + w` scaling.
    pub fn new(weight: impl Into<Param>, eps: f64, unit_offset: bool) -> Result<RmsNorm> {
        let weight = weight.into();
        if weight.shape().len() != 1 {
            return Err(Error::invalid_shape(
                "RmsNorm",
                &weight.shape(),
                "weight must be [dim]",
            ));
        }
        Ok(RmsNorm {
            weight,
            eps,
            unit_offset,
        })
    }

    /// Loads LLaMA's RMSNorm `weight` (ones when a trainable store lacks it).
    pub fn load(vs: &VarStore, dim: usize, eps: f64) -> Result<RmsNorm> {
        RmsNorm::new(vs.param_or_init("weight", &[dim], Init::Ones)?, eps, false)
    }

    /// Loads Gemma's RMSNorm, which scales by `1 + weight` (zeros when a trainable store lacks
    /// it, so a fresh layer is the identity scaling).
    pub fn load_gemma(vs: &VarStore, dim: usize, eps: f64) -> Result<RmsNorm> {
        RmsNorm::new(vs.param_or_init("weight", &[dim], Init::Zeros)?, eps, true)
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.tensor();
        if !self.unit_offset {
            return x.rms_norm(Some(&w), self.eps);
        }
        // Gemma computes 1 + w in f32 (transformers upcasts before adding): rounding w + 1 to
        // bf16 first would lose the low bits of w. f16/bf16 inputs compute in f32, so an f32
        // scale feeds the fused kernel directly.
        let compute = if x.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let scale = w.to_dtype(compute)?.add_scalar(1.0)?;
        x.rms_norm(Some(&scale), self.eps)
    }
}

/// A 2-D convolution over `[N, C, H, W]`, like `torch.nn.Conv2d` (weight
/// `[out, in / groups, kh, kw]`).
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Param,
    bias: Option<Param>,
    params: Conv2dParams,
}

impl Conv2d {
    /// A layer from its weight, optional `[out]` bias and stride/padding/dilation/groups.
    pub fn new(
        weight: impl Into<Param>,
        bias: Option<Param>,
        params: Conv2dParams,
    ) -> Result<Conv2d> {
        let weight = weight.into();
        let ws = weight.shape();
        if ws.len() != 4 {
            return Err(Error::invalid_shape(
                "Conv2d",
                &ws,
                "weight must be [out_channels, in_channels / groups, kh, kw]",
            ));
        }
        if let Some(b) = &bias
            && b.shape() != [ws[0]]
        {
            return Err(Error::shape_mismatch(
                "Conv2d",
                &ws,
                &b.shape(),
                format!("bias must be [{}]", ws[0]),
            ));
        }
        Ok(Conv2d {
            weight,
            bias,
            params,
        })
    }

    /// Loads `weight` `[out, in / groups, kh, kw]` and optionally `bias` from `vs`.
    pub fn load(
        vs: &VarStore,
        in_channels: usize,
        out_channels: usize,
        kernel: (usize, usize),
        params: Conv2dParams,
        bias: bool,
    ) -> Result<Conv2d> {
        let groups = params.groups.max(1);
        if !in_channels.is_multiple_of(groups) || !out_channels.is_multiple_of(groups) {
            return Err(Error::invalid_shape(
                "Conv2d",
                &[out_channels, in_channels],
                format!("channels must be multiples of groups = {groups}"),
            ));
        }
        let cin = in_channels / groups;
        let shape = [out_channels, cin, kernel.0, kernel.1];
        let weight = vs.param_or_init("weight", &shape, Init::KaimingUniform)?;
        let bias = if bias {
            let fan_in = cin * kernel.0 * kernel.1;
            Some(vs.param_or_init("bias", &[out_channels], bias_init(fan_in))?)
        } else {
            None
        };
        Conv2d::new(weight, bias, params)
    }

    /// The stride, padding, dilation and groups.
    pub fn params(&self) -> Conv2dParams {
        self.params
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let b = self.bias.as_ref().map(Param::tensor);
        x.conv2d(&self.weight.tensor(), b.as_ref(), self.params)
    }
}
