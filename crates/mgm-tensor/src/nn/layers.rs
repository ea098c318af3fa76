//! The layers shared by every model crate: [`Linear`], [`Embedding`], [`LayerNorm`], [`RmsNorm`]
//! (plain and Gemma's `1 + w`) and [`Conv2d`]. Each holds [`Param`]s, so the same layer serves
//! inference (frozen tensors from a checkpoint) and training (`Var`s read at every forward), and
//! each loads by the checkpoint's own names (`weight`, `bias`) through a [`VarStore`] handle.

use std::sync::Arc;

use crate::autograd::needs_grad;
use crate::nn::{Activation, Init, Param, VarStore};
use crate::{Conv2dParams, DType, Error, Result, Tensor};
use mgm_kernels::gemm::{self, Epilogue, MatMut, MatRef, PackedLhs, PackedRhs, Parallelism};
use mgm_kernels::quant::{self, QuantFormat, QuantMatrix};

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
/// The weight is held the way inference wants it:
/// - [`Linear::new`] / [`Linear::load`]: a frozen f32 weight is packed once into the GEMM's
///   panel layout ([`mgm_kernels::gemm::PackedRhs`]), so calls pay no packing or transpose
///   (a copy of the weight; the vision towers' default);
/// - [`Linear::new_mapped`] / [`Linear::load_mapped`]: the checkpoint's `[out, in]` tensor is
///   read in place (no copy of a memory-mapped file): a few rows (decode) run a GEMV over it,
///   more rows pack it per call (language models, whose weights dwarf memory otherwise);
/// - [`Linear::quantize`]: int8 / int4 weights ([`mgm_kernels::quant`]), also loadable in
///   place from a saved quantized checkpoint;
/// - trainable (and non-f32) weights run as tensor ops with autograd.
///
/// [`Linear::forward_fused`] applies bias, activation and a residual add in the same pass.
#[derive(Clone, Debug)]
pub struct Linear {
    kind: Kind,
    bias: Option<Param>,
    in_features: usize,
    out_features: usize,
}

#[derive(Clone, Debug)]
enum Kind {
    Ops(Param),
    Packed(Param, Arc<PackedRhs>),
    Mapped(Tensor),
    Quant(Arc<QuantMatrix>),
}

/// Names of a quantized weight's tensors under a layer's prefix.
const QDATA: &str = "weight.qdata";
const QSCALE: &str = "weight.qscale";

/// A contiguous tensor's bytes, shared with the quantized kernels (no copy of mapped files).
/// Only u8 data and f16 scales are wrapped.
struct TensorBytes(Tensor);

impl TensorBytes {
    fn new(t: Tensor) -> Result<TensorBytes> {
        let t = t.contiguous()?;
        // the conversion in as_ref cannot fail for these dtypes once contiguous
        match t.dtype() {
            DType::U8 | DType::F16 => Ok(TensorBytes(t)),
            d => Err(Error::unsupported_dtype(
                "Linear",
                d,
                "quantized weights are stored as u8 data with f16 scales",
            )),
        }
    }
}

impl AsRef<[u8]> for TensorBytes {
    fn as_ref(&self) -> &[u8] {
        let t = &self.0;
        match t.dtype() {
            DType::U8 => t
                .as_contiguous_slice::<u8>()
                .ok()
                .flatten()
                .unwrap_or_default(),
            _ => bytemuck::cast_slice(
                t.as_contiguous_slice::<half::f16>()
                    .ok()
                    .flatten()
                    .unwrap_or_default(),
            ),
        }
    }
}

fn check_bias(bias: &Option<Param>, out: usize, ws: &[usize]) -> Result<()> {
    if let Some(b) = bias
        && b.shape() != [out]
    {
        return Err(Error::shape_mismatch(
            "Linear",
            ws,
            &b.shape(),
            format!("bias must be [{out}]"),
        ));
    }
    Ok(())
}

fn check_weight(ws: &[usize]) -> Result<()> {
    if ws.len() != 2 {
        return Err(Error::invalid_shape(
            "Linear",
            ws,
            "weight must be [out_features, in_features]",
        ));
    }
    Ok(())
}

