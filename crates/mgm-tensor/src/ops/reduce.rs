//! Reductions over one or many dims: sum, mean, max/min (and their indices), var/std,
//! logsumexp, and the cumulative sum.

use rayon::prelude::*;

use crate::autograd::{Backward, attach};
use crate::ops::norm::sq_dev_f64;
use crate::ops::softmax::{
    Elem, PAR_ELEMS, has_avx2, resolve_dim_scalar_ok, row_lse, row_lse_avx2, simd_call, sum_f64,
};
use crate::ops::view::with_dtype;
use crate::shape::resolve_dims;
use crate::tensor::with_float;
use crate::{DType, Error, Float, Result, Tensor, WithDType};

/// A tensor prepared for reducing `dims`: the reduced dims moved innermost and made contiguous,
/// so each output element reduces one contiguous run of `run` elements.
pub(crate) struct ReducePlan {
    /// The permuted, contiguous tensor (reduced dims last).
    pub(crate) moved: Tensor,
    /// Output shape with the reduced dims kept as 1.
    pub(crate) keep_shape: Vec<usize>,
    /// Output shape with the reduced dims removed.
    pub(crate) drop_shape: Vec<usize>,
    /// Elements per output (product of reduced dims).
    pub(crate) run: usize,
    /// The reduced dims, resolved and sorted.
    pub(crate) dims: Vec<usize>,
}

impl ReducePlan {
    /// Plans a reduction of `dims` (negative allowed; empty = all dims).
    pub(crate) fn new(op: &'static str, t: &Tensor, dims: &[isize]) -> Result<ReducePlan> {
        let dims = if dims.is_empty() {
            (0..t.rank()).collect::<Vec<_>>()
        } else {
            resolve_dims(op, dims, t.shape())?
        };
        let kept: Vec<usize> = (0..t.rank()).filter(|d| !dims.contains(d)).collect();
        let order: Vec<usize> = kept.iter().chain(dims.iter()).copied().collect();
        let moved = crate::autograd::no_grad(|| t.permute(&order)?.contiguous())?.detach();
        let keep_shape: Vec<usize> = t
            .shape()
            .iter()
            .enumerate()
            .map(|(i, &s)| if dims.contains(&i) { 1 } else { s })
            .collect();
        let drop_shape: Vec<usize> = kept.iter().map(|&d| t.shape()[d]).collect();
        let run = dims.iter().map(|&d| t.shape()[d]).product();
        Ok(ReducePlan {
            moved,
            keep_shape,
            drop_shape,
            run,
            dims,
        })
    }

    /// The output shape for `keepdim`.
    pub(crate) fn out_shape(&self, keepdim: bool) -> &[usize] {
        if keepdim {
            &self.keep_shape
        } else {
            &self.drop_shape
        }
    }
}

/// Reduces each contiguous run of `run` elements of `v` with `f` (in parallel for large inputs).
pub(crate) fn reduce_runs<F: Sync, O: Send + Copy + Default>(
    v: &[F],
    run: usize,
    outputs: usize,
    f: impl Fn(&[F]) -> O + Sync + Send,
) -> Vec<O> {
    if run == 0 {
        return (0..outputs).map(|_| f(&[])).collect();
    }
    if v.len() >= 1 << 15 && outputs > 1 {
        v.par_chunks(run).map(f).collect()
    } else {
        v.chunks(run).map(f).collect()
    }
}

/// Pairwise-accurate sum: f64 accumulation for f32 data keeps results within a few ulps.
pub(crate) fn sum_run<F: Float>(r: &[F]) -> F {
    let mut acc = 0f64;
    for &x in r {
        acc += x.to_f64();
    }
    F::from_f64(acc)
}

fn scale_in_place<F: Float>(v: &mut [F], s: f64) {
    let s = F::c(s);
    v.iter_mut().for_each(|x| *x *= s);
}

struct SumBackward {
    input: Tensor,
    keep_shape: Vec<usize>,
    scale: f64,
}

