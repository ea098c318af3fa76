//! Property tests of bilinear, bicubic and nearest interpolation (forward and backward) against
//! a per-pixel f64 reference of PyTorch's formulas written here, plus gradient checks and errors.
mod common;
use common::*;
use mgm_tensor::{DType, Device, InterpolateMode, Tensor, Var};
use proptest::prelude::*;

/// The input coordinate sampled by output position `d` (PyTorch's source-index rule).
fn src_coord(d: usize, input: usize, output: usize, align_corners: bool) -> f64 {
    if align_corners {
        let scale = if output > 1 {
            (input - 1) as f64 / (output - 1) as f64
        } else {
            0.0
        };
        d as f64 * scale
    } else {
        (d as f64 + 0.5) * input as f64 / output as f64 - 0.5
    }
}

/// Keys' cubic convolution kernel with A = -0.75, as a function of the distance to the tap.
fn keys(x: f64) -> f64 {
    const A: f64 = -0.75;
    let x = x.abs();
    if x <= 1.0 {
        (A + 2.0) * x.powi(3) - (A + 3.0) * x * x + 1.0
    } else if x < 2.0 {
        A * x.powi(3) - 5.0 * A * x * x + 8.0 * A * x - 4.0 * A
    } else {
        0.0
    }
}

/// The (input index, weight) pairs that output position `d` of one axis reads.
fn axis_taps(
    mode: InterpolateMode,
    d: usize,
    input: usize,
    output: usize,
    align_corners: bool,
) -> Vec<(usize, f64)> {
    let last = input as i64 - 1;
    match mode {
        InterpolateMode::Nearest => vec![(((d * input) / output).min(input - 1), 1.0)],
        InterpolateMode::Bilinear => {
            let s = src_coord(d, input, output, align_corners).max(0.0);
            let i0 = (s.floor() as i64).min(last);
            let l = s - i0 as f64;
            vec![(i0 as usize, 1.0 - l), ((i0 + 1).min(last) as usize, l)]
        }
        InterpolateMode::Bicubic => {
            let s = src_coord(d, input, output, align_corners);
            let f = s.floor() as i64;
            (f - 1..=f + 2)
                .map(|p| (p.clamp(0, last) as usize, keys(s - p as f64)))
                .collect()
        }
    }
}

/// Per output pixel of one plane, the (flat input index, weight) pairs it sums.
fn pixel_taps(
    mode: InterpolateMode,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    ac: bool,
) -> Vec<Vec<(usize, f64)>> {
    let mut all = Vec::with_capacity(oh * ow);
    for y in 0..oh {
        let ty = axis_taps(mode, y, h, oh, ac);
        for x in 0..ow {
            let tx = axis_taps(mode, x, w, ow, ac);
            let mut px = Vec::new();
            for &(iy, wy) in &ty {
                for &(ix, wx) in &tx {
                    px.push((iy * w + ix, wy * wx));
                }
            }
            all.push(px);
        }
    }
    all
}

fn mode_strategy() -> impl Strategy<Value = (InterpolateMode, bool)> {
    prop_oneof![
        any::<bool>().prop_map(|a| (InterpolateMode::Bilinear, a)),
        any::<bool>().prop_map(|a| (InterpolateMode::Bicubic, a)),
        Just((InterpolateMode::Nearest, false)),
    ]
}

#[derive(Clone, Debug)]
struct Case {
    shape: Vec<usize>,
    out: (usize, usize),
    mode: InterpolateMode,
    align_corners: bool,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        (0usize..=2, 1usize..=3, 1usize..=6, 1usize..=6),
        (1usize..=12, 1usize..=12),
        mode_strategy(),
    )
        .prop_map(|((n, c, h, w), out, (mode, align_corners))| Case {
            shape: vec![n, c, h, w],
            out,
            mode,
            align_corners,
        })
}

