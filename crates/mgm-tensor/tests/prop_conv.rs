//! Property tests of conv2d, avg_pool2d and max_pool2d (forward and backward) against plain-loop
//! f64 references written here, plus gradient checks and error cases.
mod common;
use common::*;
use mgm_tensor::{Conv2dParams, DType, Device, Tensor, Var};
use proptest::prelude::*;

/// One convolution problem: shapes and hyper-parameters.
#[derive(Clone, Debug)]
struct Case {
    n: usize,
    groups: usize,
    cg: usize,
    mo: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    p: Conv2dParams,
    bias: bool,
}

impl Case {
    fn c_in(&self) -> usize {
        self.groups * self.cg
    }
    fn c_out(&self) -> usize {
        self.groups * self.mo
    }
    fn x_shape(&self) -> Vec<usize> {
        vec![self.n, self.c_in(), self.h, self.w]
    }
    fn w_shape(&self) -> Vec<usize> {
        vec![self.c_out(), self.cg, self.kh, self.kw]
    }
    /// Output size by PyTorch's formula, `None` when the dilated kernel does not fit.
    fn out_hw(&self) -> Option<(usize, usize)> {
        let dim = |len: usize, pad: usize, dil: usize, k: usize, s: usize| {
            let padded = (len + 2 * pad) as i64;
            let span = (dil * (k - 1) + 1) as i64;
            if padded < span {
                None
            } else {
                Some(((padded - span) / s as i64 + 1) as usize)
            }
        };
        Some((
            dim(
                self.h,
                self.p.padding.0,
                self.p.dilation.0,
                self.kh,
                self.p.stride.0,
            )?,
            dim(
                self.w,
                self.p.padding.1,
                self.p.dilation.1,
                self.kw,
                self.p.stride.1,
            )?,
        ))
    }
}

fn case_strategy(max_groups: usize, max_cg: usize, max_k: usize) -> impl Strategy<Value = Case> {
    (
        (
            0usize..=2,
            1..=max_groups,
            1..=max_cg,
            1usize..=3,
            1usize..=7,
            1usize..=7,
        ),
        (
            1..=max_k,
            1..=max_k,
            (1usize..=3, 1usize..=3),
            (0usize..=3, 0usize..=3),
            (1usize..=2, 1usize..=2),
        ),
        any::<bool>(),
    )
        .prop_map(
            |((n, groups, cg, mo, h, w), (kh, kw, stride, padding, dilation), bias)| Case {
                n,
                groups,
                cg,
                mo,
                h,
                w,
                kh,
                kw,
                p: Conv2dParams {
                    stride,
                    padding,
                    dilation,
                    groups,
                },
                bias,
            },
        )
}

/// Direct 7-loop convolution in f64: (n, oc, oh, ow) outer, (ci, i, j) inner.
fn conv_ref(c: &Case, x: &[f64], wt: &[f64], b: Option<&[f64]>) -> Vec<f64> {
    let (oh_n, ow_n) = c.out_hw().unwrap();
    let (c_in, c_out) = (c.c_in(), c.c_out());
    let mut out = vec![0.0; c.n * c_out * oh_n * ow_n];
    for n in 0..c.n {
        for oc in 0..c_out {
            let g = oc / c.mo;
            for oh in 0..oh_n {
                for ow in 0..ow_n {
                    let mut acc = b.map_or(0.0, |b| b[oc]);
                    for ci in 0..c.cg {
                        for i in 0..c.kh {
                            for j in 0..c.kw {
                                let ih = (oh * c.p.stride.0 + i * c.p.dilation.0) as i64
                                    - c.p.padding.0 as i64;
                                let iw = (ow * c.p.stride.1 + j * c.p.dilation.1) as i64
                                    - c.p.padding.1 as i64;
                                if ih < 0 || iw < 0 || ih >= c.h as i64 || iw >= c.w as i64 {
                                    continue;
                                }
                                let xi = ((n * c_in + g * c.cg + ci) * c.h + ih as usize) * c.w
                                    + iw as usize;
                                let wi = ((oc * c.cg + ci) * c.kh + i) * c.kw + j;
                                acc += x[xi] * wt[wi];
                            }
                        }
                    }
                    out[((n * c_out + oc) * oh_n + oh) * ow_n + ow] = acc;
                }
            }
        }
    }
    out
}

