//! Elementwise unary math with derivatives (PyTorch semantics, DESIGN.md section 3).

use rayon::prelude::*;

use crate::autograd::{Backward, attach};
use crate::tensor::with_float;
use crate::{Error, Float, Result, Tensor};

/// Elements per rayon task for elementwise loops; below twice this, loops run on one thread.
pub(crate) const PAR_CHUNK: usize = 1 << 14;

/// An elementwise unary function. Parameters (exponents, affine coefficients) are in the variant.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unary {
    /// e^x
    Exp,
    /// natural log
    Log,
    /// square root
    Sqrt,
    /// 1 / sqrt(x)
    Rsqrt,
    /// hyperbolic tangent
    Tanh,
    /// 1 / (1 + e^-x)
    Sigmoid,
    /// max(x, 0)
    Relu,
    /// x * sigmoid(x)
    Silu,
    /// 0.5 x (1 + erf(x / sqrt 2))
    Gelu,
    /// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    GeluTanh,
    /// x * sigmoid(1.702 x) (CLIP)
    QuickGelu,
    /// -x
    Neg,
    /// |x|
    Abs,
    /// x^2
    Sqr,
    /// 1 / x
    Recip,
    /// sin x
    Sin,
    /// cos x
    Cos,
    /// x^e
    Powf(f64),
    /// a x + b
    Affine(f64, f64),
    /// min(max(x, lo), hi)
    Clamp(f64, f64),
}

impl Unary {
    fn name(self) -> &'static str {
        match self {
            Unary::Exp => "exp",
            Unary::Log => "log",
            Unary::Sqrt => "sqrt",
            Unary::Rsqrt => "rsqrt",
            Unary::Tanh => "tanh",
            Unary::Sigmoid => "sigmoid",
            Unary::Relu => "relu",
            Unary::Silu => "silu",
            Unary::Gelu => "gelu",
            Unary::GeluTanh => "gelu_tanh",
            Unary::QuickGelu => "quick_gelu",
            Unary::Neg => "neg",
            Unary::Abs => "abs",
            Unary::Sqr => "sqr",
            Unary::Recip => "recip",
            Unary::Sin => "sin",
            Unary::Cos => "cos",
            Unary::Powf(_) => "powf",
            Unary::Affine(..) => "affine",
            Unary::Clamp(..) => "clamp",
        }
    }
}

