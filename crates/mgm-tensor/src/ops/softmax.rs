//! Softmax, log-softmax and cross-entropy with fused backward passes, plus the row-kernel
//! helpers (vectorisable exp, lane sums, AVX2 dispatch) that reductions and norms share.
//!
//! The last-dim contiguous case runs one row at a time (rayon over blocks of rows): a max pass,
//! an exp pass that writes the output, and a scale pass over the row while it is still in L1, so
//! each element is read from memory once and written once. Other dims run on `[outer, n, inner]`
//! data with the loops vectorised over `inner`, which avoids transposing copies.

use rayon::prelude::*;

use crate::autograd::{Backward, attach};
use crate::shape::resolve_dim;
use crate::tensor::{FloatData, with_float};
use crate::{DType, Error, Float, Result, Tensor};

// ------------------------------------------------------------------------------------------------
// shared kernel helpers

/// Lanes of the manual accumulators: enough independent chains to hide add latency and to let
/// LLVM vectorise a reduction it would otherwise keep scalar (float adds do not reassociate).
pub(crate) const LANES: usize = 16;

/// Elements per rayon task in row kernels; inputs below twice this stay on one thread.
pub(crate) const PAR_ELEMS: usize = 1 << 15;

/// The compute types of the row kernels (f32, f64) with the one operation they specialise.
pub(crate) trait Elem: Float {
    /// e^x for x <= 88 (or NaN): a branch-free polynomial for f32 so loops vectorise
    /// (max relative error about 2e-7; results below 2^-126 flush to 0), libm for f64.
    fn exp_k(self) -> Self;
}

impl Elem for f64 {
    #[inline(always)]
    fn exp_k(self) -> f64 {
        self.exp()
    }
}

impl Elem for f32 {
    #[inline(always)]
    fn exp_k(self) -> f32 {
        exp_f32(self)
    }
}

/// Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial, 2^n by
/// writing the exponent bits. Written with selects instead of branches so it vectorises.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 * 2^23: adding it rounds x log2(e) to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let k = x * LOG2E + MAGIC;
    let n = k - MAGIC;
    let r = x - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.0e-1;
    let y = p * r * r + r + 1.0;
    // n + 127 into the exponent field; valid for n >= -126, which the select below guarantees
    let scale = f32::from_bits(k.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23);
    if x < -87.3 { 0.0 } else { y * scale }
}

/// True when the running CPU has AVX2 and FMA, so the `*_avx2` kernel variants may run.
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Declares `$avx`, the generic kernel `$name` compiled with AVX2 and FMA enabled (the crate is
/// built for baseline x86-64, where the lane loops would only vectorise 4-wide with SSE2).
/// `$name` must be `#[inline(always)]`, as must the helpers it calls.
macro_rules! simd_variant {
    ($vis:vis $avx:ident = $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)?) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        $vis unsafe fn $avx<F: $crate::ops::softmax::Elem>($($a: $t),*) $(-> $r)? {
            $name::<F>($($a),*)
        }
    };
}
pub(crate) use simd_variant;