/// The adjoint of [`conv_ref`]: gradients of `sum(y * gy)` w.r.t. input, weight and bias.
fn conv_ref_backward(
    c: &Case,
    x: &[f64],
    wt: &[f64],
    gy: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (oh_n, ow_n) = c.out_hw().unwrap();
    let (c_in, c_out) = (c.c_in(), c.c_out());
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; wt.len()];
    let mut db = vec![0.0; c_out];
    for n in 0..c.n {
        for oc in 0..c_out {
            let g = oc / c.mo;
            for oh in 0..oh_n {
                for ow in 0..ow_n {
                    let gv = gy[((n * c_out + oc) * oh_n + oh) * ow_n + ow];
                    db[oc] += gv;
                    for ci in 0..c.cg {
                        for i in 0..c.kh {
                            for j in 0..c.kw {
                                let ih = (oh * c.p.stride.0 + i * c.p.dilation.0) as i64
                                    - c.p.padding.0 as i64;
                                let iw = (ow * c.p.stride.1 + j * c.p.dilation.1) as i64
                                    - c.p.padding.1 as i64;
                                if ih < 0 || iw < 0 || ih >= c.h as i64 || iw >= c.w as i64 {
                                    continue;
                                }
                                let xi = ((n * c_in + g * c.cg + ci) * c.h + ih as usize) * c.w
                                    + iw as usize;
                                let wi = ((oc * c.cg + ci) * c.kh + i) * c.kw + j;
                                dx[xi] += gv * wt[wi];
                                dw[wi] += gv * x[xi];
                            }
                        }
                    }
                }
            }
        }
    }
    (dx, dw, db)
}

/// Runs conv2d on views of the given kind and checks it against the reference (or checks the
/// error when the kernel does not fit).
fn check_forward(c: &Case, seed: u64, xk: ViewKind, wk: ViewKind, dtype: DType, tol: f64) {
    let xs = c.x_shape();
    let ws = c.w_shape();
    let xv = values(seed, xs.iter().product(), 1.0);
    let wv = values(seed + 1, ws.iter().product(), 1.0);
    let bv = values(seed + 2, c.c_out(), 1.0);
    let x = make_view(&xv, &xs, xk, dtype);
    let w = make_view(&wv, &ws, wk, dtype);
    let b = Tensor::from_vec(bv, &[c.c_out()])
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let b = c.bias.then_some(&b);
    let got = x.conv2d(&w, b, c.p);
    let Some((oh, ow)) = c.out_hw() else {
        let e = got
            .expect_err("kernel larger than the padded input must fail")
            .to_string();
        assert!(e.contains("conv2d"), "{e}");
        return;
    };
    let y = got.unwrap_or_else(|e| panic!("{c:?}: {e}"));
    assert_eq!(y.shape(), &[c.n, c.c_out(), oh, ow]);
    assert_eq!(y.dtype(), dtype);
    let bref = b.map(|b| b.to_vec_f64().unwrap());
    let r = conv_ref(
        c,
        &x.to_vec_f64().unwrap(),
        &w.to_vec_f64().unwrap(),
        bref.as_deref(),
    );
    let a = y.to_vec_f64().unwrap();
    assert!(a.iter().all(|v| v.is_finite()), "{c:?}: non-finite output");
    if !r.is_empty() && r.iter().any(|v| *v != 0.0) {
        let e = rel_frobenius(&a, &r);
        assert!(
            e <= tol,
            "{c:?} {dtype:?} {xk:?}/{wk:?}: relative Frobenius error {e} > {tol}"
        );
    } else {
        assert!(a.iter().all(|v| *v == 0.0), "{c:?}: expected zeros");
    }
}

