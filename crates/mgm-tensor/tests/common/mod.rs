//! Shared helpers for mgm-tensor's integration tests: tolerance checks against f64 references,
//! finite-difference gradient checks, and builders for non-contiguous views.
#![allow(dead_code)]

use mgm_tensor::{DType, Device, Result, Tensor, Var, no_grad};
use proptest::prelude::*;

/// DESIGN.md section 3 elementwise tolerance: |a - r| <= tol * (1 + |r|); NaN never passes
/// (unless `r` is NaN too and `allow_nan` says so).
pub fn assert_close_tol(actual: &[f64], expected: &[f64], tol: f64, ctx: &str) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{ctx}: length {} != reference length {}",
        actual.len(),
        expected.len()
    );
    for (i, (&a, &r)) in actual.iter().zip(expected).enumerate() {
        let ok = if r.is_nan() {
            false
        } else if r.is_infinite() {
            a == r
        } else {
            (a - r).abs() <= tol * (1.0 + r.abs())
        };
        assert!(ok, "{ctx}: element {i}: got {a}, reference {r} (tol {tol})");
    }
}

/// Elementwise check at the f32 tolerance of DESIGN.md (1e-5 relative to 1 + |ref|).
pub fn assert_close(actual: &[f64], expected: &[f64], ctx: &str) {
    assert_close_tol(actual, expected, 1e-5, ctx)
}

/// Relative Frobenius error ||a - r|| / max(||r||, tiny), for matmul/attention checks.
pub fn rel_frobenius(actual: &[f64], expected: &[f64]) -> f64 {
    assert_eq!(actual.len(), expected.len());
    let num: f64 = actual
        .iter()
        .zip(expected)
        .map(|(a, r)| (a - r) * (a - r))
        .sum();
    let den: f64 = expected.iter().map(|r| r * r).sum();
    if num.is_nan() {
        return f64::INFINITY;
    }
    (num / den.max(1e-300)).sqrt()
}

/// Row-major strides.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Multi-index of flat position `i` in `shape`.
pub fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for k in (0..shape.len()).rev() {
        idx[k] = i % shape[k];
        i /= shape[k];
    }
    idx
}

/// How a test tensor is laid out in memory; every kind holds the same logical values.
#[derive(Clone, Copy, Debug)]
pub enum ViewKind {
    /// Plain contiguous.
    Contiguous,
    /// Stored with dims reversed, then permuted back (a transposed view).
    Permuted,
    /// Cut out of a larger tensor padded with NaN, so reading outside the view is caught.
    Narrowed,
}

pub fn view_kind() -> impl Strategy<Value = ViewKind> {
    prop_oneof![
        Just(ViewKind::Contiguous),
        Just(ViewKind::Permuted),
        Just(ViewKind::Narrowed)
    ]
}

/// A tensor of `dtype` holding `vals` (logical row-major order, rounded to `dtype`) laid out as
/// `kind` says. References should be computed from `t.to_vec_f64()` (the rounded values).
pub fn make_view(vals: &[f64], shape: &[usize], kind: ViewKind, dtype: DType) -> Tensor {
    let t = make_view_typed(vals, shape, kind, dtype);
    if let ViewKind::Permuted = kind {
        assert!(
            shape.iter().filter(|&&d| d > 1).count() < 2
                || shape.contains(&0)
                || !t.is_contiguous(),
            "permuted view should be strided"
        );
    }
    t
}

fn make_view_typed(vals: &[f64], shape: &[usize], kind: ViewKind, dtype: DType) -> Tensor {
    let base = Tensor::from_vec(vals.to_vec(), shape)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    match kind {
        ViewKind::Contiguous => base,
        ViewKind::Permuted => {
            let rev: Vec<usize> = (0..shape.len()).rev().collect();
            base.permute(&rev)
                .unwrap()
                .contiguous()
                .unwrap()
                .permute(&rev)
                .unwrap()
        }
        ViewKind::Narrowed => {
            let big: Vec<usize> = shape.iter().map(|d| d + 2).collect();
            let pad = Tensor::full(f64::NAN, &big, DType::F64, Device::Cpu).unwrap();
            let mut data = pad.to_vec::<f64>().unwrap();
            let bs = strides(&big);
            for (i, &v) in vals.iter().enumerate() {
                let idx = unravel(i, shape);
                let off: usize = idx.iter().zip(&bs).map(|(i, s)| (i + 1) * s).sum();
                data[off] = v;
            }
            let mut t = Tensor::from_vec(data, &big)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            for (d, &len) in shape.iter().enumerate() {
                t = t.narrow(d as isize, 1, len).unwrap();
            }
            t
        }
    }
}

