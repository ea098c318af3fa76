//! Property tests of softmax, log-softmax, cross-entropy, LayerNorm and RMSNorm against plain
//! f64 loops, their fused backward passes, and their errors.
mod common;
use common::*;
use mgm_tensor::{DType, Device, Tensor, Var};
use proptest::prelude::*;

// ------------------------------------------------------------------------------------------------
// reference helpers (independent of the library)

/// Flat indices of each slice along `d`, in order along `d`.
fn slices(shape: &[usize], d: usize) -> Vec<Vec<usize>> {
    let n: usize = shape.iter().product();
    let st = strides(shape);
    (0..n)
        .filter(|&i| unravel(i, shape)[d] == 0)
        .map(|i| (0..shape[d]).map(|k| i + k * st[d]).collect())
        .collect()
}

/// Softmax / log-softmax of one slice in f64; all -inf gives zeros / -inf (DESIGN.md section 3).
fn ref_softmax(x: &[f64], log: bool) -> Vec<f64> {
    if x.iter().any(|v| v.is_nan()) {
        return vec![f64::NAN; x.len()];
    }
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return vec![if log { f64::NEG_INFINITY } else { 0.0 }; x.len()];
    }
    let s: f64 = x.iter().map(|v| (v - m).exp()).sum();
    x.iter()
        .map(|v| {
            if log {
                v - m - s.ln()
            } else {
                (v - m).exp() / s
            }
        })
        .collect()
}

/// LayerNorm / RMSNorm of one row in f64.
fn ref_norm(x: &[f64], w: Option<&[f64]>, b: Option<&[f64]>, eps: f64, rms: bool) -> Vec<f64> {
    let n = x.len() as f64;
    let mean = if rms { 0.0 } else { x.iter().sum::<f64>() / n };
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    let r = 1.0 / (var + eps).sqrt();
    x.iter()
        .enumerate()
        .map(|(i, v)| (v - mean) * r * w.map_or(1.0, |w| w[i]) + b.map_or(0.0, |b| b[i]))
        .collect()
}

/// Mean cross-entropy in f64 as torch.nn.functional.cross_entropy defines it.
fn ref_cross_entropy(x: &[f64], c: usize, t: &[i64], ignore: i64, eps: f64) -> f64 {
    let mut total = 0.0;
    let mut count = 0usize;
    for (i, &ti) in t.iter().enumerate() {
        if ti == ignore {
            continue;
        }
        let logp = ref_softmax(&x[i * c..(i + 1) * c], true);
        let nll = -logp[ti as usize];
        let smooth: f64 = -logp.iter().sum::<f64>();
        total += (1.0 - eps) * nll + eps / c as f64 * smooth;
        count += 1;
    }
    total / count as f64
}

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
    if dtype.is_half() { 1e-2 } else { 1e-5 }
}

fn float_dtype() -> impl Strategy<Value = DType> {
    prop_oneof![
        Just(DType::F32),
        Just(DType::F32),
        Just(DType::F64),
        Just(DType::BF16),
        Just(DType::F16)
    ]
}

fn cfg() -> ProptestConfig {
    ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    }
}