fn run(c: &Case, x: &Tensor) -> Tensor {
    let (oh, ow) = c.out;
    match c.mode {
        InterpolateMode::Bilinear => x.upsample_bilinear2d(oh, ow, c.align_corners),
        InterpolateMode::Bicubic => x.upsample_bicubic2d(oh, ow, c.align_corners),
        InterpolateMode::Nearest => x.interpolate(c.out, c.mode, c.align_corners),
    }
    .unwrap_or_else(|e| panic!("{c:?}: {e}"))
}

fn check_forward(c: &Case, seed: u64, kind: ViewKind, dtype: DType, tol: f64) {
    let [n, ch, h, w] = [c.shape[0], c.shape[1], c.shape[2], c.shape[3]];
    let (oh, ow) = c.out;
    let x = make_view(&values(seed, n * ch * h * w, 2.0), &c.shape, kind, dtype);
    let y = run(c, &x);
    assert_eq!(y.shape(), &[n, ch, oh, ow]);
    assert_eq!(y.dtype(), dtype);
    let xr = x.to_vec_f64().unwrap();
    let taps = pixel_taps(c.mode, h, w, oh, ow, c.align_corners);
    let mut want = Vec::with_capacity(n * ch * oh * ow);
    for p in 0..n * ch {
        for px in &taps {
            want.push(
                px.iter()
                    .map(|&(i, wt)| wt * xr[p * h * w + i])
                    .sum::<f64>(),
            );
        }
    }
    assert_close_tol(
        &y.to_vec_f64().unwrap(),
        &want,
        tol,
        &format!("{c:?} {dtype:?} {kind:?}"),
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]

    #[test]
    fn interpolate_f32_matches_reference(c in case_strategy(), seed in 0u64..1000, kind in view_kind()) {
        check_forward(&c, seed, kind, DType::F32, 1e-5);
    }

    #[test]
    fn interpolate_f64_matches_reference(c in case_strategy(), seed in 0u64..1000, kind in view_kind()) {
        check_forward(&c, seed, kind, DType::F64, 1e-12);
    }

    #[test]
    fn interpolate_half_matches_reference(c in case_strategy(), seed in 0u64..1000, bf in any::<bool>()) {
        check_forward(&c, seed, ViewKind::Narrowed, if bf { DType::BF16 } else { DType::F16 }, 1e-2);
    }

    #[test]
    fn interpolate_backward_is_reference_adjoint(c in case_strategy(), seed in 0u64..1000, kind in view_kind()) {
        let [n, ch, h, w] = [c.shape[0], c.shape[1], c.shape[2], c.shape[3]];
        let (oh, ow) = c.out;
        let v = Var::from_tensor(&make_view(&values(seed, n * ch * h * w, 1.0), &c.shape, kind, DType::F64)).unwrap();
        let y = run(&c, &v.as_tensor());
        let gy = values(seed + 1, y.numel(), 1.0);
        let grads = y.backward_with(&Tensor::from_vec(gy.clone(), y.shape()).unwrap()).unwrap();
        let got = grads.get_var(&v).map_or(vec![0.0; n * ch * h * w], |g| g.to_vec_f64().unwrap());
        let taps = pixel_taps(c.mode, h, w, oh, ow, c.align_corners);
        let mut want = vec![0.0; n * ch * h * w];
        for p in 0..n * ch {
            for (o, px) in taps.iter().enumerate() {
                for &(i, wt) in px {
                    want[p * h * w + i] += wt * gy[p * oh * ow + o];
                }
            }
        }
        assert_close_tol(&got, &want, 1e-12, &format!("{c:?} backward"));
    }
}