impl Backward for SumBackward {
    fn name(&self) -> &'static str {
        "sum"
    }
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.input]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = g
            .reshape(&self.keep_shape)?
            .broadcast_as(self.input.shape())?;
        let g = if self.scale != 1.0 {
            g.mul_scalar(self.scale)?
        } else {
            g.contiguous()?
        };
        Ok(vec![Some(g)])
    }
}

impl Tensor {
    /// Sum over `dims` (empty = all), keeping them as size 1 when `keepdim`.
    pub fn sum_dims(&self, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        self.sum_scaled("sum", dims, keepdim, false)
    }

    /// Mean over `dims` (empty = all). The mean of zero elements is NaN, as in PyTorch.
    pub fn mean_dims(&self, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        self.sum_scaled("mean", dims, keepdim, true)
    }

    fn sum_scaled(
        &self,
        op: &'static str,
        dims: &[isize],
        keepdim: bool,
        mean: bool,
    ) -> Result<Tensor> {
        self.ensure_float(op)?;
        let plan = ReducePlan::new(op, self, dims)?;
        let scale = if mean { 1.0 / plan.run as f64 } else { 1.0 };
        let outputs: usize = plan.drop_shape.iter().product();
        let out = with_float!(plan.moved.float_data(op)?, v => {
            let mut s = reduce_runs(&v, plan.run, outputs, sum_run);
            if mean {
                scale_in_place(&mut s, scale);
            }
            Tensor::from_float_vec(s, plan.out_shape(keepdim), self.dtype())?
        });
        Ok(attach(out, || SumBackward {
            input: self.clone(),
            keep_shape: plan.keep_shape.clone(),
            scale,
        }))
    }

    /// Sum of all elements as a scalar tensor.
    pub fn sum_all(&self) -> Result<Tensor> {
        self.sum_dims(&[], false)
    }

    /// Mean of all elements as a scalar tensor.
    pub fn mean_all(&self) -> Result<Tensor> {
        self.mean_dims(&[], false)
    }

    /// Sum over one dim.
    pub fn sum(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        self.sum_dims(&[dim], keepdim)
    }

    /// Mean over one dim.
    pub fn mean(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        self.mean_dims(&[dim], keepdim)
    }

    /// Sums broadcast dims away so the result has `shape` (the adjoint of `broadcast_as`).
    pub fn sum_to_shape(&self, shape: &[usize]) -> Result<Tensor> {
        if self.shape() == shape {
            return Ok(self.clone());
        }
        if shape.len() > self.rank() {
            return Err(Error::shape_mismatch(
                "sum_to_shape",
                self.shape(),
                shape,
                "target has higher rank",
            ));
        }
        let extra = self.rank() - shape.len();
        let mut dims = Vec::new();
        for (i, &d) in self.shape().iter().enumerate() {
            if i < extra || (shape[i - extra] == 1 && d != 1) {
                dims.push(i as isize);
            } else if shape[i - extra] != d {
                return Err(Error::shape_mismatch(
                    "sum_to_shape",
                    self.shape(),
                    shape,
                    format!("dim {i} cannot be summed to {}", shape[i - extra]),
                ));
            }
        }
        if dims.is_empty() {
            return self.reshape(shape);
        }
        self.sum_dims(&dims, true)?.reshape(shape)
    }
}

// ------------------------------------------------------------------------------------------------
// max / min / argmax / argmin

const LANES: usize = crate::ops::softmax::LANES;

/// NaN test for any element type (always false for integers).
#[inline(always)]
#[allow(clippy::eq_op)]
fn is_nan<T: PartialEq>(x: T) -> bool {
    x != x
}

/// Largest (`MAX`) or smallest element of a non-empty run; NaN as soon as one element is NaN,
/// like `torch.amax`. Lane accumulators let the compare-select loop vectorise.
fn extreme_run<T: WithDType, const MAX: bool>(r: &[T]) -> T {
    let better = |x: T, acc: T| if MAX { x > acc } else { x < acc };
    let mut acc = [r[0]; LANES];
    let mut it = r.chunks_exact(LANES);
    for c in &mut it {
        for i in 0..LANES {
            // once a lane holds NaN, neither test passes again, so NaN sticks
            if better(c[i], acc[i]) || is_nan(c[i]) {
                acc[i] = c[i];
            }
        }
    }
    let mut m = r[0];
    for &x in it.remainder().iter().chain(acc.iter()) {
        if better(x, m) || is_nan(x) {
            m = x;
        }
    }
    m
}