// ------------------------------------------------------------------------------------------------
// softmax / log-softmax

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn softmax_matches_reference(
        shape in prop_oneof![shape_strategy_min(1, 4, 0, 5), shape_strategy_min(1, 3, 1, 40)],
        dim_seed in any::<usize>(), neg in any::<bool>(), kind in view_kind(), dtype in float_dtype(),
        seed in any::<u64>(), mode in 0u8..4, log in any::<bool>(),
    ) {
        let n: usize = shape.iter().product();
        let d = dim_seed % shape.len();
        let mut v = values(seed, n, 20.0);
        // mode 1: scattered -inf; mode 2: some slices entirely -inf; mode 3: one NaN
        match mode {
            1 => v.iter_mut().enumerate().for_each(|(i, x)| if i % 3 == 1 { *x = f64::NEG_INFINITY }),
            2 => for (k, s) in slices(&shape, d).iter().enumerate() {
                if k % 2 == 0 { s.iter().for_each(|&i| v[i] = f64::NEG_INFINITY) }
            },
            3 if n > 0 => v[n / 2] = f64::NAN,
            _ => {}
        }
        let t = make_view(&v, &shape, kind, dtype);
        let vals = t.to_vec_f64().unwrap();
        let dim = if neg { d as isize - shape.len() as isize } else { d as isize };
        let out = if log { t.log_softmax(dim) } else { t.softmax(dim) }.unwrap();
        prop_assert_eq!(out.shape(), &shape[..]);
        prop_assert_eq!(out.dtype(), dtype);
        let mut expected = vec![0.0; n];
        for s in slices(&shape, d) {
            let r = ref_softmax(&s.iter().map(|&i| vals[i]).collect::<Vec<_>>(), log);
            s.iter().zip(r).for_each(|(&i, r)| expected[i] = r);
        }
        assert_close_nan(&out.to_vec_f64().unwrap(), &expected, tol_of(dtype), if log { "log_softmax" } else { "softmax" });
    }

    #[test]
    fn softmax_backward_matches_reference(
        shape in shape_strategy_min(1, 3, 1, 9), dim_seed in any::<usize>(), seed in any::<u64>(), log in any::<bool>(),
        kind in view_kind(),
    ) {
        // analytic reference: softmax dx = y (g - sum(g y)); log_softmax dx = g - p sum(g)
        let n: usize = shape.iter().product();
        let d = dim_seed % shape.len();
        let x = make_view(&values(seed, n, 3.0), &shape, kind, DType::F64);
        let g = Tensor::from_vec(values(seed ^ 1, n, 1.0), &shape).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let y = if log { xv.as_tensor().log_softmax(d as isize) } else { xv.as_tensor().softmax(d as isize) }.unwrap();
        let grads = y.mul(&g).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = grads.get_var(&xv).unwrap().to_vec::<f64>().unwrap();
        let (xs, gs) = (x.to_vec_f64().unwrap(), g.to_vec::<f64>().unwrap());
        let mut expected = vec![0.0; n];
        for s in slices(&shape, d) {
            let p = ref_softmax(&s.iter().map(|&i| xs[i]).collect::<Vec<_>>(), false);
            let gsl: Vec<f64> = s.iter().map(|&i| gs[i]).collect();
            let dot: f64 = p.iter().zip(&gsl).map(|(p, g)| p * g).sum();
            let sum: f64 = gsl.iter().sum();
            for (k, &i) in s.iter().enumerate() {
                expected[i] = if log { gsl[k] - p[k] * sum } else { p[k] * (gsl[k] - dot) };
            }
        }
        assert_close(&dx, &expected, "softmax backward");
    }
}

#[test]
fn softmax_all_masked_row_is_zero() {
    let ninf = f32::NEG_INFINITY;
    let x = Tensor::from_vec(vec![ninf, ninf, ninf, 0.0, ninf, 1.0], &[2, 3]).unwrap();
    let s = x.softmax(-1).unwrap().to_vec::<f32>().unwrap();
    assert_eq!(&s[..3], &[0.0, 0.0, 0.0]);
    assert!(s.iter().all(|v| !v.is_nan()));
    let l = x.log_softmax(-1).unwrap().to_vec::<f32>().unwrap();
    assert_eq!(&l[..3], &[ninf, ninf, ninf]);
    assert!(l.iter().all(|v| !v.is_nan()));
    // same along a non-last dim
    let s0 = x
        .t()
        .unwrap()
        .softmax(0)
        .unwrap()
        .t()
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    assert_eq!(s0, s);
    // gradients of a fully masked row are zero, never NaN
    let xv = Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
    for log in [false, true] {
        let y = if log {
            xv.as_tensor().log_softmax(1)
        } else {
            xv.as_tensor().softmax(1)
        }
        .unwrap();
        let gout = Tensor::from_vec(vec![1.0f64, 2.0, 3.0, 0.5, 0.0, 1.0], &[2, 3]).unwrap();
        let g = y.backward_with(&gout).unwrap();
        let gx = g.get_var(&xv).unwrap().to_vec::<f64>().unwrap();
        assert!(gx.iter().all(|v| v.is_finite()), "log={log}: {gx:?}");
        assert_eq!(&gx[..3], &[0.0, 0.0, 0.0]);
    }
}