/// Calls the AVX2 variant when `$simd` (from [`has_avx2`]) says the CPU has it, else the
/// portable kernel.
macro_rules! simd_call {
    ($simd:expr, $avx:ident, $name:ident($($e:expr),* $(,)?)) => {{
        #[cfg(target_arch = "x86_64")]
        let r = if $simd {
            // SAFETY: `$simd` is true only when has_avx2() found AVX2 and FMA on this CPU, the
            // only requirement of the target_feature variant.
            unsafe { $avx($($e),*) }
        } else {
            $name($($e),*)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let r = {
            let _ = $simd;
            $name($($e),*)
        };
        r
    }};
}
pub(crate) use simd_call;

/// Largest element, ignoring NaN (callers detect NaN through the sums that follow);
/// -inf for an empty slice.
#[inline(always)]
pub(crate) fn row_max<F: Float>(x: &[F]) -> F {
    let mut acc = [F::neg_infinity(); LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for i in 0..LANES {
            if c[i] > acc[i] {
                acc[i] = c[i];
            }
        }
    }
    let mut m = F::neg_infinity();
    for &v in it.remainder().iter().chain(acc.iter()) {
        if v > m {
            m = v;
        }
    }
    m
}

/// Sum in f64 (exact enough that f32 rows of any length stay within a few ulps).
#[inline(always)]
pub(crate) fn sum_f64<F: Float>(x: &[F]) -> f64 {
    let mut acc = [0f64; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for i in 0..LANES {
            acc[i] += c[i].to_f64();
        }
    }
    let mut s = 0f64;
    for &v in it.remainder() {
        s += v.to_f64();
    }
    s + acc.iter().sum::<f64>()
}

/// Sum of `a[i] * b[i]` in f64.
#[inline(always)]
pub(crate) fn dot_f64<F: Float>(a: &[F], b: &[F]) -> f64 {
    let mut acc = [0f64; LANES];
    let mut ia = a.chunks_exact(LANES);
    let mut ib = b.chunks_exact(LANES);
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for i in 0..LANES {
            acc[i] += ca[i].to_f64() * cb[i].to_f64();
        }
    }
    let mut s = 0f64;
    for (&x, &y) in ia.remainder().iter().zip(ib.remainder()) {
        s += x.to_f64() * y.to_f64();
    }
    s + acc.iter().sum::<f64>()
}

/// Sum of e^(x - m) in f64, without storing the exponentials.
#[inline(always)]
pub(crate) fn sum_exp_f64<F: Elem>(x: &[F], m: F) -> f64 {
    let mut acc = [0f64; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for i in 0..LANES {
            acc[i] += (c[i] - m).exp_k().to_f64();
        }
    }
    let mut s = 0f64;
    for &v in it.remainder() {
        s += (v - m).exp_k().to_f64();
    }
    s + acc.iter().sum::<f64>()
}

/// Splits `rows` rows of `n` elements into rayon tasks of about [`PAR_ELEMS`] elements.
pub(crate) fn rows_per_task(n: usize) -> usize {
    (PAR_ELEMS / n.max(1)).max(1)
}

/// Runs `f(x_rows, out_rows)` over blocks of whole rows, in parallel when large.
pub(crate) fn for_row_blocks<A: Sync, B: Send>(
    x: &[A],
    out: &mut [B],
    n: usize,
    f: impl Fn(&[A], &mut [B]) + Sync,
) {
    let rows = x.len().checked_div(n).unwrap_or(0);
    if rows == 0 {
        return;
    }
    let block = rows_per_task(n) * n;
    if x.len() >= 2 * PAR_ELEMS && rows > 1 {
        out.par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .for_each(|(o, x)| f(x, o));
    } else {
        f(x, out);
    }
}

// ------------------------------------------------------------------------------------------------
// softmax kernels

/// Fills a row whose max is -inf: NaN everywhere when it holds a NaN (as the sums would give),
/// else `fill` (0 for softmax, -inf for log-softmax).
fn special_row<F: Float>(x: &[F], out: &mut [F], fill: F) {
    let v = if x.iter().any(|v| v.is_nan()) {
        F::c(f64::NAN)
    } else {
        fill
    };
    out.iter_mut().for_each(|o| *o = v);
}

/// Softmax (or log-softmax) of each contiguous row of `n` elements.
#[inline(always)]
fn softmax_rows<F: Elem>(x: &[F], out: &mut [F], n: usize, log: bool) {
    for (x, out) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let m = row_max(x);
        if m == F::neg_infinity() {
            special_row(x, out, if log { F::neg_infinity() } else { F::zero() });
            continue;
        }
        if log {
            let c = F::c(m.to_f64() + sum_exp_f64(x, m).ln());
            for (o, &v) in out.iter_mut().zip(x) {
                *o = v - c;
            }
        } else {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = (v - m).exp_k();
            }
            let inv = F::c(1.0 / sum_f64(out));
            for o in out.iter_mut() {
                *o *= inv;
            }
        }
    }
}
simd_variant!(softmax_rows_avx2 = softmax_rows(x: &[F], out: &mut [F], n: usize, log: bool));