fn sigmoid<F: Float>(x: F) -> F {
    // split by sign so exp never overflows
    if x >= F::zero() {
        F::one() / (F::one() + (-x).exp())
    } else {
        let e = x.exp();
        e / (F::one() + e)
    }
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;

fn map<F: Float>(v: &[F], f: impl Fn(F) -> F + Sync + Send) -> Vec<F> {
    if v.len() >= 2 * PAR_CHUNK {
        let mut out = vec![F::zero(); v.len()];
        out.par_chunks_mut(PAR_CHUNK)
            .zip(v.par_chunks(PAR_CHUNK))
            .for_each(|(o, i)| {
                for (o, &x) in o.iter_mut().zip(i) {
                    *o = f(x);
                }
            });
        out
    } else {
        v.iter().map(|&x| f(x)).collect()
    }
}

/// Applies `op` to every element.
pub(crate) fn forward<F: Float>(op: Unary, v: &[F]) -> Vec<F> {
    let c = F::c;
    match op {
        Unary::Exp => map(v, |x| x.exp()),
        Unary::Log => map(v, |x| x.ln()),
        Unary::Sqrt => map(v, |x| x.sqrt()),
        Unary::Rsqrt => map(v, |x| F::one() / x.sqrt()),
        Unary::Tanh => map(v, |x| x.tanh()),
        Unary::Sigmoid => map(v, sigmoid),
        Unary::Relu => map(v, |x| if x > F::zero() { x } else { F::zero() }),
        Unary::Silu => map(v, |x| x * sigmoid(x)),
        Unary::Gelu => map(v, |x| {
            c(0.5) * x * (F::one() + (x * c(FRAC_1_SQRT_2)).erf())
        }),
        Unary::GeluTanh => map(v, |x| {
            c(0.5) * x * (F::one() + (c(SQRT_2_OVER_PI) * (x + c(0.044715) * x * x * x)).tanh())
        }),
        Unary::QuickGelu => map(v, |x| x * sigmoid(c(1.702) * x)),
        Unary::Neg => map(v, |x| -x),
        Unary::Abs => map(v, |x| x.abs()),
        Unary::Sqr => map(v, |x| x * x),
        Unary::Recip => map(v, |x| F::one() / x),
        Unary::Sin => map(v, |x| x.sin()),
        Unary::Cos => map(v, |x| x.cos()),
        Unary::Powf(e) => {
            let e = c(e);
            map(v, move |x| x.powf(e))
        }
        Unary::Affine(a, b) => {
            let (a, b) = (c(a), c(b));
            map(v, move |x| x * a + b)
        }
        Unary::Clamp(lo, hi) => {
            let (lo, hi) = (c(lo), c(hi));
            // NaN propagates, as in torch.clamp
            map(v, move |x| {
                if x < lo {
                    lo
                } else if x > hi {
                    hi
                } else {
                    x
                }
            })
        }
    }
}

/// d op(x) / dx at every element.
fn derivative<F: Float>(op: Unary, v: &[F]) -> Vec<F> {
    let c = F::c;
    let one = F::one();
    let zero = F::zero();
    match op {
        Unary::Exp => map(v, |x| x.exp()),
        Unary::Log => map(v, |x| one / x),
        Unary::Sqrt => map(v, |x| c(0.5) / x.sqrt()),
        Unary::Rsqrt => map(v, |x| c(-0.5) / (x * x.sqrt())),
        Unary::Tanh => map(v, |x| {
            let t = x.tanh();
            one - t * t
        }),
        Unary::Sigmoid => map(v, |x| {
            let s = sigmoid(x);
            s * (one - s)
        }),
        Unary::Relu => map(v, |x| if x > zero { one } else { zero }),
        Unary::Silu => map(v, |x| {
            let s = sigmoid(x);
            s * (one + x * (one - s))
        }),
        Unary::Gelu => map(v, |x| {
            let cdf = c(0.5) * (one + (x * c(FRAC_1_SQRT_2)).erf());
            let pdf = (c(-0.5) * x * x).exp() * c(0.398_942_280_401_432_7);
            cdf + x * pdf
        }),
        Unary::GeluTanh => map(v, |x| {
            let inner = c(SQRT_2_OVER_PI) * (x + c(0.044715) * x * x * x);
            let t = inner.tanh();
            let dinner = c(SQRT_2_OVER_PI) * (one + c(3.0 * 0.044715) * x * x);
            c(0.5) * (one + t) + c(0.5) * x * (one - t * t) * dinner
        }),
        Unary::QuickGelu => map(v, |x| {
            let s = sigmoid(c(1.702) * x);
            s + c(1.702) * x * s * (one - s)
        }),
        Unary::Neg => map(v, |_| -one),
        Unary::Abs => map(v, |x| {
            if x > zero {
                one
            } else if x < zero {
                -one
            } else {
                zero
            }
        }),
        Unary::Sqr => map(v, |x| c(2.0) * x),
        Unary::Recip => map(v, |x| -one / (x * x)),
        Unary::Sin => map(v, |x| x.cos()),
        Unary::Cos => map(v, |x| -x.sin()),
        Unary::Powf(e) => {
            let ef = c(e);
            let em1 = c(e - 1.0);
            map(v, move |x| ef * x.powf(em1))
        }
        Unary::Affine(a, _) => {
            let a = c(a);
            map(v, move |_| a)
        }
        Unary::Clamp(lo, hi) => {
            let (lo, hi) = (c(lo), c(hi));
            map(v, move |x| if x >= lo && x <= hi { one } else { zero })
        }
    }
}

struct UnaryBackward {
    op: Unary,
    input: Tensor,
}

impl Backward for UnaryBackward {
    fn name(&self) -> &'static str {
        self.op.name()
    }
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.input]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let x = &self.input;
        let d = with_float!(x.float_data(self.op.name())?, v => {
            Tensor::from_float_vec(derivative(self.op, &v), x.shape(), x.dtype())?
        });
        Ok(vec![Some(g.mul(&d)?)])
    }
}