/// A random shape of rank `0..=max_rank` with dims in `0..=max_dim` (size-0 and size-1 dims
/// included).
pub fn shape_strategy(max_rank: usize, max_dim: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0..=max_dim, 0..=max_rank)
}

/// Like [`shape_strategy`] but every dim at least `min_dim`.
pub fn shape_strategy_min(
    min_rank: usize,
    max_rank: usize,
    min_dim: usize,
    max_dim: usize,
) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(min_dim..=max_dim, min_rank..=max_rank)
}

/// Seeded values in [-scale, scale) for a shape.
pub fn values(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    Tensor::rand_uniform(seed, &[n], -scale, scale, DType::F64, Device::Cpu)
        .unwrap()
        .to_vec::<f64>()
        .unwrap()
}

/// Checks the gradients of `f` at `inputs` (f64 tensors) against central finite differences in
/// f64. The loss is `sum(f(x) * w)` with fixed random weights `w`, so every output element's
/// gradient path is exercised with a distinct weight. `inputs` marked `false` in `wrt` are held
/// constant (e.g. integer indices).
pub fn grad_check(
    name: &str,
    inputs: &[Tensor],
    wrt: &[bool],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) {
    let vars: Vec<Option<Var>> = inputs
        .iter()
        .zip(wrt)
        .map(|(t, &w)| {
            if w {
                Some(Var::from_tensor(t).unwrap())
            } else {
                None
            }
        })
        .collect();
    let tracked: Vec<Tensor> = vars
        .iter()
        .zip(inputs)
        .map(|(v, t)| {
            v.as_ref()
                .map(|v| v.as_tensor())
                .unwrap_or_else(|| t.clone())
        })
        .collect();
    let y = f(&tracked).unwrap_or_else(|e| panic!("{name}: forward failed: {e}"));
    let w = Tensor::rand_uniform(4242, y.shape(), 0.5, 1.5, DType::F64, Device::Cpu).unwrap();
    let loss_of = |xs: &[Tensor]| -> f64 {
        no_grad(|| {
            f(xs)
                .unwrap()
                .mul(&w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar_f64()
                .unwrap()
        })
    };
    let loss = y.mul(&w).unwrap().sum_all().unwrap();
    let grads = loss
        .backward()
        .unwrap_or_else(|e| panic!("{name}: backward failed: {e}"));
    for (k, v) in vars.iter().enumerate() {
        let Some(v) = v else { continue };
        let analytic = match grads.get_var(v) {
            Some(g) => g.to_vec_f64().unwrap(),
            None => vec![0.0; inputs[k].numel()],
        };
        let base = inputs[k].to_vec_f64().unwrap();
        let eps = 1e-6;
        for i in 0..base.len() {
            let mut plus = base.clone();
            plus[i] += eps;
            let mut minus = base.clone();
            minus[i] -= eps;
            let mut xs: Vec<Tensor> = inputs.to_vec();
            xs[k] = Tensor::from_vec(plus, inputs[k].shape()).unwrap();
            let lp = loss_of(&xs);
            xs[k] = Tensor::from_vec(minus, inputs[k].shape()).unwrap();
            let lm = loss_of(&xs);
            let fd = (lp - lm) / (2.0 * eps);
            let a = analytic[i];
            assert!(
                (a - fd).abs() <= 1e-5 * (1.0 + fd.abs()),
                "{name}: d loss / d input{k}[{i}]: backward {a}, finite difference {fd}"
            );
        }
    }
}
