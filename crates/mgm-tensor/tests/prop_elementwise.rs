//! Unary math, broadcasting binary ops, comparisons, where/masked_fill and casts against plain
//! f64 loops, on random shapes and strided views; every derivative against finite differences.

mod common;

use common::*;
use mgm_tensor::{DType, Device, Tensor, Unary};
use proptest::prelude::*;

/// The reference definitions, written from the formulas (not from the implementation).
fn unary_ref(op: Unary, x: f64) -> f64 {
    let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
    match op {
        Unary::Exp => x.exp(),
        Unary::Log => x.ln(),
        Unary::Sqrt => x.sqrt(),
        Unary::Rsqrt => 1.0 / x.sqrt(),
        Unary::Tanh => x.tanh(),
        Unary::Sigmoid => sig(x),
        Unary::Relu => x.max(0.0),
        Unary::Silu => x * sig(x),
        Unary::Gelu => 0.5 * x * (1.0 + libm_erf(x / 2f64.sqrt())),
        Unary::GeluTanh => {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
        }
        Unary::QuickGelu => x * sig(1.702 * x),
        Unary::Neg => -x,
        Unary::Abs => x.abs(),
        Unary::Sqr => x * x,
        Unary::Recip => 1.0 / x,
        Unary::Sin => x.sin(),
        Unary::Cos => x.cos(),
        Unary::Powf(e) => x.powf(e),
        Unary::Affine(a, b) => a * x + b,
        Unary::Clamp(lo, hi) => x.max(lo).min(hi),
    }
}