/// Softmax over the middle dim of one `[n, inner]` slice, vectorised across `inner`.
#[inline(always)]
fn softmax_cols<F: Elem>(x: &[F], out: &mut [F], n: usize, inner: usize, log: bool) {
    let mut m = vec![F::neg_infinity(); inner];
    for row in x.chunks_exact(inner) {
        for (m, &v) in m.iter_mut().zip(row) {
            if v > *m {
                *m = v;
            }
        }
    }
    for (orow, xrow) in out.chunks_exact_mut(inner).zip(x.chunks_exact(inner)) {
        for ((o, &v), &m) in orow.iter_mut().zip(xrow).zip(&m) {
            *o = (v - m).exp_k();
        }
    }
    let mut s = vec![0f64; inner];
    for orow in out.chunks_exact(inner) {
        for (s, &e) in s.iter_mut().zip(orow) {
            *s += e.to_f64();
        }
    }
    if log {
        let c: Vec<F> = m
            .iter()
            .zip(&s)
            .map(|(&m, &s)| F::c(m.to_f64() + s.ln()))
            .collect();
        for (orow, xrow) in out.chunks_exact_mut(inner).zip(x.chunks_exact(inner)) {
            for ((o, &v), &c) in orow.iter_mut().zip(xrow).zip(&c) {
                *o = v - c;
            }
        }
    } else {
        let inv: Vec<F> = s.iter().map(|&s| F::c(1.0 / s)).collect();
        for orow in out.chunks_exact_mut(inner) {
            for (o, &i) in orow.iter_mut().zip(&inv) {
                *o *= i;
            }
        }
    }
    for j in (0..inner).filter(|&j| m[j] == F::neg_infinity()) {
        let nan = (0..n).any(|i| x[i * inner + j].is_nan());
        let fill = if nan {
            F::c(f64::NAN)
        } else if log {
            F::neg_infinity()
        } else {
            F::zero()
        };
        (0..n).for_each(|i| out[i * inner + j] = fill);
    }
}
simd_variant!(softmax_cols_avx2 = softmax_cols(x: &[F], out: &mut [F], n: usize, inner: usize, log: bool));

/// Softmax of contiguous data viewed as `[outer, n, inner]` over the middle dim.
fn softmax_forward<F: Elem>(x: &[F], n: usize, inner: usize, log: bool) -> Vec<F> {
    let mut out = vec![F::zero(); x.len()];
    if x.is_empty() {
        return out;
    }
    let simd = has_avx2();
    if inner == 1 {
        for_row_blocks(x, &mut out, n, |x, o| {
            simd_call!(simd, softmax_rows_avx2, softmax_rows(x, o, n, log))
        });
    } else {
        let slab = n * inner;
        let f = |(o, x): (&mut [F], &[F])| {
            simd_call!(simd, softmax_cols_avx2, softmax_cols(x, o, n, inner, log))
        };
        if x.len() >= 2 * PAR_ELEMS && x.len() > slab {
            out.par_chunks_mut(slab).zip(x.par_chunks(slab)).for_each(f);
        } else {
            out.chunks_mut(slab).zip(x.chunks(slab)).for_each(f);
        }
    }
    out
}