#[test]
fn softmax_of_scalar_is_one() {
    assert_eq!(
        Tensor::scalar(3.0f32)
            .softmax(0)
            .unwrap()
            .to_vec::<f32>()
            .unwrap(),
        vec![1.0]
    );
    assert_eq!(
        Tensor::scalar(3.0f64)
            .log_softmax(-1)
            .unwrap()
            .to_vec::<f64>()
            .unwrap(),
        vec![0.0]
    );
}

#[test]
fn large_softmax_matches_reference() {
    // > 2^16 elements so the rayon paths run, rows not a multiple of the lane count
    for (shape, d) in [([67usize, 1031usize], 1usize), ([67, 1031], 0)] {
        let n = shape[0] * shape[1];
        let x = Tensor::from_vec(values(5, n, 30.0), &shape)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let vals = x.to_vec_f64().unwrap();
        for log in [false, true] {
            let y = if log {
                x.log_softmax(d as isize)
            } else {
                x.softmax(d as isize)
            }
            .unwrap()
            .to_vec_f64()
            .unwrap();
            let mut expected = vec![0.0; n];
            for s in slices(&shape, d) {
                let r = ref_softmax(&s.iter().map(|&i| vals[i]).collect::<Vec<_>>(), log);
                s.iter().zip(r).for_each(|(&i, r)| expected[i] = r);
            }
            assert_close(&y, &expected, &format!("dim {d} log {log}"));
        }
    }
}

#[test]
fn softmax_gradients_match_finite_differences() {
    let x = Tensor::from_vec(values(21, 24, 2.0), &[2, 3, 4]).unwrap();
    for d in [-1isize, 0, 1] {
        grad_check("softmax", std::slice::from_ref(&x), &[true], |x| {
            x[0].softmax(d)
        });
        grad_check("log_softmax", std::slice::from_ref(&x), &[true], |x| {
            x[0].log_softmax(d)
        });
    }
    grad_check("softmax_view", std::slice::from_ref(&x), &[true], |x| {
        x[0].transpose(0, 2)?.softmax(-1)
    });
    // large rows exercise the lane loops of the backward kernels
    let big = Tensor::from_vec(values(22, 2 * 37, 2.0), &[2, 37]).unwrap();
    grad_check("softmax_37", std::slice::from_ref(&big), &[true], |x| {
        x[0].softmax(1)
    });
    grad_check("log_softmax_37", &[big], &[true], |x| x[0].log_softmax(1));
}

#[test]
fn softmax_errors_name_the_op() {
    let i = Tensor::zeros(&[2, 3], DType::I64, Device::Cpu).unwrap();
    let f = Tensor::zeros(&[2, 3], DType::F32, Device::Cpu).unwrap();
    for (op, r) in [
        ("softmax", i.softmax(0)),
        ("log_softmax", i.log_softmax(0)),
        ("softmax", f.softmax(2)),
        ("log_softmax", f.log_softmax(-3)),
    ] {
        let e = r.expect_err("bad input must fail").to_string();
        assert!(e.contains(op), "{op}: {e}");
    }
}

