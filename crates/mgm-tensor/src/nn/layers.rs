//! The layers shared by every model crate: [`Linear`], [`Embedding`], [`LayerNorm`], [`RmsNorm`]
//! (plain and Gemma's `1 + w`) and [`Conv2d`]. Each holds [`Param`]s, so the same layer serves
//! inference (frozen tensors from a checkpoint) and training (`Var`s read at every forward), and
//! each loads by the checkpoint's own names (`weight`, `bias`) through a [`VarStore`] handle.

use std::sync::Arc;

use crate::autograd::needs_grad;
use crate::nn::{Activation, Init, Param, VarStore};
use crate::{Conv2dParams, DType, Error, Result, Tensor};
use mgm_kernels::gemm::{self, Epilogue, MatMut, MatRef, PackedLhs, PackedRhs, Parallelism};

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
///
/// A frozen f32 layer packs its weight once into the GEMM's panel layout
/// ([`mgm_kernels::gemm::PackedRhs`]), so inference calls pay no packing and no transpose, and
/// [`Linear::forward_fused`] applies bias, activation and a residual add to each output tile
/// while it is in cache. Trainable layers (and other dtypes) run as tensor ops with autograd.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Param,
    bias: Option<Param>,
    packed: Option<Arc<PackedRhs>>,
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
        let packed = match (&weight, &bias) {
            (Param::Frozen(w), None | Some(Param::Frozen(_))) if w.dtype() == DType::F32 => {
                Some(Arc::new(pack_weight(w)?))
            }
            _ => None,
        };
        Ok(Linear {
            weight,
            bias,
            packed,
        })
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

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.weight.shape()[1]
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.weight.shape()[0]
    }

    /// Whether inference runs on the packed weight (frozen f32).
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// The same layer without its packed copy (for a layer whose weight also lives packed in
    /// a fused one): inference then runs as tensor ops.
    pub(crate) fn without_packing(mut self) -> Linear {
        self.packed = None;
        self
    }

    /// `act(x W^T + b) + residual`, with `residual` shaped like the output. A packed layer
    /// computes it in one pass over the output; otherwise it is composed from tensor ops.
    ///
    /// ```
    /// use mgm_tensor::nn::{Activation, Linear};
    /// use mgm_tensor::Tensor;
    /// let w = Tensor::from_vec(vec![1f32, -1., 2., 0.5], &[2, 2])?;
    /// let fc = Linear::new(w, None)?;
    /// let x = Tensor::from_vec(vec![1f32, 1.], &[1, 2])?;
    /// let r = Tensor::from_vec(vec![10f32, 20.], &[1, 2])?;
    /// let y = fc.forward_fused(&x, Activation::Relu, Some(&r))?;
    /// assert_eq!(y.to_vec::<f32>()?, vec![10., 22.5]);
    /// # Ok::<(), mgm_tensor::Error>(())
    /// ```
    pub fn forward_fused(
        &self,
        x: &Tensor,
        act: Activation,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let in_features = self.in_features();
        if x.shape().last() != Some(&in_features) {
            return Err(Error::shape_mismatch(
                "Linear",
                x.shape(),
                &self.weight.shape(),
                format!("input's last dim must be in_features = {in_features}"),
            ));
        }
        let mut out_shape = x.shape().to_vec();
        *out_shape.last_mut().expect("rank >= 1 checked above") = self.out_features();
        if let Some(r) = residual
            && r.shape() != out_shape
        {
            return Err(Error::shape_mismatch(
                "Linear",
                r.shape(),
                &out_shape,
                "the residual must have the output's shape",
            ));
        }
        let plain = |t: &Tensor| t.dtype() == DType::F32 && !needs_grad(&[t]);
        if let Some(packed) = &self.packed
            && plain(x)
            && residual.is_none_or(plain)
        {
            return packed_forward(packed, x, self.bias.as_ref(), act, residual, &out_shape);
        }
        let y = x.matmul(&self.weight.tensor().t()?)?;
        let y = match &self.bias {
            Some(b) => y.add(&b.tensor())?,
            None => y,
        };
        let y = y.activation(act)?;
        match residual {
            Some(r) => y.add(r),
            None => Ok(y),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_fused(x, Activation::Identity, None)
    }
}

/// Packs a frozen `[out, in]` f32 weight as the GEMM's right-hand side `[in, out]`.
fn pack_weight(w: &Tensor) -> Result<PackedRhs> {
    let (out, inp) = (w.shape()[0], w.shape()[1]);
    let l = w.layout();
    let data = w.storage_slice::<f32>()?;
    let rhs = MatRef::new(
        &data[l.offset()..],
        inp,
        out,
        l.strides()[1],
        l.strides()[0],
    )?;
    Ok(PackedRhs::new(rhs))
}

/// The packed inference path: one GEMM over all rows of `x` with the epilogue fused.
fn packed_forward(
    packed: &PackedRhs,
    x: &Tensor,
    bias: Option<&Param>,
    act: Activation,
    residual: Option<&Tensor>,
    out_shape: &[usize],
) -> Result<Tensor> {
    let (k, n) = (packed.k(), packed.n());
    let rows = x.numel() / k.max(1);
    let x = x.contiguous()?;
    let xs = x
        .as_contiguous_slice::<f32>()?
        .expect("contiguous f32 input");
    let lhs = PackedLhs::new(MatRef::row_major(xs, rows, k)?);
    let bias = bias
        .map(|b| b.tensor().to_dtype(DType::F32)?.contiguous())
        .transpose()?;
    let bias_slice = match &bias {
        Some(b) => Some(
            b.as_contiguous_slice::<f32>()?
                .expect("contiguous f32 bias"),
        ),
        None => None,
    };
    let residual = residual.map(Tensor::contiguous).transpose()?;
    let res_view = match &residual {
        Some(r) => Some(MatRef::row_major(
            r.as_contiguous_slice::<f32>()?
                .expect("contiguous f32 residual"),
            rows,
            n,
        )?),
        None => None,
    };
    let epi = Epilogue {
        accumulate: false,
        bias: bias_slice,
        activation: act,
        residual: res_view,
    };
    // the GEMM writes every output element (no accumulate), so the buffer starts unfilled:
    // zeroing a 577 x 4096 output costs about a millisecond
    let mut out: Vec<f32> = Vec::with_capacity(rows * n);
    // SAFETY: the MatMut covers exactly the reserved rows * n elements, which the GEMM
    // overwrites before set_len exposes them (on error the Vec is dropped with length 0).
    unsafe {
        gemm::cpu_packed(
            &lhs,
            packed,
            MatMut::from_raw_parts(out.as_mut_ptr(), rows, n, n),
            &epi,
            Parallelism::Rayon,
        )?;
        out.set_len(rows * n);
    }
    Tensor::from_vec(out, out_shape)
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