/// Backward through autograd (f64) against the reference adjoint.
fn check_backward(c: &Case, seed: u64, xk: ViewKind) {
    if c.out_hw().is_none() {
        return;
    }
    let xs = c.x_shape();
    let ws = c.w_shape();
    let xv = values(seed, xs.iter().product(), 1.0);
    let wv = values(seed + 1, ws.iter().product(), 1.0);
    let x = Var::from_tensor(&make_view(&xv, &xs, xk, DType::F64)).unwrap();
    let w = Var::from_tensor(&Tensor::from_vec(wv.clone(), &ws).unwrap()).unwrap();
    let b = Var::from_tensor(
        &Tensor::from_vec(values(seed + 2, c.c_out(), 1.0), &[c.c_out()]).unwrap(),
    )
    .unwrap();
    let bt = b.as_tensor();
    let y = x
        .as_tensor()
        .conv2d(&w.as_tensor(), c.bias.then_some(&bt), c.p)
        .unwrap();
    let gy = values(seed + 3, y.numel(), 1.0);
    let grads = y
        .backward_with(&Tensor::from_vec(gy.clone(), y.shape()).unwrap())
        .unwrap();
    let (dx, dw, db) = conv_ref_backward(c, &xv, &wv, &gy);
    let get = |v: &Var, len: usize| {
        grads
            .get_var(v)
            .map_or(vec![0.0; len], |g| g.to_vec_f64().unwrap())
    };
    assert_close_tol(&get(&x, dx.len()), &dx, 1e-10, &format!("{c:?} d input"));
    assert_close_tol(&get(&w, dw.len()), &dw, 1e-10, &format!("{c:?} d weight"));
    if c.bias {
        assert_close_tol(&get(&b, db.len()), &db, 1e-10, &format!("{c:?} d bias"));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]

    #[test]
    fn conv2d_f32_matches_reference(c in case_strategy(3, 3, 3), seed in 0u64..1000, xk in view_kind(), wk in view_kind()) {
        check_forward(&c, seed, xk, wk, DType::F32, 1e-5);
    }

    #[test]
    fn conv2d_f64_matches_reference(c in case_strategy(3, 3, 3), seed in 0u64..1000, xk in view_kind()) {
        check_forward(&c, seed, xk, ViewKind::Contiguous, DType::F64, 1e-12);
    }

    #[test]
    fn conv2d_depthwise_matches_reference(c in case_strategy(5, 1, 7), seed in 0u64..1000, xk in view_kind()) {
        let groups = c.groups.max(2);
        let c = Case { groups, p: Conv2dParams { groups, ..c.p }, ..c };
        check_forward(&c, seed, xk, ViewKind::Contiguous, DType::F32, 1e-5);
        check_backward(&c, seed, xk);
    }

    #[test]
    fn conv2d_pointwise_matches_reference(c in case_strategy(3, 4, 1), seed in 0u64..1000, xk in view_kind()) {
        let c = Case { p: Conv2dParams { stride: (1, 1), padding: (0, 0), ..c.p }, ..c };
        check_forward(&c, seed, xk, ViewKind::Permuted, DType::F32, 1e-5);
        check_backward(&c, seed, xk);
    }

    #[test]
    fn conv2d_half_matches_reference(c in case_strategy(2, 3, 3), seed in 0u64..1000, bf in any::<bool>()) {
        let dtype = if bf { DType::BF16 } else { DType::F16 };
        check_forward(&c, seed, ViewKind::Narrowed, ViewKind::Contiguous, dtype, 1e-2);
    }

    #[test]
    fn conv2d_backward_matches_reference(c in case_strategy(3, 3, 3), seed in 0u64..1000, xk in view_kind()) {
        check_backward(&c, seed, xk);
    }
}

#[test]
fn conv2d_multi_band_matches_reference() {
    // Enough patch rows x columns that im2col runs in several bands, batch 1 and batch 2 (gemm
    // threaded inside vs. threads over samples).
    for n in [1, 2] {
        let c = Case {
            n,
            groups: 1,
            cg: 64,
            mo: 4,
            h: 40,
            w: 40,
            kh: 3,
            kw: 3,
            p: Conv2dParams {
                padding: (1, 1),
                ..Default::default()
            },
            bias: true,
        };
        check_forward(
            &c,
            7,
            ViewKind::Contiguous,
            ViewKind::Contiguous,
            DType::F32,
            1e-5,
        );
        check_backward(&c, 7, ViewKind::Contiguous);
    }
}

#[test]
fn conv2d_convnext_depthwise_7x7_matches_reference() {
    let c = Case {
        n: 2,
        groups: 8,
        cg: 1,
        mo: 1,
        h: 9,
        w: 11,
        kh: 7,
        kw: 7,
        p: Conv2dParams {
            padding: (3, 3),
            groups: 8,
            ..Default::default()
        },
        bias: true,
    };
    check_forward(
        &c,
        3,
        ViewKind::Contiguous,
        ViewKind::Contiguous,
        DType::F32,
        1e-5,
    );
    check_backward(&c, 3, ViewKind::Narrowed);
}

