//! LayerNorm and RMSNorm over the last dim, with fused forward and backward kernels.
//!
//! Each row is read from memory once: the statistics passes and the output pass run while the
//! row sits in L1. Statistics accumulate in f64 (two-pass variance, never E[x^2] - mean^2), and
//! the normalisation itself is done in f64 before rounding, so f32 outputs stay within about one
//! ulp of an f64 reference even for rows with a large mean.

use rayon::prelude::*;

use crate::autograd::{Backward, attach};
use crate::ops::softmax::{
    Elem, PAR_ELEMS, has_avx2, rows_per_task, simd_call, simd_variant, sum_f64,
};
use crate::tensor::FloatData;
use crate::{DType, Error, Result, Tensor};

/// Which normalisation a kernel runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// (x - mean) / sqrt(var + eps)
    Layer,
    /// x / sqrt(mean(x^2) + eps)
    Rms,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Layer => "layer_norm",
            Kind::Rms => "rms_norm",
        }
    }
}

/// Sum of (x - mean)^2 in f64 (the second pass of a two-pass variance).
#[inline(always)]
pub(crate) fn sq_dev_f64<F: crate::Float>(x: &[F], mean: f64) -> f64 {
    const L: usize = crate::ops::softmax::LANES;
    let mut acc = [0f64; L];
    let mut it = x.chunks_exact(L);
    for c in &mut it {
        for i in 0..L {
            let d = c[i].to_f64() - mean;
            acc[i] += d * d;
        }
    }
    let mut s = 0f64;
    for &v in it.remainder() {
        let d = v.to_f64() - mean;
        s += d * d;
    }
    s + acc.iter().sum::<f64>()
}

/// Sum of g * (x - mean) in f64.
#[inline(always)]
fn dot_dev_f64<F: Elem>(g: &[F], x: &[F], mean: f64) -> f64 {
    const L: usize = crate::ops::softmax::LANES;
    let mut acc = [0f64; L];
    let mut ig = g.chunks_exact(L);
    let mut ix = x.chunks_exact(L);
    for (cg, cx) in (&mut ig).zip(&mut ix) {
        for i in 0..L {
            acc[i] += cg[i].to_f64() * (cx[i].to_f64() - mean);
        }
    }
    let mut s = 0f64;
    for (&g, &v) in ig.remainder().iter().zip(ix.remainder()) {
        s += g.to_f64() * (v.to_f64() - mean);
    }
    s + acc.iter().sum::<f64>()
}

/// What a norm kernel needs besides the data: the optional affine parameters (`[n]` each),
/// the row length, eps, and whether it is RMSNorm (no mean subtraction, no bias).
struct Params<'a, F> {
    w: Option<&'a [F]>,
    b: Option<&'a [F]>,
    n: usize,
    eps: f64,
    rms: bool,
}

impl<F> Clone for Params<'_, F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<F> Copy for Params<'_, F> {}

