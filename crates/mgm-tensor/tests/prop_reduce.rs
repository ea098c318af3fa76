//! Property tests of the reductions (max/min, argmax/argmin, var/std, logsumexp, cumsum) against
//! plain f64 loops, their gradients, and their errors.
mod common;
use common::*;
use mgm_tensor::{DType, Device, Tensor};
use proptest::prelude::*;

// ------------------------------------------------------------------------------------------------
// reference helpers (independent of the library)

/// Resolves a dim selection: bit k of `mask` picks dim k, bit k of `neg` writes it negatively.
fn pick_dims(rank: usize, mask: u32, neg: u32) -> (Vec<isize>, Vec<usize>) {
    let mut dims = Vec::new();
    let mut resolved = Vec::new();
    for k in 0..rank {
        if mask >> k & 1 == 1 {
            resolved.push(k);
            dims.push(if neg >> k & 1 == 1 {
                k as isize - rank as isize
            } else {
                k as isize
            });
        }
    }
    (dims, resolved)
}

/// The values of each output element of a reduction over `dims` (empty = all), in output order;
/// within a group, in row-major order of the reduced dims.
fn groups(vals: &[f64], shape: &[usize], dims: &[usize]) -> Vec<Vec<f64>> {
    let dims: Vec<usize> = if dims.is_empty() {
        (0..shape.len()).collect()
    } else {
        dims.to_vec()
    };
    let kept: Vec<usize> = (0..shape.len()).filter(|d| !dims.contains(d)).collect();
    let outputs: usize = kept.iter().map(|&d| shape[d]).product();
    let mut g = vec![Vec::new(); outputs];
    for (i, &v) in vals.iter().enumerate() {
        let idx = unravel(i, shape);
        let mut o = 0;
        for &d in &kept {
            o = o * shape[d] + idx[d];
        }
        g[o].push(v);
    }
    g
}

fn out_shape(shape: &[usize], dims: &[usize], keepdim: bool) -> Vec<usize> {
    let all = dims.is_empty();
    let mut s = Vec::new();
    for (k, &d) in shape.iter().enumerate() {
        if all || dims.contains(&k) {
            if keepdim {
                s.push(1);
            }
        } else {
            s.push(d);
        }
    }
    s
}

fn ref_max(g: &[f64], max: bool) -> f64 {
    let mut m = g[0];
    for &x in g {
        if x.is_nan() {
            return f64::NAN;
        }
        if (max && x > m) || (!max && x < m) {
            m = x;
        }
    }
    m
}

fn ref_argmax(g: &[f64], max: bool) -> i64 {
    let mut best = 0;
    for (i, &x) in g.iter().enumerate() {
        if x.is_nan() {
            return i as i64;
        }
        let b = g[best];
        if (max && x > b) || (!max && x < b) {
            best = i;
        }
    }
    best as i64
}

fn ref_var(g: &[f64], correction: usize) -> f64 {
    let n = g.len() as f64;
    let mean = g.iter().sum::<f64>() / n;
    let ss: f64 = g.iter().map(|x| (x - mean) * (x - mean)).sum();
    ss / (n - correction as f64).max(0.0)
}

fn ref_lse(g: &[f64]) -> f64 {
    let m = g.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if g.iter().any(|x| x.is_nan()) {
        return f64::NAN;
    }
    if m.is_infinite() {
        return m;
    }
    m + g.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// Elementwise comparison where NaN must match NaN (for ops whose reference is NaN).
fn assert_close_nan(actual: &[f64], expected: &[f64], tol: f64, ctx: &str) {
    assert_eq!(actual.len(), expected.len(), "{ctx}: lengths");
    for (i, (&a, &r)) in actual.iter().zip(expected).enumerate() {
        let ok = if r.is_nan() {
            a.is_nan()
        } else if r.is_infinite() {
            a == r
        } else {
            (a - r).abs() <= tol * (1.0 + r.abs())
        };
        assert!(ok, "{ctx}: element {i}: got {a}, reference {r}");
    }
}

fn tol_of(dtype: DType) -> f64 {
    if dtype == DType::BF16 || dtype == DType::F16 {
        1e-2
    } else {
        1e-5
    }
}

fn any_dtype() -> impl Strategy<Value = DType> {
    prop_oneof![
        Just(DType::F32),
        Just(DType::F64),
        Just(DType::BF16),
        Just(DType::F16),
        Just(DType::I64),
        Just(DType::U32),
        Just(DType::U8)
    ]
}

fn float_dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::F64), Just(DType::BF16)]
}