/// Index of the first largest (`MAX`) or smallest element; the first NaN wins, as in PyTorch.
fn arg_extreme_run<T: WithDType, const MAX: bool>(r: &[T]) -> i64 {
    let mut best = r[0];
    let mut bi = 0usize;
    if is_nan(best) {
        return 0;
    }
    for (i, &x) in r.iter().enumerate().skip(1) {
        if is_nan(x) {
            return i as i64;
        }
        if if MAX { x > best } else { x < best } {
            best = x;
            bi = i;
        }
    }
    bi as i64
}

fn empty_reduction(op: &'static str, t: &Tensor, dims: &[usize]) -> Error {
    Error::invalid_shape(
        op,
        t.shape(),
        format!("cannot reduce over dims {dims:?} of total size 0 (the operation has no identity)"),
    )
}

/// Tensors of rank 0 reduce like a one-element vector (PyTorch accepts dim 0 or -1 for them).
fn as_vector_if_scalar(op: &'static str, t: &Tensor, dims: &[isize]) -> Result<Tensor> {
    if t.rank() == 0 {
        if let Some(&d) = dims.iter().find(|&&d| d != 0 && d != -1) {
            return Err(Error::DimOutOfRange {
                op,
                dim: d,
                rank: 0,
                shape: vec![],
            });
        }
        return t.reshape(&[1]);
    }
    Ok(t.clone())
}

struct ExtremeBackward {
    op: &'static str,
    input: Tensor,
    dims: Vec<isize>,
    keep_shape: Vec<usize>,
}

impl Backward for ExtremeBackward {
    fn name(&self) -> &'static str {
        self.op
    }
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.input]
    }
    fn backward(&self, out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        // the gradient is shared evenly among the elements equal to the result (torch.amax)
        let x = &self.input;
        let mask = x
            .eq_(&out.reshape(&self.keep_shape)?)?
            .to_dtype(x.dtype())?;
        let count = mask.sum_dims(&self.dims, true)?;
        let g = g
            .to_dtype(x.dtype())?
            .reshape(&self.keep_shape)?
            .div(&count)?;
        Ok(vec![Some(mask.mul(&g)?)])
    }
}

impl Tensor {
    /// Maximum over `dim` (values only), like `torch.amax(x, dim, keepdim)`. NaN propagates;
    /// reducing a dim of size 0 is an error. Works for every dtype; the gradient is split evenly
    /// among tied maxima.
    pub fn max(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        self.extreme("max", &[dim], keepdim, true)
    }

    /// Minimum over `dim` (values only), like `torch.amin(x, dim, keepdim)`.
    pub fn min(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        self.extreme("min", &[dim], keepdim, false)
    }

    /// Maximum over several dims (empty = all), like `torch.amax(x, dims, keepdim)`.
    pub fn max_dims(&self, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        self.extreme("max", dims, keepdim, true)
    }

    /// Minimum over several dims (empty = all), like `torch.amin(x, dims, keepdim)`.
    pub fn min_dims(&self, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        self.extreme("min", dims, keepdim, false)
    }