// ------------------------------------------------------------------------------------------------
// cross-entropy

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn cross_entropy_matches_reference(
        rows in 0usize..7, classes in 1usize..40, seed in any::<u64>(), eps in prop_oneof![Just(0.0), Just(0.1), Just(0.35)],
        ignore in prop_oneof![Just(-100i64), Just(0i64)], dtype in float_dtype(), kind in view_kind(),
    ) {
        let x = make_view(&values(seed, rows * classes, 8.0), &[rows, classes], kind, dtype);
        let tv: Vec<i64> = values(seed ^ 7, rows, 1.0)
            .iter()
            .enumerate()
            .map(|(i, u)| if i % 4 == 3 { ignore } else { (((u + 1.0) / 2.0 * classes as f64) as i64).min(classes as i64 - 1) })
            .collect();
        let t = Tensor::from_vec(tv.clone(), &[rows]).unwrap();
        let loss = x.cross_entropy(&t, ignore, eps).unwrap();
        prop_assert_eq!(loss.shape(), &[] as &[usize]);
        prop_assert_eq!(loss.dtype(), dtype);
        let expected = ref_cross_entropy(&x.to_vec_f64().unwrap(), classes, &tv, ignore, eps);
        assert_close_nan(&[loss.to_scalar_f64().unwrap()], &[expected], tol_of(dtype), "cross_entropy");
    }

    #[test]
    fn cross_entropy_backward_matches_reference(
        rows in 1usize..6, classes in 1usize..20, seed in any::<u64>(), eps in prop_oneof![Just(0.0), Just(0.2)],
    ) {
        let x = Tensor::from_vec(values(seed, rows * classes, 4.0), &[rows, classes]).unwrap();
        let tv: Vec<i64> = (0..rows).map(|i| if i == 1 { -100 } else { (i * 7 % classes) as i64 }).collect();
        let t = Tensor::from_vec(tv.clone(), &[rows]).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let grads = xv.as_tensor().cross_entropy(&t, -100, eps).unwrap().mul_scalar(3.0).unwrap().backward().unwrap();
        let dx = grads.get_var(&xv).unwrap().to_vec::<f64>().unwrap();
        let xs = x.to_vec::<f64>().unwrap();
        let count = tv.iter().filter(|&&t| t != -100).count() as f64;
        let mut expected = vec![0.0; rows * classes];
        for (i, &ti) in tv.iter().enumerate() {
            if ti == -100 {
                continue;
            }
            let p = ref_softmax(&xs[i * classes..(i + 1) * classes], false);
            for c in 0..classes {
                let q = (1.0 - eps) * f64::from(c as i64 == ti) + eps / classes as f64;
                expected[i * classes + c] = 3.0 * (p[c] - q) / count;
            }
        }
        assert_close(&dx, &expected, "cross_entropy backward");
    }
}

#[test]
fn cross_entropy_gradient_matches_finite_differences() {
    let x = Tensor::from_vec(values(31, 20, 3.0), &[4, 5]).unwrap();
    let t = Tensor::from_vec(vec![2i64, -1, 4, 0], &[4]).unwrap();
    grad_check(
        "cross_entropy",
        &[x.clone(), t.clone()],
        &[true, false],
        |x| x[0].cross_entropy(&x[1], -1, 0.0),
    );
    grad_check(
        "cross_entropy_ls",
        &[x.clone(), t.clone()],
        &[true, false],
        |x| x[0].cross_entropy(&x[1], -1, 0.25),
    );
    let t2 = Tensor::from_vec(vec![2i64, 1, 4, 0], &[4]).unwrap();
    grad_check(
        "cross_entropy_view",
        &[x.t().unwrap().contiguous().unwrap(), t2],
        &[true, false],
        |x| x[0].t()?.cross_entropy(&x[1], 2, 0.1),
    );
}

#[test]
fn cross_entropy_large_matches_reference() {
    let (rows, classes) = (40usize, 1700usize);
    let x = Tensor::from_vec(values(41, rows * classes, 10.0), &[rows, classes])
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let tv: Vec<i64> = (0..rows)
        .map(|i| {
            if i % 5 == 0 {
                -100
            } else {
                (i * 37 % classes) as i64
            }
        })
        .collect();
    let t = Tensor::from_vec(tv.clone(), &[rows]).unwrap();
    let loss = x
        .cross_entropy(&t, -100, 0.1)
        .unwrap()
        .to_scalar_f64()
        .unwrap();
    let expected = ref_cross_entropy(&x.to_vec_f64().unwrap(), classes, &tv, -100, 0.1);
    assert_close(&[loss], &[expected], "cross_entropy large");
}

#[test]
fn cross_entropy_all_ignored_is_nan() {
    let x = Tensor::zeros(&[2, 3], DType::F32, Device::Cpu).unwrap();
    let t = Tensor::from_vec(vec![-100i64, -100], &[2]).unwrap();
    assert!(
        x.cross_entropy(&t, -100, 0.0)
            .unwrap()
            .to_scalar_f64()
            .unwrap()
            .is_nan()
    );
}