/// Softmax backward rows: dx = y (g - sum(g y)); log-softmax: dx = g - e^y sum(g), zero for
/// rows that are all -inf (their output does not depend on the input).
#[inline(always)]
fn softmax_bwd_rows<F: Elem>(y: &[F], g: &[F], dx: &mut [F], n: usize, log: bool) {
    for ((y, g), dx) in y
        .chunks_exact(n)
        .zip(g.chunks_exact(n))
        .zip(dx.chunks_exact_mut(n))
    {
        if log {
            if row_max(y) == F::neg_infinity() && !y.iter().any(|v| v.is_nan()) {
                dx.iter_mut().for_each(|d| *d = F::zero());
                continue;
            }
            let s = F::c(sum_f64(g));
            for ((d, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                *d = g - y.exp_k() * s;
            }
        } else {
            let s = F::c(dot_f64(g, y));
            for ((d, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                *d = y * (g - s);
            }
        }
    }
}
simd_variant!(softmax_bwd_rows_avx2 = softmax_bwd_rows(y: &[F], g: &[F], dx: &mut [F], n: usize, log: bool));

/// Backward of one `[n, inner]` slice over the middle dim.
#[inline(always)]
fn softmax_bwd_cols<F: Elem>(y: &[F], g: &[F], dx: &mut [F], inner: usize, log: bool) {
    let mut s = vec![0f64; inner];
    let mut ymax = vec![F::neg_infinity(); inner];
    for (yrow, grow) in y.chunks_exact(inner).zip(g.chunks_exact(inner)) {
        for (((s, mx), &y), &g) in s.iter_mut().zip(ymax.iter_mut()).zip(yrow).zip(grow) {
            if log {
                *s += g.to_f64();
                // NaN propagates: a NaN y replaces the running max
                if !matches!(
                    y.partial_cmp(mx),
                    Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
                ) {
                    *mx = y;
                }
            } else {
                *s += g.to_f64() * y.to_f64();
            }
        }
    }
    let s: Vec<F> = s.iter().map(|&s| F::c(s)).collect();
    for ((drow, yrow), grow) in dx
        .chunks_exact_mut(inner)
        .zip(y.chunks_exact(inner))
        .zip(g.chunks_exact(inner))
    {
        for ((((d, &y), &g), &s), &mx) in drow.iter_mut().zip(yrow).zip(grow).zip(&s).zip(&ymax) {
            *d = if !log {
                y * (g - s)
            } else if mx == F::neg_infinity() {
                F::zero()
            } else {
                g - y.exp_k() * s
            };
        }
    }
}
simd_variant!(softmax_bwd_cols_avx2 = softmax_bwd_cols(y: &[F], g: &[F], dx: &mut [F], inner: usize, log: bool));

fn softmax_backward<F: Elem>(y: &[F], g: &[F], n: usize, inner: usize, log: bool) -> Vec<F> {
    let mut dx = vec![F::zero(); y.len()];
    if y.is_empty() {
        return dx;
    }
    let simd = has_avx2();
    if inner == 1 {
        let rows = y.len() / n;
        let block = rows_per_task(n) * n;
        let f = |((d, y), g): ((&mut [F], &[F]), &[F])| {
            simd_call!(
                simd,
                softmax_bwd_rows_avx2,
                softmax_bwd_rows(y, g, d, n, log)
            )
        };
        if y.len() >= 2 * PAR_ELEMS && rows > 1 {
            dx.par_chunks_mut(block)
                .zip(y.par_chunks(block))
                .zip(g.par_chunks(block))
                .for_each(f);
        } else {
            f(((&mut dx, y), g));
        }
    } else {
        let slab = n * inner;
        let f = |((d, y), g): ((&mut [F], &[F]), &[F])| {
            simd_call!(
                simd,
                softmax_bwd_cols_avx2,
                softmax_bwd_cols(y, g, d, inner, log)
            )
        };
        if y.len() >= 2 * PAR_ELEMS && y.len() > slab {
            dx.par_chunks_mut(slab)
                .zip(y.par_chunks(slab))
                .zip(g.par_chunks(slab))
                .for_each(f);
        } else {
            dx.chunks_mut(slab)
                .zip(y.chunks(slab))
                .zip(g.chunks(slab))
                .for_each(f);
        }
    }
    dx
}

/// `(n, inner)` of the `[outer, n, inner]` view of `shape` around dim `d`.
fn split_at_dim(shape: &[usize], d: usize) -> (usize, usize) {
    (shape[d], shape[d + 1..].iter().product())
}

/// Resolves `dim` like PyTorch, which also accepts 0 and -1 for rank-0 tensors.
pub(crate) fn resolve_dim_scalar_ok(
    op: &'static str,
    dim: isize,
    shape: &[usize],
) -> Result<usize> {
    if shape.is_empty() && (dim == 0 || dim == -1) {
        return Ok(0);
    }
    resolve_dim(op, dim, shape)
}

/// Runs `f` on two float tensors of the same compute type (`b` is cast to `a`'s dtype first).
pub(crate) fn with_float_pair<R>(
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    f32_fn: impl FnOnce(&[f32], &[f32]) -> Result<R>,
    f64_fn: impl FnOnce(&[f64], &[f64]) -> Result<R>,
) -> Result<R> {
    let b = if b.dtype() != a.dtype() {
        b.to_dtype(a.dtype())?
    } else {
        b.clone()
    };
    match (a.float_data(op)?, b.float_data(op)?) {
        (FloatData::F32(x), FloatData::F32(y)) => f32_fn(&x, &y),
        (FloatData::F64(x), FloatData::F64(y)) => f64_fn(&x, &y),
        _ => Err(Error::Backward(format!(
            "{op}: operands computed in different precisions"
        ))),
    }
}

struct SoftmaxBackward {
    input: Tensor,
    dim: usize,
    log: bool,
}

impl Backward for SoftmaxBackward {
    fn name(&self) -> &'static str {
        if self.log { "log_softmax" } else { "softmax" }
    }
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.input]
    }
    fn backward(&self, out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let shape = out.shape().to_vec();
        let (n, inner) = if shape.is_empty() {
            (1, 1)
        } else {
            split_at_dim(&shape, self.dim)
        };
        let (dtype, log) = (self.input.dtype(), self.log);
        let dx = with_float_pair(
            self.name(),
            out,
            g,
            |y, g| Tensor::from_float_vec(softmax_backward(y, g, n, inner, log), &shape, dtype),
            |y, g| Tensor::from_float_vec(softmax_backward(y, g, n, inner, log), &shape, dtype),
        )?;
        Ok(vec![Some(dx)])
    }
}