    fn extreme(
        &self,
        op: &'static str,
        dims: &[isize],
        keepdim: bool,
        max: bool,
    ) -> Result<Tensor> {
        let t = as_vector_if_scalar(op, self, dims)?;
        let plan = ReducePlan::new(op, &t, if self.rank() == 0 { &[] } else { dims })?;
        if plan.run == 0 {
            return Err(empty_reduction(op, self, &plan.dims));
        }
        let outputs: usize = plan.drop_shape.iter().product();
        let out_shape = if self.rank() == 0 {
            &[][..]
        } else {
            plan.out_shape(keepdim)
        };
        let out = with_dtype!(self.dtype(), T => {
            let owned: Vec<T>;
            let v = match plan.moved.as_contiguous_slice::<T>()? {
                Some(v) => v,
                // Layout::is_contiguous says false for some empty shapes
                None => {
                    owned = plan.moved.to_vec::<T>()?;
                    &owned
                }
            };
            let r = if max {
                reduce_runs(v, plan.run, outputs, extreme_run::<T, true>)
            } else {
                reduce_runs(v, plan.run, outputs, extreme_run::<T, false>)
            };
            Tensor::from_vec(r, out_shape)?
        });
        if !self.dtype().is_float() {
            return Ok(out);
        }
        let keep_shape = if self.rank() == 0 {
            vec![]
        } else {
            plan.keep_shape.clone()
        };
        let dims = if self.rank() == 0 {
            vec![]
        } else {
            plan.dims.iter().map(|&d| d as isize).collect()
        };
        Ok(attach(out, || ExtremeBackward {
            op,
            input: self.clone(),
            dims,
            keep_shape,
        }))
    }

    /// Index (i64) of the largest element along `dim`, like `torch.argmax(x, dim, keepdim)`:
    /// the first occurrence on ties, and NaN counts as larger than everything.
    pub fn argmax(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        self.arg_extreme("argmax", dim, keepdim, true)
    }

    /// Index (i64) of the smallest element along `dim`, like `torch.argmin(x, dim, keepdim)`:
    /// the first occurrence on ties, and NaN counts as smaller than everything.
    pub fn argmin(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        self.arg_extreme("argmin", dim, keepdim, false)
    }

    fn arg_extreme(
        &self,
        op: &'static str,
        dim: isize,
        keepdim: bool,
        max: bool,
    ) -> Result<Tensor> {
        let t = as_vector_if_scalar(op, self, &[dim])?;
        let dims = [dim];
        let plan = ReducePlan::new(op, &t, if self.rank() == 0 { &[] } else { &dims })?;
        if plan.run == 0 {
            return Err(empty_reduction(op, self, &plan.dims));
        }
        let outputs: usize = plan.drop_shape.iter().product();
        let out_shape = if self.rank() == 0 {
            &[][..]
        } else {
            plan.out_shape(keepdim)
        };
        let idx = with_dtype!(self.dtype(), T => {
            let owned: Vec<T>;
            let v = match plan.moved.as_contiguous_slice::<T>()? {
                Some(v) => v,
                // Layout::is_contiguous says false for some empty shapes
                None => {
                    owned = plan.moved.to_vec::<T>()?;
                    &owned
                }
            };
            if max {
                reduce_runs(v, plan.run, outputs, arg_extreme_run::<T, true>)
            } else {
                reduce_runs(v, plan.run, outputs, arg_extreme_run::<T, false>)
            }
        });
        Tensor::from_vec(idx, out_shape)
    }
}

// ------------------------------------------------------------------------------------------------
// var / std

fn var_run<F: Float>(r: &[F], correction: usize) -> F {
    let n = r.len() as f64;
    let mean = sum_f64(r) / n;
    let ss = sq_dev_f64(r, mean);
    F::from_f64(ss / (n - correction as f64).max(0.0))
}

struct VarBackward {
    input: Tensor,
    dims: Vec<isize>,
    keep_shape: Vec<usize>,
    correction: usize,
    run: usize,
    std: bool,
}

impl Backward for VarBackward {
    fn name(&self) -> &'static str {
        if self.std { "std" } else { "var" }
    }
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.input]
    }
    fn backward(&self, out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let x = &self.input;
        let mut g = g.to_dtype(x.dtype())?.reshape(&self.keep_shape)?;
        if self.std {
            // d std = d var / (2 std), taken as 0 where std is 0 (as PyTorch does)
            let s = out.reshape(&self.keep_shape)?;
            let zero = s.eq_(&Tensor::zeros(&[], s.dtype(), s.device())?)?;
            g = g.div(&s.mul_scalar(2.0)?)?.masked_fill(&zero, 0.0)?;
        }
        let mean = x.mean_dims(&self.dims, true)?;
        let scale = 2.0 / (self.run as f64 - self.correction as f64).max(0.0);
        Ok(vec![Some(x.sub(&mean)?.mul(&g)?.mul_scalar(scale)?)])
    }
}