/// Test values: small integers for integer dtypes (ties included), uniform otherwise; a few NaN
/// when asked (float dtypes only).
fn test_values(seed: u64, n: usize, dtype: DType, nan: bool) -> Vec<f64> {
    let v = values(seed, n, 4.0);
    if !dtype.is_float() {
        return v.iter().map(|x| (x + 4.0).floor()).collect();
    }
    v.iter()
        .enumerate()
        .map(|(i, &x)| if nan && i % 7 == 3 { f64::NAN } else { x })
        .collect()
}

fn cfg() -> ProptestConfig {
    ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    }
}

// ------------------------------------------------------------------------------------------------
// forward properties

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn max_min_dims_match_reference(
        shape in shape_strategy(4, 4), mask in any::<u32>(), neg in any::<u32>(), keepdim in any::<bool>(),
        kind in view_kind(), dtype in any_dtype(), seed in any::<u64>(), nan in any::<bool>(), max in any::<bool>(),
    ) {
        let n: usize = shape.iter().product();
        let t = make_view(&test_values(seed, n, dtype, nan), &shape, kind, dtype);
        let vals = t.to_vec_f64().unwrap();
        let (dims, resolved) = pick_dims(shape.len(), mask, neg);
        let res = if max { t.max_dims(&dims, keepdim) } else { t.min_dims(&dims, keepdim) };
        let g = groups(&vals, &shape, &resolved);
        let run: usize = if resolved.is_empty() { n } else { resolved.iter().map(|&d| shape[d]).product() };
        if run == 0 {
            let err = res.expect_err("reducing a size-0 dim must fail").to_string();
            prop_assert!(err.contains(if max { "max" } else { "min" }), "{err}");
            return Ok(());
        }
        let out = res.unwrap();
        prop_assert_eq!(out.dtype(), dtype);
        prop_assert_eq!(out.shape(), &out_shape(&shape, &resolved, keepdim)[..]);
        let expected: Vec<f64> = g.iter().map(|g| ref_max(g, max)).collect();
        assert_close_nan(&out.to_vec_f64().unwrap(), &expected, 0.0, "max_dims");
    }

    #[test]
    fn max_one_dim_matches_reference(
        shape in shape_strategy_min(1, 4, 1, 5), dim_seed in any::<usize>(), neg in any::<bool>(), keepdim in any::<bool>(),
        kind in view_kind(), dtype in any_dtype(), seed in any::<u64>(),
    ) {
        let n: usize = shape.iter().product();
        let t = make_view(&test_values(seed, n, dtype, false), &shape, kind, dtype);
        let vals = t.to_vec_f64().unwrap();
        let d = dim_seed % shape.len();
        let dim = if neg { d as isize - shape.len() as isize } else { d as isize };
        let g = groups(&vals, &shape, &[d]);
        let mx = t.max(dim, keepdim).unwrap();
        let mn = t.min(dim, keepdim).unwrap();
        prop_assert_eq!(mx.shape(), &out_shape(&shape, &[d], keepdim)[..]);
        assert_close(&mx.to_vec_f64().unwrap(), &g.iter().map(|g| ref_max(g, true)).collect::<Vec<_>>(), "max");
        assert_close(&mn.to_vec_f64().unwrap(), &g.iter().map(|g| ref_max(g, false)).collect::<Vec<_>>(), "min");
    }

    #[test]
    fn argmax_argmin_match_reference(
        shape in shape_strategy_min(1, 4, 0, 5), dim_seed in any::<usize>(), neg in any::<bool>(), keepdim in any::<bool>(),
        kind in view_kind(), dtype in any_dtype(), seed in any::<u64>(), nan in any::<bool>(), ties in any::<bool>(),
    ) {
        let n: usize = shape.iter().product();
        let mut v = test_values(seed, n, dtype, nan);
        if ties {
            // few distinct values so ties are common: the first occurrence must win
            v.iter_mut().for_each(|x| if !x.is_nan() { *x = x.round() });
        }
        let t = make_view(&v, &shape, kind, dtype);
        let vals = t.to_vec_f64().unwrap();
        let d = dim_seed % shape.len();
        let dim = if neg { d as isize - shape.len() as isize } else { d as isize };
        if shape[d] == 0 {
            let err = t.argmax(dim, keepdim).expect_err("argmax over an empty dim must fail").to_string();
            prop_assert!(err.contains("argmax"), "{err}");
            prop_assert!(t.argmin(dim, keepdim).is_err());
            return Ok(());
        }
        let g = groups(&vals, &shape, &[d]);
        let am = t.argmax(dim, keepdim).unwrap();
        let an = t.argmin(dim, keepdim).unwrap();
        prop_assert_eq!(am.dtype(), DType::I64);
        prop_assert_eq!(am.shape(), &out_shape(&shape, &[d], keepdim)[..]);
        prop_assert_eq!(am.to_vec::<i64>().unwrap(), g.iter().map(|g| ref_argmax(g, true)).collect::<Vec<_>>());
        prop_assert_eq!(an.to_vec::<i64>().unwrap(), g.iter().map(|g| ref_argmax(g, false)).collect::<Vec<_>>());
    }

    #[test]
    fn var_std_match_reference(
        shape in shape_strategy(4, 4), mask in any::<u32>(), neg in any::<u32>(), keepdim in any::<bool>(),
        kind in view_kind(), dtype in float_dtype(), seed in any::<u64>(), correction in 0usize..3, offset in prop_oneof![Just(0.0), Just(1000.0)],
    ) {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = values(seed, n, 2.0).iter().map(|x| x + offset).collect();
        let t = make_view(&v, &shape, kind, dtype);
        let vals = t.to_vec_f64().unwrap();
        let (dims, resolved) = pick_dims(shape.len(), mask, neg);
        let g = groups(&vals, &shape, &resolved);
        let var = t.var(&dims, correction, keepdim).unwrap();
        let std = t.std(&dims, correction, keepdim).unwrap();
        prop_assert_eq!(var.shape(), &out_shape(&shape, &resolved, keepdim)[..]);
        let ev: Vec<f64> = g.iter().map(|g| ref_var(g, correction)).collect();
        let es: Vec<f64> = ev.iter().map(|v| v.sqrt()).collect();
        assert_close_nan(&var.to_vec_f64().unwrap(), &ev, tol_of(dtype), "var");
        assert_close_nan(&std.to_vec_f64().unwrap(), &es, tol_of(dtype), "std");
    }

    #[test]
    fn logsumexp_matches_reference(
        shape in shape_strategy_min(1, 3, 0, 40), dim_seed in any::<usize>(), keepdim in any::<bool>(),
        kind in view_kind(), dtype in float_dtype(), seed in any::<u64>(), mode in 0u8..4,
    ) {
        let n: usize = shape.iter().product();
        let mut v = values(seed, n, 30.0);
        match mode {
            1 => v.iter_mut().enumerate().for_each(|(i, x)| if i % 3 == 0 { *x = f64::NEG_INFINITY }),
            2 => v.iter_mut().for_each(|x| *x = f64::NEG_INFINITY),
            3 => v.iter_mut().enumerate().for_each(|(i, x)| if i % 11 == 5 { *x = f64::INFINITY }),
            _ => {}
        }
        let t = make_view(&v, &shape, kind, dtype);
        let vals = t.to_vec_f64().unwrap();
        let d = dim_seed % shape.len();
        let g = groups(&vals, &shape, &[d]);
        let out = t.logsumexp(d as isize - shape.len() as isize, keepdim).unwrap();
        prop_assert_eq!(out.shape(), &out_shape(&shape, &[d], keepdim)[..]);
        let expected: Vec<f64> = g.iter().map(|g| ref_lse(g)).collect();
        assert_close_nan(&out.to_vec_f64().unwrap(), &expected, tol_of(dtype), "logsumexp");
    }

    #[test]
    fn cumsum_matches_reference(
        shape in shape_strategy_min(1, 4, 0, 5), dim_seed in any::<usize>(), neg in any::<bool>(),
        kind in view_kind(), dtype in any_dtype(), seed in any::<u64>(),
    ) {
        let n: usize = shape.iter().product();
        let t = make_view(&test_values(seed, n, dtype, false), &shape, kind, dtype);
        let vals = t.to_vec_f64().unwrap();
        let d = dim_seed % shape.len();
        let dim = if neg { d as isize - shape.len() as isize } else { d as isize };
        let out = t.cumsum(dim).unwrap();
        prop_assert_eq!(out.shape(), &shape[..]);
        prop_assert_eq!(out.dtype(), if dtype.is_float() { dtype } else { DType::I64 });
        let st = strides(&shape);
        let expected: Vec<f64> = (0..n).map(|i| {
            let idx = unravel(i, &shape);
            (0..=idx[d]).map(|k| vals[i - (idx[d] - k) * st[d]]).sum()
        }).collect();
        let tol = if dtype.is_half() { 2e-2 } else { 1e-6 };
        assert_close_tol(&out.to_vec_f64().unwrap(), &expected, tol, "cumsum");
    }
}