#[test]
fn bilinear_2x2_to_4x4_matches_pytorch() {
    // torch.nn.functional.interpolate(torch.arange(4.).view(1, 1, 2, 2), size=(4, 4),
    // mode="bilinear", align_corners=False / True)
    let x = Tensor::from_vec(vec![0f32, 1., 2., 3.], &[1, 1, 2, 2]).unwrap();
    let y = x
        .upsample_bilinear2d(4, 4, false)
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    #[rustfmt::skip]
    let want = [0.0, 0.25, 0.75, 1.0, 0.5, 0.75, 1.25, 1.5, 1.5, 1.75, 2.25, 2.5, 2.0, 2.25, 2.75, 3.0];
    assert_eq!(y, want);
    let y = x
        .upsample_bilinear2d(4, 4, true)
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    let third = |v: f64| (v / 3.0) as f32;
    #[rustfmt::skip]
    let want = [0.0, third(1.0), third(2.0), 1.0, third(2.0), 1.0, third(4.0), third(5.0),
        third(4.0), third(5.0), 2.0, third(7.0), 2.0, third(7.0), third(8.0), 3.0];
    assert_close(
        &y.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        &want.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        "align_corners",
    );
}

#[test]
fn interpolate_same_size_is_identity() {
    let v = values(5, 2 * 3 * 4 * 5, 1.0);
    let x = Tensor::from_vec(v.clone(), &[2, 3, 4, 5]).unwrap();
    for mode in [
        InterpolateMode::Bilinear,
        InterpolateMode::Bicubic,
        InterpolateMode::Nearest,
    ] {
        let y = x.interpolate((4, 5), mode, false).unwrap();
        assert_close_tol(&y.to_vec_f64().unwrap(), &v, 1e-15, &format!("{mode:?}"));
    }
}

#[test]
fn interpolate_grad_check() {
    let x = Tensor::from_vec(values(9, 2 * 2 * 3 * 4, 1.0), &[2, 2, 3, 4]).unwrap();
    for (mode, ac) in [
        (InterpolateMode::Bilinear, false),
        (InterpolateMode::Bilinear, true),
        (InterpolateMode::Bicubic, false),
        (InterpolateMode::Bicubic, true),
        (InterpolateMode::Nearest, false),
    ] {
        for size in [(5, 7), (2, 3), (1, 1)] {
            grad_check(
                &format!("{mode:?} ac={ac} {size:?}"),
                std::slice::from_ref(&x),
                &[true],
                |v| v[0].interpolate(size, mode, ac),
            );
        }
    }
}

#[test]
fn interpolate_bad_input_errors_name_the_op() {
    let x = Tensor::zeros(&[1, 2, 3, 3], DType::F32, Device::Cpu).unwrap();
    let x3 = Tensor::zeros(&[2, 3, 3], DType::F32, Device::Cpu).unwrap();
    let empty = Tensor::zeros(&[1, 2, 0, 3], DType::F32, Device::Cpu).unwrap();
    let ints = x.to_dtype(DType::I64).unwrap();
    let cases = [
        (
            "rank 3",
            x3.upsample_bilinear2d(4, 4, false),
            "upsample_bilinear2d",
        ),
        (
            "zero output",
            x.upsample_bicubic2d(0, 4, false),
            "upsample_bicubic2d",
        ),
        (
            "empty input",
            empty.upsample_bilinear2d(4, 4, true),
            "upsample_bilinear2d",
        ),
        (
            "integer dtype",
            ints.upsample_bicubic2d(4, 4, false),
            "upsample_bicubic2d",
        ),
        (
            "nearest with align_corners",
            x.interpolate((4, 4), InterpolateMode::Nearest, true),
            "upsample_nearest2d",
        ),
    ];
    for (what, r, op) in cases {
        let e = r.expect_err(what).to_string();
        assert!(e.contains(op), "{what}: {e}");
    }
}

#[test]
fn nearest_uses_pytorch_f32_index_rounding() {
    // PyTorch computes floor(dst * (in / out)) in f32: for in = 2, out = 82, output 41 reads
    // input 0 (41 * f32(2 / 82) rounds just below 1), unlike the exact floor(41 * 2 / 82) = 1.
    let x = Tensor::from_vec(vec![0f32, 1.0], &[1, 1, 1, 2]).unwrap();
    let y = x
        .upsample_nearest2d(1, 82)
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    assert_eq!((y[40], y[41], y[42]), (0.0, 0.0, 1.0));
}