impl Tensor {
    /// Softmax over `dim`, computed stably as e^(x - max) / sum. A slice whose entries are all
    /// -inf (a fully masked attention row) gives zeros, not NaN (DESIGN.md section 3); a slice
    /// holding NaN or +inf gives NaN, as in PyTorch. f16/bf16 compute in f32.
    pub fn softmax(&self, dim: isize) -> Result<Tensor> {
        self.softmax_impl("softmax", dim, false)
    }

    /// Log-softmax over `dim`, computed stably as x - max - log(sum e^(x - max)). A slice whose
    /// entries are all -inf gives -inf everywhere (PyTorch gives NaN there): the log of the zeros
    /// that [`Tensor::softmax`] returns, so masked rows never inject NaN into a loss; its
    /// gradient is zero. f16/bf16 compute in f32.
    pub fn log_softmax(&self, dim: isize) -> Result<Tensor> {
        self.softmax_impl("log_softmax", dim, true)
    }

    fn softmax_impl(&self, op: &'static str, dim: isize, log: bool) -> Result<Tensor> {
        self.ensure_float(op)?;
        let d = resolve_dim_scalar_ok(op, dim, self.shape())?;
        let (n, inner) = if self.rank() == 0 {
            (1, 1)
        } else {
            split_at_dim(self.shape(), d)
        };
        let out = with_float!(self.float_data(op)?, v => {
            Tensor::from_float_vec(softmax_forward(&v, n, inner, log), self.shape(), self.dtype())?
        });
        Ok(attach(out, || SoftmaxBackward {
            input: self.clone(),
            dim: d,
            log,
        }))
    }