// ------------------------------------------------------------------------------------------------
// fixed cases: scalars, large inputs (parallel paths), ties, NaN, errors

#[test]
fn reductions_of_rank0_tensors() {
    let t = Tensor::scalar(2.5f32);
    assert_eq!(t.max(0, false).unwrap().to_vec_f64().unwrap(), vec![2.5]);
    assert_eq!(t.min(-1, true).unwrap().shape(), &[] as &[usize]);
    assert_eq!(
        t.argmax(0, false).unwrap().to_vec::<i64>().unwrap(),
        vec![0]
    );
    assert_eq!(
        t.logsumexp(0, false).unwrap().to_vec_f64().unwrap(),
        vec![2.5]
    );
    assert_eq!(t.cumsum(0).unwrap().to_vec_f64().unwrap(), vec![2.5]);
    assert_eq!(
        t.max_dims(&[], false).unwrap().to_vec_f64().unwrap(),
        vec![2.5]
    );
    assert!(t.max(1, false).is_err());
}

#[test]
fn large_reductions_match_reference() {
    // > 2^16 elements so the rayon paths run; rows of 1031 exercise the lane remainders
    let shape = [70usize, 1031];
    let v = values(9, 70 * 1031, 10.0);
    let t = Tensor::from_vec(v.clone(), &shape)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let vals = t.to_vec_f64().unwrap();
    for d in [0usize, 1] {
        let g = groups(&vals, &shape, &[d]);
        let ctx = format!("dim {d}");
        assert_close(
            &t.max(d as isize, false).unwrap().to_vec_f64().unwrap(),
            &g.iter().map(|g| ref_max(g, true)).collect::<Vec<_>>(),
            &ctx,
        );
        assert_close(
            &t.logsumexp(d as isize, false)
                .unwrap()
                .to_vec_f64()
                .unwrap(),
            &g.iter().map(|g| ref_lse(g)).collect::<Vec<_>>(),
            &ctx,
        );
        assert_close(
            &t.var(&[d as isize], 1, false)
                .unwrap()
                .to_vec_f64()
                .unwrap(),
            &g.iter().map(|g| ref_var(g, 1)).collect::<Vec<_>>(),
            &ctx,
        );
        let am: Vec<i64> = g.iter().map(|g| ref_argmax(g, true)).collect();
        assert_eq!(
            t.argmax(d as isize, false)
                .unwrap()
                .to_vec::<i64>()
                .unwrap(),
            am,
            "{ctx}"
        );
    }
    let cs = t.cumsum(0).unwrap().to_vec_f64().unwrap();
    let mut acc = vec![0f64; 1031];
    for r in 0..70 {
        for c in 0..1031 {
            acc[c] += vals[r * 1031 + c];
        }
        assert_close(&cs[r * 1031..(r + 1) * 1031], &acc, "cumsum rows");
    }
}