#[test]
fn cross_entropy_errors_name_the_problem() {
    let x = Tensor::zeros(&[2, 3], DType::F32, Device::Cpu).unwrap();
    let bad_index = x
        .cross_entropy(&Tensor::from_vec(vec![0i64, 3], &[2]).unwrap(), -100, 0.0)
        .unwrap_err()
        .to_string();
    assert!(
        bad_index.contains("cross_entropy") && bad_index.contains("target 3"),
        "{bad_index}"
    );
    let negative = x
        .cross_entropy(&Tensor::from_vec(vec![-2i64, 0], &[2]).unwrap(), -100, 0.0)
        .unwrap_err()
        .to_string();
    assert!(negative.contains("target -2"), "{negative}");
    let cases = [
        x.cross_entropy(&Tensor::from_vec(vec![0u32, 1], &[2]).unwrap(), -100, 0.0),
        x.cross_entropy(
            &Tensor::from_vec(vec![0i64, 1, 2], &[3]).unwrap(),
            -100,
            0.0,
        ),
        x.reshape(&[6]).unwrap().cross_entropy(
            &Tensor::from_vec(vec![0i64], &[1]).unwrap(),
            -100,
            0.0,
        ),
        x.cross_entropy(&Tensor::from_vec(vec![0i64, 1], &[2]).unwrap(), -100, 1.5),
        Tensor::zeros(&[2, 3], DType::I64, Device::Cpu)
            .unwrap()
            .cross_entropy(&Tensor::from_vec(vec![0i64, 1], &[2]).unwrap(), -100, 0.0),
    ];
    for r in cases {
        let e = r.expect_err("bad input must fail").to_string();
        assert!(e.contains("cross_entropy"), "{e}");
    }
}

// ------------------------------------------------------------------------------------------------
// LayerNorm / RMSNorm

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn norms_match_reference(
        shape in prop_oneof![shape_strategy_min(1, 3, 0, 5), shape_strategy_min(1, 2, 1, 70)],
        kind in view_kind(), dtype in float_dtype(), seed in any::<u64>(), rms in any::<bool>(),
        has_w in any::<bool>(), has_b in any::<bool>(), offset in prop_oneof![Just(0.0), Just(300.0)],
        eps in prop_oneof![Just(1e-5), Just(1e-6), Just(0.1)],
    ) {
        let n: usize = shape.iter().product();
        let c = *shape.last().unwrap();
        let v: Vec<f64> = values(seed, n, 2.0).iter().map(|x| x + offset).collect();
        let x = make_view(&v, &shape, kind, dtype);
        let w = Tensor::from_vec(values(seed ^ 3, c, 1.5), &[c]).unwrap().to_dtype(dtype).unwrap();
        let b = Tensor::from_vec(values(seed ^ 5, c, 1.0), &[c]).unwrap().to_dtype(dtype).unwrap();
        let (wo, bo) = (has_w.then_some(&w), (has_b && !rms).then_some(&b));
        let out = if rms { x.rms_norm(wo, eps) } else { x.layer_norm(wo, bo, eps) }.unwrap();
        prop_assert_eq!(out.shape(), &shape[..]);
        prop_assert_eq!(out.dtype(), dtype);
        let (xs, ws, bs) = (x.to_vec_f64().unwrap(), w.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
        let mut expected = Vec::with_capacity(n);
        if c > 0 {
            for row in xs.chunks(c) {
                expected.extend(ref_norm(row, wo.map(|_| &ws[..]), bo.map(|_| &bs[..]), eps, rms));
            }
        }
        assert_close_tol(&out.to_vec_f64().unwrap(), &expected, if dtype.is_half() { 2e-2 } else { 1e-5 }, "norm");
    }

    #[test]
    fn norm_backward_matches_finite_differences(
        rows in 1usize..4, c in 1usize..7, seed in any::<u64>(), rms in any::<bool>(), has_w in any::<bool>(), has_b in any::<bool>(),
    ) {
        let x = Tensor::from_vec(values(seed, rows * c, 2.0), &[rows, c]).unwrap();
        let w = Tensor::from_vec(values(seed ^ 3, c, 1.5), &[c]).unwrap();
        let b = Tensor::from_vec(values(seed ^ 5, c, 1.0), &[c]).unwrap();
        let has_b = has_b && !rms;
        grad_check("norm", &[x, w, b], &[true, has_w, has_b], |t| {
            let (w, b) = (has_w.then_some(&t[1]), has_b.then_some(&t[2]));
            if rms { t[0].rms_norm(w, 1e-3) } else { t[0].layer_norm(w, b, 1e-3) }
        });
    }
}