    /// Mean cross-entropy of `logits` (`self`, `[N, C]`) against class indices `targets` (i64
    /// `[N]`), like `torch.nn.functional.cross_entropy(reduction="mean")`: rows whose target is
    /// `ignore_index` are skipped and the mean is over the others (NaN when none remain). With
    /// `label_smoothing` e the target distribution is (1 - e) one_hot + e / C. The backward is
    /// fused: (softmax - target distribution) / count.
    pub fn cross_entropy(
        &self,
        targets: &Tensor,
        ignore_index: i64,
        label_smoothing: f64,
    ) -> Result<Tensor> {
        const OP: &str = "cross_entropy";
        self.ensure_float(OP)?;
        if self.rank() != 2 {
            return Err(Error::invalid_shape(
                OP,
                self.shape(),
                "logits must have shape [N, C]",
            ));
        }
        if targets.dtype() != DType::I64 {
            return Err(Error::unsupported_dtype(
                OP,
                targets.dtype(),
                "targets must be i64 class indices",
            ));
        }
        let (rows, classes) = (self.shape()[0], self.shape()[1]);
        if targets.shape() != [rows] {
            return Err(Error::shape_mismatch(
                OP,
                self.shape(),
                targets.shape(),
                "targets must have shape [N]",
            ));
        }
        if !(0.0..=1.0).contains(&label_smoothing) {
            return Err(Error::invalid_shape(
                OP,
                self.shape(),
                format!("label_smoothing must be in [0, 1], got {label_smoothing}"),
            ));
        }
        let t = targets.to_vec::<i64>()?;
        for (i, &ti) in t.iter().enumerate() {
            if ti != ignore_index && (ti < 0 || ti as u64 >= classes as u64) {
                return Err(Error::out_of_bounds(
                    OP,
                    format!(
                        "target {ti} at row {i} is out of range for {classes} classes (logits {:?})",
                        self.shape()
                    ),
                ));
            }
        }
        let count = t.iter().filter(|&&ti| ti != ignore_index).count();
        let (loss, lse) = with_float!(self.float_data(OP)?, v => ce_forward(&v, classes, &t, ignore_index, label_smoothing));
        let loss = if count == 0 {
            f64::NAN
        } else {
            loss / count as f64
        };
        let out = Tensor::full(loss, &[], self.dtype(), self.device())?;
        Ok(attach(out, || CrossEntropyBackward {
            logits: self.clone(),
            targets: t,
            lse,
            ignore_index,
            smoothing: label_smoothing,
            count,
        }))
    }
}

/// Per-row logsumexp and the summed loss of the kept rows.
fn ce_forward<F: Elem>(
    x: &[F],
    classes: usize,
    t: &[i64],
    ignore: i64,
    eps: f64,
) -> (f64, Vec<f64>) {
    if classes == 0 {
        let kept = t.iter().filter(|&&ti| ti != ignore).count();
        // no class can be a valid target, so every kept row was rejected above
        debug_assert_eq!(kept, 0);
        return (0.0, vec![f64::NEG_INFINITY; t.len()]);
    }
    let simd = has_avx2();
    let row = |(xr, &ti): (&[F], &i64)| -> (f64, f64) {
        let lse = simd_call!(simd, row_lse_avx2, row_lse(xr));
        if ti == ignore {
            return (lse, 0.0);
        }
        let nll = lse - xr[ti as usize].to_f64();
        let loss = if eps == 0.0 {
            nll
        } else {
            let smooth = classes as f64 * lse - sum_f64(xr);
            (1.0 - eps) * nll + eps / classes as f64 * smooth
        };
        (lse, loss)
    };
    let parts: Vec<(f64, f64)> = if x.len() >= 2 * PAR_ELEMS {
        x.par_chunks(classes)
            .zip(t.par_iter())
            .with_min_len(rows_per_task(classes))
            .map(row)
            .collect()
    } else {
        x.chunks(classes).zip(t.iter()).map(row).collect()
    };
    let loss = parts.iter().map(|p| p.1).sum();
    (loss, parts.into_iter().map(|p| p.0).collect())
}