#[test]
fn max_gradient_is_split_among_ties() {
    let x = Tensor::from_vec(vec![1.0f64, 3.0, 3.0, 2.0, 5.0, 5.0, 5.0, 0.0], &[2, 4]).unwrap();
    let v = mgm_tensor::Var::from_tensor(&x).unwrap();
    let loss = v.as_tensor().max(1, false).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    let gx = g.get_var(&v).unwrap().to_vec::<f64>().unwrap();
    let third = 1.0 / 3.0;
    assert_close(
        &gx,
        &[0.0, 0.5, 0.5, 0.0, third, third, third, 0.0],
        "max tie gradient",
    );
    let loss = v.as_tensor().min_dims(&[], false).unwrap();
    let g = loss.backward().unwrap();
    assert_eq!(
        g.get_var(&v).unwrap().to_vec::<f64>().unwrap(),
        vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    );
}

#[test]
fn nan_propagates_through_max_and_wins_argmax() {
    let x = Tensor::from_vec(vec![1.0f32, f32::NAN, 7.0, f32::NAN], &[4]).unwrap();
    assert!(x.max(0, false).unwrap().to_scalar_f64().unwrap().is_nan());
    assert!(x.min(0, false).unwrap().to_scalar_f64().unwrap().is_nan());
    assert_eq!(x.argmax(0, false).unwrap().to_scalar::<i64>().unwrap(), 1);
    assert_eq!(x.argmin(0, false).unwrap().to_scalar::<i64>().unwrap(), 1);
}