/// erf by its Maclaurin series (converges fast for the |x| < 3 used here), independent of libm.
fn libm_erf(x: f64) -> f64 {
    if x.abs() > 5.0 {
        return x.signum();
    }
    let mut term = x;
    let mut sum = x;
    for n in 1..200 {
        term *= -x * x / n as f64;
        let add = term / (2 * n + 1) as f64;
        sum += add;
        if add.abs() < 1e-18 {
            break;
        }
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

fn all_unary() -> Vec<Unary> {
    vec![
        Unary::Exp,
        Unary::Log,
        Unary::Sqrt,
        Unary::Rsqrt,
        Unary::Tanh,
        Unary::Sigmoid,
        Unary::Relu,
        Unary::Silu,
        Unary::Gelu,
        Unary::GeluTanh,
        Unary::QuickGelu,
        Unary::Neg,
        Unary::Abs,
        Unary::Sqr,
        Unary::Recip,
        Unary::Sin,
        Unary::Cos,
        Unary::Powf(1.7),
        Unary::Affine(-0.5, 2.0),
        Unary::Clamp(-0.3, 0.4),
    ]
}

/// Ops defined only for positive inputs get |x| + 0.1.
fn positive_domain(op: Unary) -> bool {
    matches!(
        op,
        Unary::Log | Unary::Sqrt | Unary::Rsqrt | Unary::Recip | Unary::Powf(_)
    )
}

fn dtype_strategy() -> impl Strategy<Value = DType> {
    prop_oneof![
        Just(DType::F32),
        Just(DType::F64),
        Just(DType::F16),
        Just(DType::BF16)
    ]
}

fn tol_for(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F64 => 1e-12,
        _ => 1e-2,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn unary_matches_f64_reference(shape in shape_strategy(4, 5), kind in view_kind(), dtype in dtype_strategy(), seed in 0u64..1000) {
        let n: usize = shape.iter().product();
        for op in all_unary() {
            let mut vals = values(seed, n, 3.0);
            if positive_domain(op) {
                vals.iter_mut().for_each(|v| *v = v.abs() + 0.1);
            }
            let x = make_view(&vals, &shape, kind, dtype);
            let xs = x.to_vec_f64().unwrap();
            let y = x.unary(op).unwrap();
            prop_assert_eq!(y.shape(), &shape[..]);
            prop_assert_eq!(y.dtype(), dtype);
            let want: Vec<f64> = xs.iter().map(|&v| unary_ref(op, v)).collect();
            // half precision results are rounded to 8 or 11 bits: compare relative to the value
            assert_close_tol(&y.to_vec_f64().unwrap(), &want, tol_for(dtype), &format!("{op:?} {dtype} {shape:?} {kind:?}"));
        }
    }

    #[test]
    fn binary_broadcasts_like_numpy(a_shape in shape_strategy(3, 4), b_shape in shape_strategy(3, 4), ka in view_kind(), kb in view_kind(), dtype in dtype_strategy(), seed in 0u64..1000) {
        // make b broadcastable onto a: each of b's trailing dims is either a's dim or 1
        let rank = b_shape.len().min(a_shape.len());
        let b_shape: Vec<usize> = (0..rank).map(|i| {
            let ad = a_shape[a_shape.len() - rank + i];
            if b_shape[i] % 2 == 0 { ad } else { 1 }
        }).collect();
        let out_shape = a_shape.clone();
        let na: usize = a_shape.iter().product();
        let nb: usize = b_shape.iter().product();
        let a = make_view(&values(seed, na, 2.0), &a_shape, ka, dtype);
        let bvals: Vec<f64> = values(seed + 1, nb, 2.0).iter().map(|v| if v.abs() < 0.1 { 0.5 } else { *v }).collect();
        let b = make_view(&bvals, &b_shape, kb, dtype);
        let (av, bv) = (a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
        let bidx = |i: usize| -> usize {
            let idx = unravel(i, &out_shape);
            let off = out_shape.len() - b_shape.len();
            let st = strides(&b_shape);
            b_shape.iter().enumerate().map(|(k, &d)| if d == 1 { 0 } else { idx[k + off] * st[k] }).sum()
        };
        let n: usize = out_shape.iter().product();
        type F = fn(f64, f64) -> f64;
        let cases: [(&str, F); 6] = [
            ("add", |x, y| x + y), ("sub", |x, y| x - y), ("mul", |x, y| x * y), ("div", |x, y| x / y),
            ("maximum", f64::max), ("minimum", f64::min),
        ];
        for (name, f) in cases {
            let got = match name {
                "add" => a.add(&b), "sub" => a.sub(&b), "mul" => a.mul(&b), "div" => a.div(&b),
                "maximum" => a.maximum(&b), _ => a.minimum(&b),
            }.unwrap();
            prop_assert_eq!(got.shape(), &out_shape[..]);
            let want: Vec<f64> = (0..n).map(|i| f(av[i], bv[bidx(i)])).collect();
            assert_close_tol(&got.to_vec_f64().unwrap(), &want, tol_for(dtype), &format!("{name} {dtype} {a_shape:?} {b_shape:?}"));
        }
        // broadcasting is symmetric: b op a has the same shape
        let ba = b.add(&a).unwrap();
        prop_assert_eq!(ba.shape(), &out_shape[..]);
        // comparisons give u8 0/1
        let lt = a.lt(&b).unwrap();
        prop_assert_eq!(lt.dtype(), DType::U8);
        let want: Vec<f64> = (0..n).map(|i| (av[i] < bv[bidx(i)]) as u8 as f64).collect();
        prop_assert_eq!(lt.to_vec_f64().unwrap(), want);
        let ge: Vec<f64> = a.ge(&b).unwrap().to_vec_f64().unwrap();
        let want: Vec<f64> = (0..n).map(|i| (av[i] >= bv[bidx(i)]) as u8 as f64).collect();
        prop_assert_eq!(ge, want);
        // where(a < b, a, b) == minimum
        let w = lt.where_cond(&a, &b).unwrap();
        let want: Vec<f64> = (0..n).map(|i| av[i].min(bv[bidx(i)])).collect();
        prop_assert_eq!(w.to_vec_f64().unwrap(), want);
    }

    #[test]
    fn integer_arithmetic_is_exact(shape in shape_strategy(3, 4), seed in 0u64..1000) {
        let n: usize = shape.iter().product();
        let av: Vec<i64> = values(seed, n, 1000.0).iter().map(|v| *v as i64).collect();
        let bv: Vec<i64> = values(seed + 7, n, 50.0).iter().map(|v| if (*v as i64) == 0 { 3 } else { *v as i64 }).collect();
        let a = Tensor::from_vec(av.clone(), &shape).unwrap();
        let b = Tensor::from_vec(bv.clone(), &shape).unwrap();
        prop_assert_eq!(a.add(&b).unwrap().to_vec::<i64>().unwrap(), av.iter().zip(&bv).map(|(x, y)| x + y).collect::<Vec<_>>());
        prop_assert_eq!(a.mul(&b).unwrap().to_vec::<i64>().unwrap(), av.iter().zip(&bv).map(|(x, y)| x * y).collect::<Vec<_>>());
        prop_assert_eq!(a.div(&b).unwrap().to_vec::<i64>().unwrap(), av.iter().zip(&bv).map(|(x, y)| x / y).collect::<Vec<_>>());
        prop_assert_eq!(a.maximum(&b).unwrap().to_vec::<i64>().unwrap(), av.iter().zip(&bv).map(|(x, y)| *x.max(y)).collect::<Vec<_>>());
    }

    #[test]
    fn casts_round_like_pytorch(shape in shape_strategy(3, 5), kind in view_kind(), seed in 0u64..1000) {
        let n: usize = shape.iter().product();
        let vals = values(seed, n, 300.0);
        let x = make_view(&vals, &shape, kind, DType::F64);
        let xs = x.to_vec_f64().unwrap();
        let f32s: Vec<f64> = x.to_dtype(DType::F32).unwrap().to_vec_f64().unwrap();
        prop_assert_eq!(f32s, xs.iter().map(|&v| v as f32 as f64).collect::<Vec<_>>());
        let bf: Vec<f64> = x.to_dtype(DType::BF16).unwrap().to_vec_f64().unwrap();
        prop_assert_eq!(bf, xs.iter().map(|&v| half::bf16::from_f64(v).to_f64()).collect::<Vec<_>>());
        let h: Vec<f64> = x.to_dtype(DType::F16).unwrap().to_vec_f64().unwrap();
        prop_assert_eq!(h, xs.iter().map(|&v| half::f16::from_f64(v).to_f64()).collect::<Vec<_>>());
        // float -> int truncates toward zero like torch's .long()
        let i: Vec<i64> = x.to_dtype(DType::I64).unwrap().to_vec::<i64>().unwrap();
        prop_assert_eq!(i, xs.iter().map(|&v| v.trunc() as i64).collect::<Vec<_>>());
    }
}

#[test]
fn unary_gradients_match_finite_differences() {
    for op in all_unary() {
        let mut vals = values(11, 12, 2.0);
        if positive_domain(op) {
            vals.iter_mut().for_each(|v| *v = v.abs() + 0.2);
        }
        if matches!(op, Unary::Abs | Unary::Relu) {
            // keep away from the kink at 0 where the derivative is not defined
            vals.iter_mut()
                .for_each(|v| *v = if v.abs() < 0.05 { 0.3 } else { *v });
        }
        if let Unary::Clamp(lo, hi) = op {
            vals.iter_mut().for_each(|v| {
                if (*v - lo).abs() < 0.01 || (*v - hi).abs() < 0.01 {
                    *v += 0.05
                }
            });
        }
        let x = Tensor::from_vec(vals, &[3, 4]).unwrap();
        grad_check(&format!("{op:?}"), &[x], &[true], |xs| xs[0].unary(op));
    }
}

#[test]
fn binary_gradients_reduce_broadcast_dims() {
    let a = Tensor::from_vec(values(1, 24, 2.0), &[2, 3, 4]).unwrap();
    let b = Tensor::from_vec(
        values(2, 4, 2.0).iter().map(|v| v.abs() + 0.5).collect(),
        &[1, 4],
    )
    .unwrap();
    grad_check("add", &[a.clone(), b.clone()], &[true, true], |x| {
        x[0].add(&x[1])
    });
    grad_check("sub", &[a.clone(), b.clone()], &[true, true], |x| {
        x[0].sub(&x[1])
    });
    grad_check("mul", &[a.clone(), b.clone()], &[true, true], |x| {
        x[0].mul(&x[1])
    });
    grad_check("div", &[a.clone(), b.clone()], &[true, true], |x| {
        x[0].div(&x[1])
    });
    grad_check("maximum", &[a.clone(), b.clone()], &[true, true], |x| {
        x[0].maximum(&x[1])
    });
    grad_check("minimum", &[a.clone(), b.clone()], &[true, true], |x| {
        x[0].minimum(&x[1])
    });
    let pos = a.abs().unwrap().add_scalar(0.5).unwrap();
    grad_check("pow", &[pos, b.clone()], &[true, true], |x| x[0].pow(&x[1]));
    let mask = a.gt(&b).unwrap();
    grad_check("where", &[a.clone(), b.clone()], &[true, true], |x| {
        mask.where_cond(&x[0], &x[1])
    });
    grad_check("masked_fill", std::slice::from_ref(&a), &[true], |x| {
        x[0].masked_fill(&mask, -3.0)
    });
}

#[test]
fn masked_fill_sets_masked_entries() {
    let x = Tensor::from_vec(vec![1f32, 2., 3., 4.], &[2, 2]).unwrap();
    let mask = Tensor::from_vec(vec![0u8, 1], &[1, 2]).unwrap();
    let y = x.masked_fill(&mask, f64::NEG_INFINITY).unwrap();
    assert_eq!(
        y.to_vec::<f32>().unwrap(),
        vec![1., f32::NEG_INFINITY, 3., f32::NEG_INFINITY]
    );
}

#[test]
fn binary_errors_name_op_and_shapes() {
    let a = Tensor::zeros(&[2, 3], DType::F32, Device::Cpu).unwrap();
    let b = Tensor::zeros(&[4], DType::F32, Device::Cpu).unwrap();
    let e = a.add(&b).unwrap_err().to_string();
    assert!(
        e.contains("add") && e.contains("[2, 3]") && e.contains("[4]"),
        "{e}"
    );
    let c = Tensor::zeros(&[2, 3], DType::F64, Device::Cpu).unwrap();
    let e = a.mul(&c).unwrap_err().to_string();
    assert!(e.contains("mul") && e.contains("dtype"), "{e}");
    let i = Tensor::zeros(&[2], DType::I64, Device::Cpu).unwrap();
    let e = i.exp().unwrap_err().to_string();
    assert!(e.contains("exp") && e.contains("i64"), "{e}");
    let e = i.div(&i).unwrap_err().to_string();
    assert!(e.contains("division by zero"), "{e}");
    let e = a.where_cond(&a, &a).unwrap_err().to_string();
    assert!(e.contains("where") && e.contains("u8"), "{e}");
}

#[test]
fn cuda_device_is_a_clear_error() {
    let e = Tensor::zeros(&[2], DType::F32, Device::Cuda(0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cuda:0") && e.contains("not available"), "{e}");
    let t = Tensor::zeros(&[2], DType::F32, Device::Cpu).unwrap();
    assert!(
        t.to_device(Device::Cuda(1))
            .unwrap_err()
            .to_string()
            .contains("cuda:1")
    );
}

#[test]
fn large_inputs_take_the_parallel_path_correctly() {
    // above the rayon threshold, with a broadcast operand on a strided view
    let n = 300_000;
    let a = Tensor::from_vec(
        (0..n).map(|i| (i % 97) as f32 * 0.01).collect::<Vec<_>>(),
        &[600, 500],
    )
    .unwrap();
    let b = Tensor::from_vec((0..500).map(|i| i as f32).collect::<Vec<_>>(), &[500]).unwrap();
    let at = a.t().unwrap(); // [500, 600] strided
    let y = at.add(&b.reshape(&[500, 1]).unwrap()).unwrap();
    let yv = y.to_vec::<f32>().unwrap();
    for (i, &v) in yv.iter().enumerate().step_by(997) {
        let (r, c) = (i / 600, i % 600);
        let want = ((c * 500 + r) % 97) as f32 * 0.01 + r as f32;
        assert_eq!(v, want, "at ({r}, {c})");
    }
    let g = a.gelu().unwrap().to_vec::<f32>().unwrap();
    assert!((g[96] as f64 - unary_ref(Unary::Gelu, 0.96f32 as f64)).abs() < 1e-6);
}