fn t64(seed: u64, shape: &[usize]) -> Tensor {
    Tensor::from_vec(values(seed, shape.iter().product(), 1.0), shape).unwrap()
}

#[test]
fn conv2d_grad_check() {
    let grouped = Conv2dParams {
        stride: (2, 1),
        padding: (1, 2),
        dilation: (1, 2),
        groups: 2,
    };
    grad_check(
        "conv2d grouped",
        &[t64(1, &[2, 4, 5, 4]), t64(2, &[6, 2, 2, 3]), t64(3, &[6])],
        &[true, true, true],
        |v| v[0].conv2d(&v[1], Some(&v[2]), grouped),
    );
    let depthwise = Conv2dParams {
        stride: (1, 2),
        padding: (1, 1),
        dilation: (2, 1),
        groups: 3,
    };
    grad_check(
        "conv2d depthwise",
        &[t64(4, &[1, 3, 5, 6]), t64(5, &[6, 1, 3, 2]), t64(6, &[6])],
        &[true, true, true],
        |v| v[0].conv2d(&v[1], Some(&v[2]), depthwise),
    );
    grad_check(
        "conv2d pointwise",
        &[t64(7, &[2, 3, 2, 3]), t64(8, &[2, 3, 1, 1])],
        &[true, true],
        |v| v[0].conv2d(&v[1], None, Conv2dParams::default()),
    );
}

#[test]
fn conv2d_bad_input_errors_name_conv2d() {
    let x = Tensor::zeros(&[1, 4, 5, 5], DType::F32, Device::Cpu).unwrap();
    let w = Tensor::zeros(&[4, 2, 3, 3], DType::F32, Device::Cpu).unwrap();
    let g2 = Conv2dParams {
        groups: 2,
        ..Default::default()
    };
    assert!(x.conv2d(&w, None, g2).is_ok());
    let cases: Vec<(&str, Tensor, Tensor, Option<Tensor>, Conv2dParams)> = vec![
        (
            "rank-3 input",
            Tensor::zeros(&[4, 5, 5], DType::F32, Device::Cpu).unwrap(),
            w.clone(),
            None,
            g2,
        ),
        (
            "rank-3 weight",
            x.clone(),
            Tensor::zeros(&[4, 2, 3], DType::F32, Device::Cpu).unwrap(),
            None,
            g2,
        ),
        (
            "channel mismatch",
            x.clone(),
            w.clone(),
            None,
            Conv2dParams::default(),
        ),
        (
            "groups not dividing",
            x.clone(),
            Tensor::zeros(&[4, 1, 3, 3], DType::F32, Device::Cpu).unwrap(),
            None,
            Conv2dParams {
                groups: 3,
                ..Default::default()
            },
        ),
        (
            "groups not dividing C_out",
            x.clone(),
            Tensor::zeros(&[3, 2, 3, 3], DType::F32, Device::Cpu).unwrap(),
            None,
            g2,
        ),
        (
            "kernel too large",
            x.clone(),
            Tensor::zeros(&[4, 2, 6, 3], DType::F32, Device::Cpu).unwrap(),
            None,
            g2,
        ),
        (
            "dilated kernel too large",
            x.clone(),
            w.clone(),
            None,
            Conv2dParams {
                dilation: (3, 1),
                ..g2
            },
        ),
        (
            "zero stride",
            x.clone(),
            w.clone(),
            None,
            Conv2dParams {
                stride: (0, 1),
                ..g2
            },
        ),
        (
            "zero groups",
            x.clone(),
            w.clone(),
            None,
            Conv2dParams { groups: 0, ..g2 },
        ),
        (
            "bad bias",
            x.clone(),
            w.clone(),
            Some(Tensor::zeros(&[3], DType::F32, Device::Cpu).unwrap()),
            g2,
        ),
        (
            "dtype mismatch",
            x.clone(),
            w.to_dtype(DType::F64).unwrap(),
            None,
            g2,
        ),
        (
            "integer input",
            x.to_dtype(DType::I64).unwrap(),
            w.to_dtype(DType::I64).unwrap(),
            None,
            g2,
        ),
    ];
    for (what, x, w, b, p) in cases {
        let e = x.conv2d(&w, b.as_ref(), p).expect_err(what).to_string();
        assert!(e.contains("conv2d"), "{what}: {e}");
    }
}