#[test]
fn norm_gradients_of_views_and_wide_rows() {
    let x = Tensor::from_vec(values(51, 3 * 37, 2.0), &[37, 3]).unwrap();
    let w = Tensor::from_vec(values(52, 37, 1.5), &[37]).unwrap();
    let b = Tensor::from_vec(values(53, 37, 1.0), &[37]).unwrap();
    grad_check(
        "layer_norm_t",
        &[x.clone(), w.clone(), b.clone()],
        &[true, true, true],
        |t| t[0].t()?.layer_norm(Some(&t[1]), Some(&t[2]), 1e-5),
    );
    grad_check("rms_norm_t", &[x, w], &[true, true], |t| {
        t[0].t()?.rms_norm(Some(&t[1]), 1e-6)
    });
}

#[test]
fn large_norms_match_reference_forward_and_backward() {
    // > 2^16 elements: the rayon paths, with per-task dweight/dbias partials
    let (rows, c) = (65usize, 1031usize);
    let x = Tensor::from_vec(
        values(61, rows * c, 3.0).iter().map(|v| v + 50.0).collect(),
        &[rows, c],
    )
    .unwrap();
    let w = Tensor::from_vec(values(62, c, 1.5), &[c]).unwrap();
    let b = Tensor::from_vec(values(63, c, 1.0), &[c]).unwrap();
    let g = Tensor::from_vec(values(64, rows * c, 1.0), &[rows, c]).unwrap();
    let (xs, ws, gs) = (
        x.to_vec::<f64>().unwrap(),
        w.to_vec::<f64>().unwrap(),
        g.to_vec::<f64>().unwrap(),
    );
    for rms in [false, true] {
        // f32 forward vs the f64 reference
        let (x32, w32, b32) = (
            x.to_dtype(DType::F32).unwrap(),
            w.to_dtype(DType::F32).unwrap(),
            b.to_dtype(DType::F32).unwrap(),
        );
        let y = if rms {
            x32.rms_norm(Some(&w32), 1e-5)
        } else {
            x32.layer_norm(Some(&w32), Some(&b32), 1e-5)
        }
        .unwrap();
        let (x32s, w32s, b32s) = (
            x32.to_vec_f64().unwrap(),
            w32.to_vec_f64().unwrap(),
            b32.to_vec_f64().unwrap(),
        );
        let mut expected = Vec::new();
        for row in x32s.chunks(c) {
            expected.extend(ref_norm(
                row,
                Some(&w32s),
                (!rms).then_some(&b32s[..]),
                1e-5,
                rms,
            ));
        }
        assert_close(
            &y.to_vec_f64().unwrap(),
            &expected,
            &format!("forward rms={rms}"),
        );
        // f64 backward vs analytic formulas written out here
        let (xv, wv, bv) = (
            Var::from_tensor(&x).unwrap(),
            Var::from_tensor(&w).unwrap(),
            Var::from_tensor(&b).unwrap(),
        );
        let y = if rms {
            xv.as_tensor().rms_norm(Some(&wv.as_tensor()), 1e-5)
        } else {
            xv.as_tensor()
                .layer_norm(Some(&wv.as_tensor()), Some(&bv.as_tensor()), 1e-5)
        }
        .unwrap();
        let grads = y.mul(&g).unwrap().sum_all().unwrap().backward().unwrap();
        let (mut edx, mut edw, mut edb) = (vec![0.0; rows * c], vec![0.0; c], vec![0.0; c]);
        for r in 0..rows {
            let xr = &xs[r * c..(r + 1) * c];
            let gr = &gs[r * c..(r + 1) * c];
            let mean = if rms {
                0.0
            } else {
                xr.iter().sum::<f64>() / c as f64
            };
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / c as f64;
            let rstd = 1.0 / (var + 1e-5).sqrt();
            let xhat: Vec<f64> = xr.iter().map(|v| (v - mean) * rstd).collect();
            let gy: Vec<f64> = gr.iter().zip(&ws).map(|(g, w)| g * w).collect();
            let a = if rms {
                0.0
            } else {
                gy.iter().sum::<f64>() / c as f64
            };
            let m2 = gy.iter().zip(&xhat).map(|(g, h)| g * h).sum::<f64>() / c as f64;
            for k in 0..c {
                edx[r * c + k] = rstd * (gy[k] - a - xhat[k] * m2);
                edw[k] += gr[k] * xhat[k];
                edb[k] += gr[k];
            }
        }
        assert_close(
            &grads.get_var(&xv).unwrap().to_vec::<f64>().unwrap(),
            &edx,
            "dx",
        );
        assert_close(
            &grads.get_var(&wv).unwrap().to_vec::<f64>().unwrap(),
            &edw,
            "dw",
        );
        if !rms {
            assert_close(
                &grads.get_var(&bv).unwrap().to_vec::<f64>().unwrap(),
                &edb,
                "db",
            );
        }
    }
}