/// Normalises each row of `n` elements; writes `(mean, rstd)` per row to `stats`
/// (mean is 0 for RMSNorm).
#[inline(always)]
fn norm_rows<F: Elem>(x: &[F], out: &mut [F], stats: &mut [(f64, f64)], p: Params<'_, F>) {
    let Params { w, b, n, eps, rms } = p;
    for ((x, out), st) in x
        .chunks_exact(n)
        .zip(out.chunks_exact_mut(n))
        .zip(stats.iter_mut())
    {
        let (mean, var) = if rms {
            (0.0, sq_dev_f64(x, 0.0) / n as f64)
        } else {
            let mean = sum_f64(x) / n as f64;
            (mean, sq_dev_f64(x, mean) / n as f64)
        };
        let rstd = 1.0 / (var + eps).sqrt();
        *st = (mean, rstd);
        let xhat = |v: F| F::c((v.to_f64() - mean) * rstd);
        match (w, b) {
            (Some(w), Some(b)) => {
                for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
                    *o = xhat(v) * w + b;
                }
            }
            (Some(w), None) => {
                for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
                    *o = xhat(v) * w;
                }
            }
            (None, Some(b)) => {
                for ((o, &v), &b) in out.iter_mut().zip(x).zip(b) {
                    *o = xhat(v) + b;
                }
            }
            (None, None) => {
                for (o, &v) in out.iter_mut().zip(x) {
                    *o = xhat(v);
                }
            }
        }
    }
}
simd_variant!(norm_rows_avx2 = norm_rows(x: &[F], out: &mut [F], stats: &mut [(f64, f64)], p: Params<'_, F>));

/// The normalised rows and the per-row `(mean, rstd)`.
fn norm_forward<F: Elem>(
    x: &[F],
    w: Option<&[F]>,
    b: Option<&[F]>,
    n: usize,
    eps: f64,
    kind: Kind,
) -> (Vec<F>, Vec<(f64, f64)>) {
    let rows = x.len().checked_div(n).unwrap_or(0);
    let mut out = vec![F::zero(); x.len()];
    let mut stats = vec![(0f64, 0f64); rows];
    if rows == 0 {
        return (out, stats);
    }
    let simd = has_avx2();
    let p = Params {
        w,
        b,
        n,
        eps,
        rms: kind == Kind::Rms,
    };
    #[allow(clippy::type_complexity)] // the item type of a rayon zip chain
    let f = |((o, st), x): ((&mut [F], &mut [(f64, f64)]), &[F])| {
        simd_call!(simd, norm_rows_avx2, norm_rows(x, o, st, p))
    };
    if x.len() >= 2 * PAR_ELEMS && rows > 1 {
        let rpt = rows_per_task(n);
        out.par_chunks_mut(rpt * n)
            .zip(stats.par_chunks_mut(rpt))
            .zip(x.par_chunks(rpt * n))
            .for_each(f);
    } else {
        f(((&mut out, &mut stats), x));
    }
    (out, stats)
}

/// Backward of a block of rows: writes dx and adds this block's dweight / dbias terms into
/// `dw` / `db` (f64, one entry per column).
#[inline(always)]
fn norm_bwd_rows<F: Elem>(
    x: &[F],
    g: &[F],
    dx: &mut [F],
    stats: &[(f64, f64)],
    dwb: (&mut [f64], &mut [f64]),
    p: Params<'_, F>,
) {
    let Params { w, n, rms, .. } = p;
    let (dw, db) = dwb;
    let nf = n as f64;
    let mut gy: Vec<f64> = vec![0.0; if w.is_some() { n } else { 0 }];
    for (((x, g), dx), &(mean, rstd)) in x
        .chunks_exact(n)
        .zip(g.chunks_exact(n))
        .zip(dx.chunks_exact_mut(n))
        .zip(stats)
    {
        // gy = g * w; the two row means the formula needs (f64)
        let (sum_gy, sum_gy_xhat) = match w {
            Some(w) => {
                for ((o, &g), &w) in gy.iter_mut().zip(g).zip(w) {
                    *o = g.to_f64() * w.to_f64();
                }
                let mut s = 0f64;
                let mut sx = 0f64;
                for (&gy, &v) in gy.iter().zip(x) {
                    s += gy;
                    sx += gy * (v.to_f64() - mean);
                }
                (s, sx * rstd)
            }
            None => (sum_f64(g), dot_dev_f64(g, x, mean) * rstd),
        };
        let a = if rms { 0.0 } else { sum_gy / nf };
        let c = sum_gy_xhat / nf;
        match w {
            Some(_) => {
                for ((d, &gy), &v) in dx.iter_mut().zip(&gy).zip(x) {
                    let xhat = (v.to_f64() - mean) * rstd;
                    *d = F::c(rstd * (gy - a - xhat * c));
                }
            }
            None => {
                for ((d, &g), &v) in dx.iter_mut().zip(g).zip(x) {
                    let xhat = (v.to_f64() - mean) * rstd;
                    *d = F::c(rstd * (g.to_f64() - a - xhat * c));
                }
            }
        }
        for ((dw, db), (&g, &v)) in dw.iter_mut().zip(db.iter_mut()).zip(g.iter().zip(x)) {
            let g = g.to_f64();
            *dw += g * (v.to_f64() - mean) * rstd;
            *db += g;
        }
    }
}
simd_variant!(norm_bwd_rows_avx2 = norm_bwd_rows(x: &[F], g: &[F], dx: &mut [F], stats: &[(f64, f64)], dwb: (&mut [f64], &mut [f64]), p: Params<'_, F>));

/// dx and the f64 sums for dweight and dbias over all rows.
fn norm_backward<F: Elem>(
    x: &[F],
    g: &[F],
    w: Option<&[F]>,
    stats: &[(f64, f64)],
    n: usize,
    kind: Kind,
) -> (Vec<F>, Vec<f64>, Vec<f64>) {
    let mut dx = vec![F::zero(); x.len()];
    let rows = stats.len();
    if rows == 0 || n == 0 {
        return (dx, vec![0.0; n], vec![0.0; n]);
    }
    let simd = has_avx2();
    let p = Params {
        w,
        b: None,
        n,
        eps: 0.0,
        rms: kind == Kind::Rms,
    };
    let run = |dx: &mut [F], x: &[F], g: &[F], st: &[(f64, f64)]| {
        let (mut dw, mut db) = (vec![0f64; n], vec![0f64; n]);
        simd_call!(
            simd,
            norm_bwd_rows_avx2,
            norm_bwd_rows(x, g, dx, st, (&mut dw, &mut db), p)
        );
        (dw, db)
    };
    if x.len() >= 2 * PAR_ELEMS && rows > 1 {
        // a few tasks per thread: each holds its own dweight/dbias partials
        let tasks = rayon::current_num_threads() * 4;
        let rpt = rows.div_ceil(tasks).max(1);
        let parts: Vec<(Vec<f64>, Vec<f64>)> = dx
            .par_chunks_mut(rpt * n)
            .zip(x.par_chunks(rpt * n))
            .zip(g.par_chunks(rpt * n))
            .zip(stats.par_chunks(rpt))
            .map(|(((dx, x), g), st)| run(dx, x, g, st))
            .collect();
        let (mut dw, mut db) = (vec![0f64; n], vec![0f64; n]);
        for (pw, pb) in parts {
            dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
        (dx, dw, db)
    } else {
        let (dw, db) = run(&mut dx, x, g, stats);
        (dx, dw, db)
    }
}

/// Checks an affine parameter: shape `[n]`, same device as the input, and the input's dtype or,
/// for f16/bf16 inputs, f32 (mixed precision keeps norm parameters in f32; the kernel computes
/// in f32 either way).
fn check_param(kind: Kind, x: &Tensor, p: Option<&Tensor>, what: &str) -> Result<()> {
    let Some(p) = p else { return Ok(()) };
    let half_input = matches!(x.dtype(), DType::F16 | DType::BF16);
    if !(half_input && p.dtype() == DType::F32 && p.device() == x.device()) {
        x.ensure_same(kind.name(), p)?;
    }
    let n = *x.shape().last().expect("rank checked before");
    if p.shape() != [n] {
        return Err(Error::shape_mismatch(
            kind.name(),
            x.shape(),
            p.shape(),
            format!("{what} must have shape [{n}] (the input's last dim)"),
        ));
    }
    Ok(())
}

/// Contiguous compute-precision data of an optional parameter.
fn param_data<'a>(op: &'static str, p: Option<&'a Tensor>) -> Result<Option<FloatData<'a>>> {
    p.map(|p| p.float_data(op)).transpose()
}

/// Borrows the f32 (or f64) slice of an optional parameter; `None` when absent.
macro_rules! param_slice {
    ($p:expr, $variant:ident) => {
        match $p {
            Some(FloatData::$variant(v)) => Some(&v[..]),
            None => None,
            Some(_) => {
                return Err(Error::Backward(
                    "norm: parameters computed in another precision".into(),
                ))
            }
        }
    };
}

struct NormBackward {
    kind: Kind,
    input: Tensor,
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    stats: Vec<(f64, f64)>,
}

impl Backward for NormBackward {
    fn name(&self) -> &'static str {
        self.kind.name()
    }
    fn inputs(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.input];
        v.extend(self.weight.as_ref());
        v.extend(self.bias.as_ref());
        v
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let op = self.name();
        let x = &self.input;
        let n = *x.shape().last().expect("rank checked in forward");
        let g = if g.dtype() != x.dtype() {
            g.to_dtype(x.dtype())?
        } else {
            g.clone()
        };
        let w = param_data(op, self.weight.as_ref())?;
        let (dx, dw, db) = match (x.float_data(op)?, g.float_data(op)?) {
            (FloatData::F32(xv), FloatData::F32(gv)) => {
                let (dx, dw, db) =
                    norm_backward(&xv, &gv, param_slice!(&w, F32), &self.stats, n, self.kind);
                (Tensor::from_float_vec(dx, x.shape(), x.dtype())?, dw, db)
            }
            (FloatData::F64(xv), FloatData::F64(gv)) => {
                let (dx, dw, db) =
                    norm_backward(&xv, &gv, param_slice!(&w, F64), &self.stats, n, self.kind);
                (Tensor::from_float_vec(dx, x.shape(), x.dtype())?, dw, db)
            }
            _ => {
                return Err(Error::Backward(format!(
                    "{op}: input and gradient in different precisions"
                )));
            }
        };
        let mut grads = vec![Some(dx)];
        if let Some(w) = &self.weight {
            grads.push(Some(Tensor::from_vec(dw, &[n])?.to_dtype(w.dtype())?));
        }
        if let Some(b) = &self.bias {
            grads.push(Some(Tensor::from_vec(db, &[n])?.to_dtype(b.dtype())?));
        }
        Ok(grads)
    }
}

impl Tensor {
    /// Layer normalisation over the last dim, like `torch.nn.functional.layer_norm(x, [C], w,
    /// b, eps)`: (x - mean) / sqrt(var + eps) * weight + bias with the biased variance.
    /// `weight` and `bias` must have shape `[C]` and the input's dtype; f16/bf16 compute in f32.
    pub fn layer_norm(
        &self,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        self.norm_impl(Kind::Layer, weight, bias, eps)
    }

    /// RMS normalisation over the last dim (LLaMA): x / sqrt(mean(x^2) + eps) * weight.
    /// `weight` must have shape `[C]` and the input's dtype; f16/bf16 compute in f32.
    pub fn rms_norm(&self, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
        self.norm_impl(Kind::Rms, weight, None, eps)
    }

    fn norm_impl(
        &self,
        kind: Kind,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        let op = kind.name();
        self.ensure_float(op)?;
        if self.rank() == 0 {
            return Err(Error::invalid_shape(
                op,
                self.shape(),
                "needs at least one dim to normalise over",
            ));
        }
        if eps.is_nan() || eps < 0.0 {
            return Err(Error::invalid_shape(
                op,
                self.shape(),
                format!("eps must be >= 0, got {eps}"),
            ));
        }
        check_param(kind, self, weight, "weight")?;
        check_param(kind, self, bias, "bias")?;
        let n = *self.shape().last().expect("rank checked above");
        let w = param_data(op, weight)?;
        let b = param_data(op, bias)?;
        let (out, stats) = match self.float_data(op)? {
            FloatData::F32(v) => {
                let (o, s) = norm_forward(
                    &v,
                    param_slice!(&w, F32),
                    param_slice!(&b, F32),
                    n,
                    eps,
                    kind,
                );
                (Tensor::from_float_vec(o, self.shape(), self.dtype())?, s)
            }
            FloatData::F64(v) => {
                let (o, s) = norm_forward(
                    &v,
                    param_slice!(&w, F64),
                    param_slice!(&b, F64),
                    n,
                    eps,
                    kind,
                );
                (Tensor::from_float_vec(o, self.shape(), self.dtype())?, s)
            }
        };
        Ok(attach(out, || NormBackward {
            kind,
            input: self.clone(),
            weight: weight.cloned(),
            bias: bias.cloned(),
            stats,
        }))
    }
}