// ------------------------------------------------------------------------------------ pooling

#[derive(Clone, Debug)]
struct PoolCase {
    shape: Vec<usize>,
    k: (usize, usize),
    s: (usize, usize),
    p: (usize, usize),
}

impl PoolCase {
    fn out_hw(&self) -> Option<(usize, usize)> {
        let (h, w) = (self.shape[2], self.shape[3]);
        if h + 2 * self.p.0 < self.k.0 || w + 2 * self.p.1 < self.k.1 {
            return None;
        }
        Some((
            (h + 2 * self.p.0 - self.k.0) / self.s.0 + 1,
            (w + 2 * self.p.1 - self.k.1) / self.s.1 + 1,
        ))
    }
}

fn pool_strategy() -> impl Strategy<Value = PoolCase> {
    (
        (0usize..=2, 1usize..=3, 1usize..=7, 1usize..=7),
        (1usize..=4, 1usize..=4),
        (1usize..=3, 1usize..=3),
        (0usize..=2, 0usize..=2),
    )
        .prop_map(|((n, c, h, w), k, s, p)| PoolCase {
            shape: vec![n, c, h, w],
            k,
            s,
            p: (p.0.min(k.0 / 2), p.1.min(k.1 / 2)),
        })
}

/// Pooling reference: for every output, the window's in-bounds positions in row-major order.
fn pool_windows(c: &PoolCase) -> Vec<Vec<usize>> {
    let (oh_n, ow_n) = c.out_hw().unwrap();
    let [n, ch, h, w] = [c.shape[0], c.shape[1], c.shape[2], c.shape[3]];
    let mut wins = Vec::new();
    for plane in 0..n * ch {
        for oh in 0..oh_n {
            for ow in 0..ow_n {
                let mut win = Vec::new();
                for i in 0..c.k.0 {
                    for j in 0..c.k.1 {
                        let ih = (oh * c.s.0 + i) as i64 - c.p.0 as i64;
                        let iw = (ow * c.s.1 + j) as i64 - c.p.1 as i64;
                        if ih >= 0 && iw >= 0 && (ih as usize) < h && (iw as usize) < w {
                            win.push((plane * h + ih as usize) * w + iw as usize);
                        }
                    }
                }
                wins.push(win);
            }
        }
    }
    wins
}