#[test]
fn norms_of_empty_tensors() {
    let x = Tensor::zeros(&[0, 4], DType::F32, Device::Cpu).unwrap();
    let w = Tensor::ones(&[4], DType::F32, Device::Cpu).unwrap();
    assert_eq!(x.layer_norm(Some(&w), None, 1e-5).unwrap().shape(), &[0, 4]);
    assert_eq!(x.rms_norm(Some(&w), 1e-5).unwrap().shape(), &[0, 4]);
    let xv = Var::from_tensor(&x).unwrap();
    let wv = Var::from_tensor(&w).unwrap();
    let g = xv
        .as_tensor()
        .layer_norm(Some(&wv.as_tensor()), None, 1e-5)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(
        g.get_var(&wv).unwrap().to_vec::<f32>().unwrap(),
        vec![0.0; 4]
    );
}

#[test]
fn norm_errors_name_the_op_and_shapes() {
    let x = Tensor::zeros(&[2, 4], DType::F32, Device::Cpu).unwrap();
    let w3 = Tensor::ones(&[3], DType::F32, Device::Cpu).unwrap();
    let w4d = Tensor::ones(&[4], DType::F64, Device::Cpu).unwrap();
    let w2d = Tensor::ones(&[1, 4], DType::F32, Device::Cpu).unwrap();
    let e = x.layer_norm(Some(&w3), None, 1e-5).unwrap_err().to_string();
    assert!(
        e.contains("layer_norm") && e.contains("[2, 4]") && e.contains("[3]"),
        "{e}"
    );
    let e = x.rms_norm(Some(&w2d), 1e-5).unwrap_err().to_string();
    assert!(e.contains("rms_norm") && e.contains("[1, 4]"), "{e}");
    let e = x.layer_norm(None, Some(&w3), 1e-5).unwrap_err().to_string();
    assert!(e.contains("layer_norm") && e.contains("bias"), "{e}");
    let e = x
        .layer_norm(Some(&w4d), None, 1e-5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer_norm"), "{e}");
    let e = Tensor::scalar(1.0f32)
        .rms_norm(None, 1e-5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rms_norm"), "{e}");
    let e = Tensor::zeros(&[2, 4], DType::I64, Device::Cpu)
        .unwrap()
        .layer_norm(None, None, 1e-5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer_norm"), "{e}");
    let e = x.layer_norm(None, None, -1.0).unwrap_err().to_string();
    assert!(e.contains("layer_norm") && e.contains("eps"), "{e}");
}