impl Tensor {
    /// Applies an elementwise [`Unary`] function (float dtypes; f16/bf16 compute in f32).
    pub fn unary(&self, op: Unary) -> Result<Tensor> {
        if !self.dtype().is_float() {
            // neg/abs/relu/sqr make sense on integers too; compute exactly in f64 for them
            if matches!(
                op,
                Unary::Neg | Unary::Abs | Unary::Relu | Unary::Sqr | Unary::Clamp(..)
            ) {
                let v: Vec<f64> = forward(op, &self.to_vec_f64()?);
                return Tensor::from_vec(v, self.shape())?.to_dtype(self.dtype());
            }
            return Err(Error::unsupported_dtype(
                op.name(),
                self.dtype(),
                "a float dtype is needed",
            ));
        }
        let out = with_float!(self.float_data(op.name())?, v => {
            Tensor::from_float_vec(forward(op, &v), self.shape(), self.dtype())?
        });
        Ok(attach(out, || UnaryBackward {
            op,
            input: self.clone(),
        }))
    }

    /// e^x
    pub fn exp(&self) -> Result<Tensor> {
        self.unary(Unary::Exp)
    }
    /// Natural logarithm.
    pub fn log(&self) -> Result<Tensor> {
        self.unary(Unary::Log)
    }
    /// Square root.
    pub fn sqrt(&self) -> Result<Tensor> {
        self.unary(Unary::Sqrt)
    }
    /// 1 / sqrt(x).
    pub fn rsqrt(&self) -> Result<Tensor> {
        self.unary(Unary::Rsqrt)
    }
    /// Hyperbolic tangent.
    pub fn tanh(&self) -> Result<Tensor> {
        self.unary(Unary::Tanh)
    }
    /// Logistic sigmoid.
    pub fn sigmoid(&self) -> Result<Tensor> {
        self.unary(Unary::Sigmoid)
    }
    /// max(x, 0).
    pub fn relu(&self) -> Result<Tensor> {
        self.unary(Unary::Relu)
    }
    /// x * sigmoid(x) (SiLU / swish).
    pub fn silu(&self) -> Result<Tensor> {
        self.unary(Unary::Silu)
    }
    /// Exact GELU with erf.
    pub fn gelu(&self) -> Result<Tensor> {
        self.unary(Unary::Gelu)
    }
    /// GELU, tanh approximation (PyTorch `approximate="tanh"`).
    pub fn gelu_tanh(&self) -> Result<Tensor> {
        self.unary(Unary::GeluTanh)
    }
    /// x * sigmoid(1.702 x), CLIP's activation.
    pub fn quick_gelu(&self) -> Result<Tensor> {
        self.unary(Unary::QuickGelu)
    }
    /// One of the [`Activation`](crate::nn::Activation)s that layers fuse into their output.
    pub fn activation(&self, act: crate::nn::Activation) -> Result<Tensor> {
        use crate::nn::Activation as A;
        match act {
            A::Identity => Ok(self.clone()),
            A::GeluErf => self.gelu(),
            A::GeluTanh => self.gelu_tanh(),
            A::QuickGelu => self.quick_gelu(),
            A::Silu => self.silu(),
            A::Relu => self.relu(),
        }
    }
    /// -x.
    pub fn neg(&self) -> Result<Tensor> {
        self.unary(Unary::Neg)
    }
    /// |x|.
    pub fn abs(&self) -> Result<Tensor> {
        self.unary(Unary::Abs)
    }
    /// x^2.
    pub fn sqr(&self) -> Result<Tensor> {
        self.unary(Unary::Sqr)
    }
    /// 1 / x.
    pub fn recip(&self) -> Result<Tensor> {
        self.unary(Unary::Recip)
    }
    /// sin x.
    pub fn sin(&self) -> Result<Tensor> {
        self.unary(Unary::Sin)
    }
    /// cos x.
    pub fn cos(&self) -> Result<Tensor> {
        self.unary(Unary::Cos)
    }
    /// x^e for a scalar exponent.
    pub fn powf(&self, e: f64) -> Result<Tensor> {
        self.unary(Unary::Powf(e))
    }
    /// a x + b.
    pub fn affine(&self, a: f64, b: f64) -> Result<Tensor> {
        self.unary(Unary::Affine(a, b))
    }
    /// x * s.
    pub fn mul_scalar(&self, s: f64) -> Result<Tensor> {
        self.unary(Unary::Affine(s, 0.0))
    }
    /// x + s.
    pub fn add_scalar(&self, s: f64) -> Result<Tensor> {
        self.unary(Unary::Affine(1.0, s))
    }
    /// Clamps into `[lo, hi]`.
    pub fn clamp(&self, lo: f64, hi: f64) -> Result<Tensor> {
        self.unary(Unary::Clamp(lo, hi))
    }
}