fn check_pool(c: &PoolCase, seed: u64, kind: ViewKind, dtype: DType, tol: f64) {
    let xv = values(seed, c.shape.iter().product(), 2.0);
    let x = make_view(&xv, &c.shape, kind, dtype);
    let (oh, ow) = c.out_hw().unwrap();
    let xr = x.to_vec_f64().unwrap();
    let wins = pool_windows(c);
    let div = (c.k.0 * c.k.1) as f64;
    let avg_ref: Vec<f64> = wins
        .iter()
        .map(|w| w.iter().map(|&i| xr[i]).sum::<f64>() / div)
        .collect();
    // padding reads as -inf; the first strict maximum wins
    let first_max = |w: &Vec<usize>| {
        let mut best = (f64::NEG_INFINITY, w[0]);
        for &i in w {
            if xr[i] > best.0 {
                best = (xr[i], i);
            }
        }
        best
    };
    let max_ref: Vec<f64> = wins.iter().map(|w| first_max(w).0).collect();
    let avg = x.avg_pool2d(c.k, c.s, c.p).unwrap();
    let max = x.max_pool2d(c.k, c.s, c.p).unwrap();
    let out_shape = [c.shape[0], c.shape[1], oh, ow];
    assert_eq!(avg.shape(), &out_shape);
    assert_eq!(max.shape(), &out_shape);
    assert_close_tol(
        &avg.to_vec_f64().unwrap(),
        &avg_ref,
        tol,
        &format!("avg_pool2d {c:?}"),
    );
    assert_close_tol(
        &max.to_vec_f64().unwrap(),
        &max_ref,
        tol,
        &format!("max_pool2d {c:?}"),
    );
    if dtype == DType::F64 {
        let gy = values(seed + 1, avg_ref.len(), 1.0);
        let mut davg = vec![0.0; xr.len()];
        let mut dmax = vec![0.0; xr.len()];
        for (o, w) in wins.iter().enumerate() {
            for &i in w {
                davg[i] += gy[o] / div;
            }
            dmax[first_max(w).1] += gy[o];
        }
        let g = Tensor::from_vec(gy, &out_shape).unwrap();
        for (name, want, f) in [
            (
                "avg_pool2d",
                davg,
                Tensor::avg_pool2d as fn(&Tensor, _, _, _) -> _,
            ),
            ("max_pool2d", dmax, Tensor::max_pool2d),
        ] {
            let v = Var::from_tensor(&x).unwrap();
            let grads = f(&v.as_tensor(), c.k, c.s, c.p)
                .unwrap()
                .backward_with(&g)
                .unwrap();
            let got = grads
                .get_var(&v)
                .map_or(vec![0.0; xr.len()], |t| t.to_vec_f64().unwrap());
            assert_close_tol(&got, &want, 1e-12, &format!("{name} backward {c:?}"));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]

    #[test]
    fn pool2d_matches_reference(c in pool_strategy(), seed in 0u64..1000, kind in view_kind()) {
        prop_assume!(c.out_hw().is_some());
        check_pool(&c, seed, kind, DType::F32, 1e-5);
        check_pool(&c, seed, kind, DType::F64, 1e-12);
        check_pool(&c, seed, ViewKind::Contiguous, DType::BF16, 1e-2);
    }
}

#[test]
fn max_pool2d_ties_send_gradient_to_first_max() {
    let v =
        Var::from_tensor(&Tensor::ones(&[1, 1, 3, 4], DType::F64, Device::Cpu).unwrap()).unwrap();
    let y = v.as_tensor().max_pool2d((2, 2), (1, 2), (0, 0)).unwrap();
    assert_eq!(y.shape(), &[1, 1, 2, 2]);
    y.sum_all().unwrap().backward().unwrap();
    let g = v.grad().unwrap().to_vec::<f64>().unwrap();
    // windows start at (0,0), (0,2), (1,0), (1,2); each sends 1 to its top-left element
    assert_eq!(g, vec![1., 0., 1., 0., 1., 0., 1., 0., 0., 0., 0., 0.]);
}

#[test]
fn pool2d_grad_check() {
    let x = t64(11, &[2, 2, 5, 6]);
    grad_check("avg_pool2d", std::slice::from_ref(&x), &[true], |v| {
        v[0].avg_pool2d((3, 2), (2, 1), (1, 1))
    });
    grad_check("max_pool2d", std::slice::from_ref(&x), &[true], |v| {
        v[0].max_pool2d((3, 3), (2, 2), (1, 1))
    });
    grad_check("max_pool2d overlapping", &[x], &[true], |v| {
        v[0].max_pool2d((2, 3), (1, 1), (0, 1))
    });
}

#[test]
fn pool2d_bad_input_errors_name_the_op() {
    let x = Tensor::zeros(&[1, 2, 4, 4], DType::F32, Device::Cpu).unwrap();
    let x3 = Tensor::zeros(&[2, 4, 4], DType::F32, Device::Cpu).unwrap();
    for (name, f) in [
        (
            "avg_pool2d",
            Tensor::avg_pool2d as fn(&Tensor, _, _, _) -> _,
        ),
        ("max_pool2d", Tensor::max_pool2d),
    ] {
        for (what, r) in [
            ("rank 3", f(&x3, (2, 2), (2, 2), (0, 0))),
            ("zero stride", f(&x, (2, 2), (0, 2), (0, 0))),
            ("zero kernel", f(&x, (0, 2), (1, 1), (0, 0))),
            (
                "padding over half the kernel",
                f(&x, (2, 2), (1, 1), (2, 0)),
            ),
            ("kernel too large", f(&x, (5, 2), (1, 1), (0, 0))),
            (
                "integer dtype",
                f(&x.to_dtype(DType::I64).unwrap(), (2, 2), (1, 1), (0, 0)),
            ),
        ] {
            let e = r.expect_err(what).to_string();
            assert!(e.contains(name), "{name} {what}: {e}");
        }
    }
}