impl Tensor {
    /// Variance over `dims` (empty = all) with `correction` subtracted from the count, like
    /// `torch.var(x, dims, correction=c, keepdim)`: 1 is the unbiased default, 0 the biased one.
    /// Two-pass in f64; NaN for an empty reduction, inf or NaN when count <= correction.
    pub fn var(&self, dims: &[isize], correction: usize, keepdim: bool) -> Result<Tensor> {
        self.var_impl("var", dims, correction, keepdim, false)
    }

    /// Standard deviation over `dims`, the square root of [`Tensor::var`] with the same
    /// arguments.
    pub fn std(&self, dims: &[isize], correction: usize, keepdim: bool) -> Result<Tensor> {
        self.var_impl("std", dims, correction, keepdim, true)
    }

    fn var_impl(
        &self,
        op: &'static str,
        dims: &[isize],
        correction: usize,
        keepdim: bool,
        std: bool,
    ) -> Result<Tensor> {
        self.ensure_float(op)?;
        let plan = ReducePlan::new(op, self, dims)?;
        let outputs: usize = plan.drop_shape.iter().product();
        let out = with_float!(plan.moved.float_data(op)?, v => {
            let mut r = reduce_runs(&v, plan.run, outputs, |r| var_run(r, correction));
            if std {
                r.iter_mut().for_each(|x| *x = x.sqrt());
            }
            Tensor::from_float_vec(r, plan.out_shape(keepdim), self.dtype())?
        });
        Ok(attach(out, || VarBackward {
            input: self.clone(),
            dims: plan.dims.iter().map(|&d| d as isize).collect(),
            keep_shape: plan.keep_shape.clone(),
            correction,
            run: plan.run,
            std,
        }))
    }
}

// ------------------------------------------------------------------------------------------------
// logsumexp

fn lse_runs<F: Elem>(v: &[F], run: usize, outputs: usize) -> Vec<F> {
    let simd = has_avx2();
    reduce_runs(v, run, outputs, |r| {
        F::from_f64(simd_call!(simd, row_lse_avx2, row_lse(r)))
    })
}

struct LogSumExpBackward {
    input: Tensor,
    keep_shape: Vec<usize>,
}

impl Backward for LogSumExpBackward {
    fn name(&self) -> &'static str {
        "logsumexp"
    }
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.input]
    }
    fn backward(&self, out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        // d lse / dx = softmax(x); a slice that is all -inf gets 0 (its lse is -inf), which
        // x - (+inf) gives without a 0/0
        let x = &self.input;
        let lse = out.reshape(&self.keep_shape)?;
        let neg_inf = lse.eq_(&Tensor::full(
            f64::NEG_INFINITY,
            &[],
            lse.dtype(),
            lse.device(),
        )?)?;
        let lse = lse.masked_fill(&neg_inf, f64::INFINITY)?;
        let g = g.to_dtype(x.dtype())?.reshape(&self.keep_shape)?;
        Ok(vec![Some(x.sub(&lse)?.exp()?.mul(&g)?)])
    }
}

impl Tensor {
    /// log(sum(exp(x))) over `dim`, computed stably as max + log(sum(exp(x - max))), like
    /// `torch.logsumexp`: -inf for an empty or all -inf slice, +inf when a +inf is present.
    pub fn logsumexp(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        const OP: &str = "logsumexp";
        self.ensure_float(OP)?;
        let t = as_vector_if_scalar(OP, self, &[dim])?;
        let dims = [dim];
        let plan = ReducePlan::new(OP, &t, if self.rank() == 0 { &[] } else { &dims })?;
        let outputs: usize = plan.drop_shape.iter().product();
        let keep_shape = if self.rank() == 0 {
            vec![]
        } else {
            plan.keep_shape.clone()
        };
        let out_shape = if self.rank() == 0 {
            &[][..]
        } else {
            plan.out_shape(keepdim)
        };
        let out = with_float!(plan.moved.float_data(OP)?, v => {
            Tensor::from_float_vec(lse_runs(&v, plan.run, outputs), out_shape, self.dtype())?
        });
        Ok(attach(out, || LogSumExpBackward {
            input: self.clone(),
            keep_shape,
        }))
    }
}

