//! Reductions over one or many dims.

use rayon::prelude::*;

use crate::autograd::{Backward, attach};
use crate::shape::resolve_dims;
use crate::tensor::with_float;
use crate::{Error, Float, Result, Tensor};

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
pub(crate) fn reduce_runs<F: Float, O: Send + Copy + Default>(
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
            let mut s = reduce_runs(&v, plan.run, outputs, |r| sum_run(r));
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
            if i < extra {
                dims.push(i as isize);
            } else if shape[i - extra] == 1 && d != 1 {
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