#[test]
fn empty_reductions_follow_pytorch() {
    let t = Tensor::zeros(&[3, 0], DType::F32, Device::Cpu).unwrap();
    assert_eq!(t.sum(1, false).unwrap().to_vec_f64().unwrap(), vec![0.0; 3]);
    assert!(
        t.mean(1, false)
            .unwrap()
            .to_vec_f64()
            .unwrap()
            .iter()
            .all(|x| x.is_nan())
    );
    assert!(
        t.var(&[1], 1, false)
            .unwrap()
            .to_vec_f64()
            .unwrap()
            .iter()
            .all(|x| x.is_nan())
    );
    assert_eq!(
        t.logsumexp(1, false).unwrap().to_vec_f64().unwrap(),
        vec![f64::NEG_INFINITY; 3]
    );
    // reducing the non-empty dim of an empty tensor is fine and empty
    assert_eq!(t.max(0, false).unwrap().shape(), &[0]);
    for (op, r) in [
        ("max", t.max(1, false)),
        ("min", t.min(-1, true)),
        ("max", t.max_dims(&[], false)),
        ("argmax", t.argmax(1, false)),
        ("argmin", t.argmin(1, false)),
    ] {
        let e = r.expect_err("empty reduction must fail").to_string();
        assert!(e.contains(op) && e.contains("[3, 0]"), "{op}: {e}");
    }
}

#[test]
fn reduction_errors_name_the_op() {
    let t = Tensor::zeros(&[2, 3], DType::F32, Device::Cpu).unwrap();
    let i = Tensor::zeros(&[2, 3], DType::I64, Device::Cpu).unwrap();
    let cases = [
        ("max", t.max(2, false).map(|_| ())),
        ("min", t.min_dims(&[0, -2], false).map(|_| ())),
        ("argmin", t.argmin(-3, false).map(|_| ())),
        ("var", t.var(&[5], 1, false).map(|_| ())),
        ("var", i.var(&[0], 1, false).map(|_| ())),
        ("std", i.std(&[0], 1, false).map(|_| ())),
        ("logsumexp", i.logsumexp(0, false).map(|_| ())),
        ("logsumexp", t.logsumexp(2, false).map(|_| ())),
        ("cumsum", t.cumsum(2).map(|_| ())),
    ];
    for (op, r) in cases {
        let e = r.expect_err("bad input must fail").to_string();
        assert!(e.contains(op), "{op}: {e}");
    }
    // integer max works and keeps the dtype
    let m = Tensor::from_vec(vec![3i64, -7, 9, 2], &[2, 2])
        .unwrap()
        .max(1, false)
        .unwrap();
    assert_eq!(m.to_vec::<i64>().unwrap(), vec![3, 9]);
}