/// log(sum(e^x)) of a row, computed stably; -inf for an all -inf row, NaN when a NaN is present.
#[inline(always)]
pub(crate) fn row_lse<F: Elem>(x: &[F]) -> f64 {
    let m = row_max(x);
    if m == F::neg_infinity() {
        return if x.iter().any(|v| v.is_nan()) {
            f64::NAN
        } else {
            f64::NEG_INFINITY
        };
    }
    if m == F::infinity() {
        return if x.iter().any(|v| v.is_nan()) {
            f64::NAN
        } else {
            f64::INFINITY
        };
    }
    m.to_f64() + sum_exp_f64(x, m).ln()
}
simd_variant!(pub(crate) row_lse_avx2 = row_lse(x: &[F]) -> f64);

struct CrossEntropyBackward {
    logits: Tensor,
    targets: Vec<i64>,
    lse: Vec<f64>,
    ignore_index: i64,
    smoothing: f64,
    count: usize,
}

/// Scalars of the cross-entropy backward: classes, ignore_index, label smoothing, g / count.
#[derive(Clone, Copy)]
struct CeParams {
    c: usize,
    ignore: i64,
    eps: f64,
    scale: f64,
}

#[inline(always)]
fn ce_bwd_rows<F: Elem>(x: &[F], dx: &mut [F], t: &[i64], lse: &[f64], p: CeParams) {
    let CeParams {
        c,
        ignore,
        eps,
        scale,
    } = p;
    let off = F::c(eps / c as f64);
    let sc = F::c(scale);
    for (((x, dx), &ti), &l) in x
        .chunks_exact(c)
        .zip(dx.chunks_exact_mut(c))
        .zip(t)
        .zip(lse)
    {
        if ti == ignore {
            dx.iter_mut().for_each(|d| *d = F::zero());
            continue;
        }
        if l == f64::NEG_INFINITY {
            // an all -inf row has probabilities 0 (the softmax convention)
            dx.iter_mut().for_each(|d| *d = -off * sc);
        } else {
            let lf = F::c(l);
            for (d, &v) in dx.iter_mut().zip(x) {
                *d = ((v - lf).exp_k() - off) * sc;
            }
        }
        dx[ti as usize] -= F::c((1.0 - eps) * scale);
    }
}
simd_variant!(ce_bwd_rows_avx2 = ce_bwd_rows(x: &[F], dx: &mut [F], t: &[i64], lse: &[f64], p: CeParams));

impl CrossEntropyBackward {
    fn grad<F: Elem>(&self, x: &[F], g: f64) -> Vec<F> {
        let c = self.logits.shape()[1];
        let mut dx = vec![F::zero(); x.len()];
        if x.is_empty() || self.count == 0 {
            return dx;
        }
        let scale = g / self.count as f64;
        let simd = has_avx2();
        let p = CeParams {
            c,
            ignore: self.ignore_index,
            eps: self.smoothing,
            scale,
        };
        let rpt = rows_per_task(c);
        #[allow(clippy::type_complexity)] // the item type of a rayon zip chain
        let f = |(((dx, x), t), lse): (((&mut [F], &[F]), &[i64]), &[f64])| {
            simd_call!(simd, ce_bwd_rows_avx2, ce_bwd_rows(x, dx, t, lse, p))
        };
        if x.len() >= 2 * PAR_ELEMS {
            dx.par_chunks_mut(rpt * c)
                .zip(x.par_chunks(rpt * c))
                .zip(self.targets.par_chunks(rpt))
                .zip(self.lse.par_chunks(rpt))
                .for_each(f);
        } else {
            f((((&mut dx, x), &self.targets), &self.lse));
        }
        dx
    }
}

impl Backward for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.logits]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = g.to_scalar_f64()?;
        let x = &self.logits;
        let dx = with_float!(x.float_data("cross_entropy")?, v => {
            Tensor::from_float_vec(self.grad(&v, g), x.shape(), x.dtype())?
        });
        Ok(vec![Some(dx)])
    }
}