// ------------------------------------------------------------------------------------------------
// cumsum

/// Inclusive prefix sums along the middle dim of `[outer, n, inner]` data (suffix sums when
/// `reverse`), accumulated in f64 like PyTorch's CPU kernel.
fn cumsum_kernel<F: Float>(v: &[F], n: usize, inner: usize, reverse: bool) -> Vec<F> {
    let mut out = vec![F::zero(); v.len()];
    if v.is_empty() {
        return out;
    }
    let slab = n * inner;
    let run = |(o, x): (&mut [F], &[F])| {
        let mut acc = vec![0f64; inner];
        for k in 0..n {
            let i = if reverse { n - 1 - k } else { k };
            let (orow, xrow) = (
                &mut o[i * inner..(i + 1) * inner],
                &x[i * inner..(i + 1) * inner],
            );
            for ((a, o), &x) in acc.iter_mut().zip(orow).zip(xrow) {
                *a += x.to_f64();
                *o = F::from_f64(*a);
            }
        }
    };
    if v.len() >= 2 * PAR_ELEMS && v.len() > slab {
        out.par_chunks_mut(slab)
            .zip(v.par_chunks(slab))
            .for_each(run);
    } else {
        out.chunks_mut(slab).zip(v.chunks(slab)).for_each(run);
    }
    out
}

/// Integer prefix sums (wrapping on overflow, as PyTorch's int64 arithmetic does).
fn cumsum_int(v: &[i64], n: usize, inner: usize) -> Vec<i64> {
    let mut out = vec![0i64; v.len()];
    for (o, x) in out
        .chunks_mut((n * inner).max(1))
        .zip(v.chunks((n * inner).max(1)))
    {
        for i in 0..n {
            for j in 0..inner {
                let prev = if i == 0 { 0 } else { o[(i - 1) * inner + j] };
                o[i * inner + j] = prev.wrapping_add(x[i * inner + j]);
            }
        }
    }
    out
}

struct CumsumBackward {
    input: Tensor,
    n: usize,
    inner: usize,
}

impl Backward for CumsumBackward {
    fn name(&self) -> &'static str {
        "cumsum"
    }
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.input]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let x = &self.input;
        let g = g.to_dtype(x.dtype())?;
        let dx = with_float!(g.float_data("cumsum")?, v => {
            Tensor::from_float_vec(cumsum_kernel(&v, self.n, self.inner, true), x.shape(), x.dtype())?
        });
        Ok(vec![Some(dx)])
    }
}

impl Tensor {
    /// Inclusive cumulative sum along `dim`, like `torch.cumsum`. Floats keep their dtype
    /// (accumulating in f64); integer inputs give i64, as in PyTorch.
    pub fn cumsum(&self, dim: isize) -> Result<Tensor> {
        const OP: &str = "cumsum";
        let d = resolve_dim_scalar_ok(OP, dim, self.shape())?;
        let (n, inner) = if self.rank() == 0 {
            (1, 1)
        } else {
            (self.shape()[d], self.shape()[d + 1..].iter().product())
        };
        if !self.dtype().is_float() {
            let v: Vec<i64> = match self.dtype() {
                DType::I64 => self.to_vec::<i64>()?,
                DType::U32 => self.to_vec::<u32>()?.into_iter().map(i64::from).collect(),
                DType::U8 => self.to_vec::<u8>()?.into_iter().map(i64::from).collect(),
                d => return Err(Error::unsupported_dtype(OP, d, "unexpected integer dtype")),
            };
            return Tensor::from_vec(cumsum_int(&v, n, inner), self.shape());
        }
        let out = with_float!(self.float_data(OP)?, v => {
            Tensor::from_float_vec(cumsum_kernel(&v, n, inner, false), self.shape(), self.dtype())?
        });
        Ok(attach(out, || CumsumBackward {
            input: self.clone(),
            n,
            inner,
        }))
    }
}