impl Linear {
    /// A layer from a `[out, in]` weight and an optional `[out]` bias (a frozen f32 weight is
    /// packed for the GEMM).
    pub fn new(weight: impl Into<Param>, bias: Option<Param>) -> Result<Linear> {
        let weight = weight.into();
        let ws = weight.shape();
        check_weight(&ws)?;
        check_bias(&bias, ws[0], &ws)?;
        let kind = match (&weight, &bias) {
            (Param::Frozen(w), None | Some(Param::Frozen(_))) if w.dtype() == DType::F32 => {
                let packed = Arc::new(pack_weight(w)?);
                Kind::Packed(weight, packed)
            }
            _ => Kind::Ops(weight),
        };
        Ok(Linear {
            kind,
            bias,
            in_features: ws[1],
            out_features: ws[0],
        })
    }

    /// A frozen layer over `weight` `[out, in]` read in place (made contiguous and f32 if it
    /// is not already, which copies).
    pub fn new_mapped(weight: Tensor, bias: Option<Param>) -> Result<Linear> {
        let ws = weight.shape().to_vec();
        check_weight(&ws)?;
        check_bias(&bias, ws[0], &ws)?;
        let w = weight.to_dtype(DType::F32)?.contiguous()?;
        Ok(Linear {
            kind: Kind::Mapped(w),
            bias,
            in_features: ws[1],
            out_features: ws[0],
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
        let bias = Self::load_bias(vs, in_features, out_features, bias)?;
        Linear::new(weight, bias)
    }

    fn load_bias(
        vs: &VarStore,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Option<Param>> {
        if bias {
            Ok(Some(vs.param_or_init(
                "bias",
                &[out_features],
                bias_init(in_features),
            )?))
        } else {
            Ok(None)
        }
    }

    /// Like [`Linear::load`], keeping a frozen weight in place ([`Linear::new_mapped`]), or
    /// loading the quantized weight saved by [`Linear::quantized_tensors`] when the store has
    /// one. A trainable store loads as [`Linear::load`] does.
    pub fn load_mapped(
        vs: &VarStore,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Linear> {
        if vs.is_trainable() {
            return Self::load(vs, in_features, out_features, bias);
        }
        let b = Self::load_bias(vs, in_features, out_features, bias)?;
        if vs.contains(QDATA) {
            let data = vs.get_stored(QDATA)?;
            let scale = vs.get_stored(QSCALE)?;
            let groups = in_features.div_ceil(quant::GROUP);
            // the data's width tells the format: q8 a byte per input, q4 16 per group
            let format = match data.shape() {
                [n, w] if *n == out_features && *w == in_features => QuantFormat::Q8,
                [n, w] if *n == out_features && *w == groups * quant::GROUP / 2 => QuantFormat::Q4,
                s => {
                    return Err(Error::shape_mismatch(
                        "Linear",
                        s,
                        &[out_features, in_features],
                        format!(
                            "{} must be [{out_features}, {in_features}] (q8) or [{out_features}, {}] \
                             (q4) for this layer",
                            vs.full_name(QDATA),
                            groups * quant::GROUP / 2
                        ),
                    ));
                }
            };
            if scale.shape() != [out_features, groups] || scale.dtype() != DType::F16 {
                return Err(Error::shape_mismatch(
                    "Linear",
                    scale.shape(),
                    &[out_features, groups],
                    format!("{} must be f16 [out, ceil(in / 32)]", vs.full_name(QSCALE)),
                ));
            }
            let (n, k) = (out_features, in_features);
            let q = QuantMatrix::from_bytes(
                format,
                n,
                k,
                Arc::new(TensorBytes::new(data)?),
                Arc::new(TensorBytes::new(scale)?),
            )?;
            return Ok(Linear {
                kind: Kind::Quant(Arc::new(q)),
                bias: b,
                in_features,
                out_features,
            });
        }
        let w = vs.get("weight", &[out_features, in_features])?;
        Linear::new_mapped(w, b)
    }

    /// This layer with its weight quantized (a no-op for a layer quantized already; an error
    /// for a trainable one).
    pub fn quantize(&self, format: QuantFormat) -> Result<Linear> {
        let w = match &self.kind {
            Kind::Quant(q) if q.format() == format => return Ok(self.clone()),
            Kind::Quant(_) => {
                return Err(Error::invalid_input(
                    "Linear::quantize",
                    "the layer is quantized to another format already",
                ));
            }
            Kind::Mapped(w) => w.clone(),
            Kind::Packed(p, _) | Kind::Ops(p) => match p {
                Param::Frozen(w) => w.to_dtype(DType::F32)?.contiguous()?,
                Param::Trainable(_) => {
                    return Err(Error::invalid_input(
                        "Linear::quantize",
                        "trainable layers cannot be quantized (freeze them first)",
                    ));
                }
            },
        };
        let ws = w
            .as_contiguous_slice::<f32>()?
            .expect("contiguous f32 weight");
        let q = QuantMatrix::quantize(
            MatRef::row_major(ws, self.out_features, self.in_features)?,
            format,
        )?;
        Ok(Linear {
            kind: Kind::Quant(Arc::new(q)),
            bias: self.bias.clone(),
            in_features: self.in_features,
            out_features: self.out_features,
        })
    }

    /// The tensors to save a quantized layer under `prefix` (`prefix.weight.qdata` u8 and
    /// `prefix.weight.qscale` f32 / f16, plus `prefix.bias`), which [`Linear::load_mapped`]
    /// reads back in place; `None` for a layer that is not quantized.
    pub fn quantized_tensors(&self, prefix: &str) -> Result<Option<Vec<(String, Tensor)>>> {
        let Kind::Quant(q) = &self.kind else {
            return Ok(None);
        };
        let (n, k, g) = (q.n(), q.k(), q.groups());
        let data_shape = match q.format() {
            QuantFormat::Q8 => vec![n, k],
            QuantFormat::Q4 => vec![n, g * quant::GROUP / 2],
        };
        let halves: Vec<half::f16> = q
            .scales()
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]))
            .collect();
        let scale = Tensor::from_vec(halves, &[n, g])?;
        let mut out = vec![
            (
                format!("{prefix}.{QDATA}"),
                Tensor::from_vec(q.data().to_vec(), &data_shape)?,
            ),
            (format!("{prefix}.{QSCALE}"), scale),
        ];
        if let Some(b) = &self.bias {
            out.push((format!("{prefix}.bias"), b.tensor()));
        }
        Ok(Some(out))
    }

    /// The `[out, in]` weight; `None` once quantized.
    pub fn weight(&self) -> Option<Param> {
        match &self.kind {
            Kind::Ops(p) | Kind::Packed(p, _) => Some(p.clone()),
            Kind::Mapped(w) => Some(Param::Frozen(w.clone())),
            Kind::Quant(_) => None,
        }
    }

    /// The quantized weight, if any.
    pub fn quantized(&self) -> Option<&QuantMatrix> {
        match &self.kind {
            Kind::Quant(q) => Some(q),
            _ => None,
        }
    }

    /// The `[out]` bias, if any.
    pub fn bias(&self) -> Option<&Param> {
        self.bias.as_ref()
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Whether inference runs on the packed weight (frozen f32 through [`Linear::new`]).
    pub fn is_packed(&self) -> bool {
        matches!(self.kind, Kind::Packed(..))
    }

    /// Bytes the weight occupies as held (packed, mapped or quantized).
    pub fn weight_bytes(&self) -> usize {
        match &self.kind {
            Kind::Ops(p) => p.tensor().numel() * p.tensor().dtype().size_in_bytes(),
            Kind::Packed(_, p) => p.bytes(),
            Kind::Mapped(w) => w.numel() * 4,
            Kind::Quant(q) => q.bytes(),
        }
    }

    /// The same layer without its packed copy (for a layer whose weight also lives packed in
    /// a fused one): inference then runs as tensor ops.
    pub(crate) fn without_packing(mut self) -> Linear {
        if let Kind::Packed(p, _) = self.kind {
            self.kind = Kind::Ops(p);
        }
        self
    }

    /// `act(x W^T + b) + residual`, with `residual` shaped like the output. Frozen layers
    /// compute it in one pass over the output; trainable ones compose tensor ops.
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
        let in_features = self.in_features;
        if x.shape().last() != Some(&in_features) {
            return Err(Error::shape_mismatch(
                "Linear",
                x.shape(),
                &[self.out_features, in_features],
                format!("input's last dim must be in_features = {in_features}"),
            ));
        }
        let mut out_shape = x.shape().to_vec();
        *out_shape.last_mut().expect("rank >= 1 checked above") = self.out_features;
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
        let fast = plain(x) && residual.is_none_or(plain) && self.bias_frozen();
        let weight = match &self.kind {
            Kind::Packed(_, packed) if fast => {
                return fused_forward(
                    x,
                    self.bias.as_ref(),
                    act,
                    residual,
                    &out_shape,
                    |a, c, e| {
                        gemm::cpu_packed(&PackedLhs::new(a), packed, c, e, Parallelism::Rayon)
                    },
                );
            }
            Kind::Mapped(w) if fast => {
                let ws = w
                    .as_contiguous_slice::<f32>()?
                    .expect("mapped weights are contiguous f32");
                let wm = MatRef::row_major(ws, self.out_features, in_features)?;
                return fused_forward(
                    x,
                    self.bias.as_ref(),
                    act,
                    residual,
                    &out_shape,
                    |a, c, e| gemm::gemm_nt(a, wm, c, e),
                );
            }
            Kind::Quant(q) => {
                if !fast {
                    return Err(Error::invalid_input(
                        "Linear",
                        "a quantized layer takes untracked f32 inputs (inference only)",
                    ));
                }
                return fused_forward(
                    x,
                    self.bias.as_ref(),
                    act,
                    residual,
                    &out_shape,
                    |a, c, e| quant::cpu(a, q, c, e),
                );
            }
            Kind::Mapped(w) => w.clone(),
            Kind::Ops(p) | Kind::Packed(p, _) => p.tensor(),
        };
        let y = x.matmul(&weight.t()?)?;
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

    /// Whether the bias (if any) is frozen, so that the inference kernels may apply it.
    fn bias_frozen(&self) -> bool {
        self.bias
            .as_ref()
            .is_none_or(|b| matches!(b, Param::Frozen(_)))
    }

    /// `act_i(x W_i^T + b_i)` for several layers that read the same `x` (a transformer's q, k
    /// and v projections, or its gate and up): quantized layers quantize `x` once and share
    /// one parallel loop ([`quant::cpu_many`]: a decode step waits on one fork-join instead
    /// of one per layer); any other mix runs layer by layer through
    /// [`Linear::forward_fused`]. The results are the same either way.
    ///
    /// ```
    /// use mgm_tensor::nn::{Activation, Linear};
    /// use mgm_tensor::Tensor;
    /// use mgm_kernels::quant::QuantFormat;
    /// let w = |s: f32| {
    ///     Tensor::from_vec((0..8 * 64).map(|i| ((i % 9) as f32 - s) / 8.0).collect(), &[8, 64])
    /// };
    /// let gate = Linear::new(w(4.0)?, None)?.quantize(QuantFormat::Q4)?;
    /// let up = Linear::new(w(3.0)?, None)?.quantize(QuantFormat::Q4)?;
    /// let x = Tensor::from_vec(vec![0.5f32; 2 * 64], &[2, 64])?;
    /// let pair = [(&gate, Activation::Silu), (&up, Activation::Identity)];
    /// let ys = Linear::forward_many(&x, &pair)?;
    /// assert_eq!(ys[0].to_vec::<f32>()?, gate.forward_fused(&x, Activation::Silu, None)?.to_vec::<f32>()?);
    /// assert_eq!(ys[1].shape(), &[2, 8]);
    /// # Ok::<(), mgm_tensor::Error>(())
    /// ```
    pub fn forward_many(x: &Tensor, layers: &[(&Linear, Activation)]) -> Result<Vec<Tensor>> {
        let k = x.shape().last().copied();
        let plain_input = plain(x);
        let quants: Option<Vec<&QuantMatrix>> = layers
            .iter()
            .map(|(l, _)| match &l.kind {
                Kind::Quant(q) if plain_input && Some(l.in_features) == k && l.bias_frozen() => {
                    Some(&**q)
                }
                _ => None,
            })
            .collect();
        let (Some(quants), Some(k)) = (quants.filter(|q| q.len() > 1), k) else {
            return layers
                .iter()
                .map(|(l, act)| l.forward_fused(x, *act, None))
                .collect();
        };
        let rows = x.numel() / k.max(1);
        let x = x.contiguous()?;
        let xs = x
            .as_contiguous_slice::<f32>()?
            .expect("contiguous f32 input");
        let biases = layers
            .iter()
            .map(|(l, _)| f32_bias(l.bias.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let mut epis = Vec::with_capacity(layers.len());
        for ((_, act), b) in layers.iter().zip(&biases) {
            epis.push(Epilogue {
                accumulate: false,
                bias: bias_slice(b)?,
                activation: *act,
                residual: None,
            });
        }
        let widths: Vec<usize> = quants.iter().map(|q| q.n()).collect();
        let mut outs: Vec<Vec<f32>> = widths
            .iter()
            .map(|&n| Vec::with_capacity(rows * n))
            .collect();
        // SAFETY: as in fused_forward, each MatMut covers exactly its output's reserved
        // rows * n elements, which the kernel overwrites before set_len exposes them (on
        // error the buffers are dropped with length 0).
        unsafe {
            let mut products: Vec<quant::Product<'_>> = quants
                .iter()
                .zip(outs.iter_mut())
                .zip(&epis)
                .map(|((q, o), e)| {
                    (
                        *q,
                        MatMut::from_raw_parts(o.as_mut_ptr(), rows, q.n(), q.n()),
                        e,
                    )
                })
                .collect();
            quant::cpu_many(MatRef::row_major(xs, rows, k)?, &mut products)?;
            for (o, &n) in outs.iter_mut().zip(&widths) {
                o.set_len(rows * n);
            }
        }
        outs.into_iter()
            .zip(&widths)
            .map(|(o, &n)| {
                let mut shape = x.shape().to_vec();
                *shape.last_mut().expect("rank >= 1: it has a last dim") = n;
                Tensor::from_vec(o, &shape)
            })
            .collect()
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

/// An untracked f32 tensor, which the inference kernels take.
fn plain(t: &Tensor) -> bool {
    t.dtype() == DType::F32 && !needs_grad(&[t])
}

/// A bias as a contiguous f32 tensor (the kernels' epilogue reads it as a slice).
fn f32_bias(bias: Option<&Param>) -> Result<Option<Tensor>> {
    bias.map(|b| b.tensor().to_dtype(DType::F32)?.contiguous())
        .transpose()
}

/// The slice of an [`f32_bias`].
fn bias_slice(bias: &Option<Tensor>) -> Result<Option<&[f32]>> {
    Ok(match bias {
        Some(b) => Some(
            b.as_contiguous_slice::<f32>()?
                .expect("f32_bias makes it contiguous f32"),
        ),
        None => None,
    })
}

/// The frozen f32 inference path: `x` as rows, `mul` writes `epilogue(x W^T)` into the
/// output, whatever form the weight takes.
fn fused_forward(
    x: &Tensor,
    bias: Option<&Param>,
    act: Activation,
    residual: Option<&Tensor>,
    out_shape: &[usize],
    mul: impl FnOnce(MatRef<'_>, MatMut<'_>, &Epilogue<'_>) -> mgm_kernels::Result<()>,
) -> Result<Tensor> {
    let k = *x.shape().last().expect("checked by forward_fused");
    let n = *out_shape.last().expect("checked by forward_fused");
    let rows = x.numel() / k.max(1);
    let x = x.contiguous()?;
    let xs = x
        .as_contiguous_slice::<f32>()?
        .expect("contiguous f32 input");
    let bias = f32_bias(bias)?;
    let bias_slice = bias_slice(&bias)?;
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
    // every kernel writes every output element (no accumulate), so the buffer starts unfilled:
    // zeroing a 577 x 4096 output costs about a millisecond
    let mut out: Vec<f32> = Vec::with_capacity(rows * n);
    // SAFETY: the MatMut covers exactly the reserved rows * n elements, which the kernel
    // overwrites before set_len exposes them (on error the Vec is dropped with length 0).
    unsafe {
        mul(
            MatRef::row_major(xs, rows, k)?,
            MatMut::from_raw_parts(out.as_mut_ptr(), rows, n, n),
            &epi,
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

    /// The `[dim]` weight (the offset `w` for Gemma's `1 + w`).
    pub fn weight(&self) -> &Param {
        &self.weight
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