// ------------------------------------------------------------------------------------------------
// gradients

#[test]
fn reduction_gradients_match_finite_differences() {
    let x = Tensor::from_vec(values(11, 24, 2.0), &[2, 3, 4]).unwrap();
    grad_check("max", std::slice::from_ref(&x), &[true], |x| {
        x[0].max(1, false)
    });
    grad_check("min", std::slice::from_ref(&x), &[true], |x| {
        x[0].min(-1, true)
    });
    grad_check("max_dims", std::slice::from_ref(&x), &[true], |x| {
        x[0].max_dims(&[0, 2], false)
    });
    grad_check("min_dims_all", std::slice::from_ref(&x), &[true], |x| {
        x[0].min_dims(&[], false)
    });
    grad_check("var", std::slice::from_ref(&x), &[true], |x| {
        x[0].var(&[0, -1], 1, false)
    });
    grad_check("var_biased", std::slice::from_ref(&x), &[true], |x| {
        x[0].var(&[1], 0, true)
    });
    grad_check("std", std::slice::from_ref(&x), &[true], |x| {
        x[0].std(&[2], 1, false)
    });
    grad_check("std_all", std::slice::from_ref(&x), &[true], |x| {
        x[0].std(&[], 2, false)
    });
    grad_check("logsumexp", std::slice::from_ref(&x), &[true], |x| {
        x[0].logsumexp(1, false)
    });
    grad_check("logsumexp_last", std::slice::from_ref(&x), &[true], |x| {
        x[0].logsumexp(-1, true)
    });
    grad_check("cumsum0", std::slice::from_ref(&x), &[true], |x| {
        x[0].cumsum(0)
    });
    grad_check("cumsum_last", std::slice::from_ref(&x), &[true], |x| {
        x[0].cumsum(-1)
    });
    // through a non-contiguous view
    grad_check("cumsum_t", std::slice::from_ref(&x), &[true], |x| {
        x[0].transpose(0, 2)?.cumsum(1)
    });
    grad_check("max_t", std::slice::from_ref(&x), &[true], |x| {
        x[0].transpose(1, 2)?.max(-1, false)
    });
}

#[test]
fn std_gradient_is_zero_for_constant_slices() {
    let x = Tensor::from_vec(vec![2.0f64; 6], &[2, 3]).unwrap();
    let v = mgm_tensor::Var::from_tensor(&x).unwrap();
    let g = v
        .as_tensor()
        .std(&[1], 1, false)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(
        g.get_var(&v).unwrap().to_vec::<f64>().unwrap(),
        vec![0.0; 6]
    );
}

#[test]
fn logsumexp_gradient_of_all_neg_inf_slice_is_zero() {
    let x = Tensor::from_vec(
        vec![f64::NEG_INFINITY, f64::NEG_INFINITY, 0.0, 1.0],
        &[2, 2],
    )
    .unwrap();
    let v = mgm_tensor::Var::from_tensor(&x).unwrap();
    let out = v.as_tensor().logsumexp(1, false).unwrap();
    assert_eq!(out.to_vec::<f64>().unwrap()[0], f64::NEG_INFINITY);
    let g = out
        .mul(&Tensor::from_vec(vec![0.0f64, 1.0], &[2]).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gx = g.get_var(&v).unwrap().to_vec::<f64>().unwrap();
    let e = 1f64.exp();
    assert_close(&gx, &[0.0, 0.0, 1.0 / (1.0 + e), e / (1.0 + e)], "lse grad");
}
