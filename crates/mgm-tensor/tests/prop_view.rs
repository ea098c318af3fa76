//! Views (reshape, permute, narrow, broadcast, squeeze/unsqueeze), cat/stack/chunk/split and the
//! autograd engine's semantics (accumulation, zero_grad, no_grad, detach, Var::set).

mod common;

use common::*;
use mgm_tensor::{DType, Device, Tensor, Var, no_grad};
use proptest::prelude::*;

/// Element of `vals` (row-major over `shape`) at multi-index `idx`.
fn at(vals: &[f64], shape: &[usize], idx: &[usize]) -> f64 {
    let st = strides(shape);
    vals[idx.iter().zip(&st).map(|(i, s)| i * s).sum::<usize>()]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn permute_moves_elements(shape in shape_strategy(4, 4), kind in view_kind(), seed in 0u64..1000, rot in 0usize..4) {
        let n: usize = shape.iter().product();
        let x = make_view(&values(seed, n, 1.0), &shape, kind, DType::F32);
        let xs = x.to_vec_f64().unwrap();
        let rank = shape.len();
        let dims: Vec<usize> = (0..rank).map(|i| (i + rot) % rank.max(1)).collect();
        let y = x.permute(&dims).unwrap();
        prop_assert!(y.same_storage(&x), "permute must not copy");
        let yshape: Vec<usize> = dims.iter().map(|&d| shape[d]).collect();
        prop_assert_eq!(y.shape(), &yshape[..]);
        let yv = y.to_vec_f64().unwrap();
        for (i, &v) in yv.iter().enumerate() {
            let yi = unravel(i, &yshape);
            let mut xi = vec![0; rank];
            for (k, &d) in dims.iter().enumerate() { xi[d] = yi[k]; }
            prop_assert_eq!(v, at(&xs, &shape, &xi));
        }
        // a contiguous copy holds the same logical values
        prop_assert_eq!(y.contiguous().unwrap().to_vec_f64().unwrap(), yv);
    }

    #[test]
    fn reshape_keeps_row_major_order(shape in shape_strategy(4, 4), kind in view_kind(), seed in 0u64..1000) {
        let n: usize = shape.iter().product();
        let x = make_view(&values(seed, n, 1.0), &shape, kind, DType::F64);
        let flat = x.reshape(&[n]).unwrap();
        prop_assert_eq!(flat.to_vec_f64().unwrap(), x.to_vec_f64().unwrap());
        if x.is_contiguous() {
            prop_assert!(flat.same_storage(&x), "reshape of a contiguous tensor must be a view");
        }
        let back = flat.reshape(&shape).unwrap();
        prop_assert_eq!(back.to_vec_f64().unwrap(), x.to_vec_f64().unwrap());
        prop_assert!(x.reshape(&[n + 1]).is_err());
    }

    #[test]
    fn narrow_selects_a_range(shape in shape_strategy_min(1, 4, 1, 5), kind in view_kind(), seed in 0u64..1000, d in 0usize..4, s in 0usize..5, l in 0usize..5) {
        let n: usize = shape.iter().product();
        let x = make_view(&values(seed, n, 1.0), &shape, kind, DType::F32);
        let xs = x.to_vec_f64().unwrap();
        let d = d % shape.len();
        let start = s % (shape[d] + 1);
        let len = l % (shape[d] - start + 1);
        let y = x.narrow(d as isize, start, len).unwrap();
        prop_assert!(y.same_storage(&x));
        let mut ys = shape.clone();
        ys[d] = len;
        prop_assert_eq!(y.shape(), &ys[..]);
        for (i, v) in y.to_vec_f64().unwrap().into_iter().enumerate() {
            let mut idx = unravel(i, &ys);
            idx[d] += start;
            prop_assert_eq!(v, at(&xs, &shape, &idx));
        }
        prop_assert!(x.narrow(d as isize, start, shape[d] - start + 1).is_err());
    }

    #[test]
    fn broadcast_as_repeats_without_copy(shape in shape_strategy(3, 4), extra in shape_strategy_min(0, 2, 0, 3), seed in 0u64..1000, ones in 0u8..8) {
        // collapse some dims to 1 and broadcast back to the full shape plus leading dims
        let small: Vec<usize> = shape.iter().enumerate().map(|(i, &d)| if ones >> i & 1 == 1 { 1 } else { d }).collect();
        let n: usize = small.iter().product();
        let x = Tensor::from_vec(values(seed, n, 1.0), &small).unwrap();
        let target: Vec<usize> = extra.iter().chain(shape.iter()).copied().collect();
        let y = x.broadcast_as(&target).unwrap();
        prop_assert!(y.same_storage(&x));
        let xs = x.to_vec_f64().unwrap();
        for (i, v) in y.to_vec_f64().unwrap().into_iter().enumerate() {
            let idx = unravel(i, &target);
            let sidx: Vec<usize> = small.iter().enumerate().map(|(k, &d)| if d == 1 { 0 } else { idx[k + extra.len()] }).collect();
            prop_assert_eq!(v, at(&xs, &small, &sidx));
        }
    }

    #[test]
    fn cat_then_split_round_trips(shape in shape_strategy_min(1, 3, 0, 4), sizes in prop::collection::vec(0usize..4, 1..4), d in 0usize..3, kind in view_kind(), seed in 0u64..1000) {
        let d = d % shape.len();
        let parts: Vec<Tensor> = sizes.iter().enumerate().map(|(k, &s)| {
            let mut sh = shape.clone();
            sh[d] = s;
            let n: usize = sh.iter().product();
            make_view(&values(seed + k as u64, n, 1.0), &sh, kind, DType::F32)
        }).collect();
        let c = Tensor::cat(&parts, d as isize).unwrap();
        prop_assert_eq!(c.shape()[d], sizes.iter().sum::<usize>());
        // reference: element idx of the cat comes from the part whose range holds idx[d]
        let cv = c.to_vec_f64().unwrap();
        for (i, &v) in cv.iter().enumerate() {
            let mut idx = unravel(i, c.shape());
            let mut k = 0;
            while idx[d] >= sizes[k] { idx[d] -= sizes[k]; k += 1; }
            prop_assert_eq!(v, at(&parts[k].to_vec_f64().unwrap(), parts[k].shape(), &idx));
        }
        let back = c.split_sizes(&sizes, d as isize).unwrap();
        for (p, b) in parts.iter().zip(&back) {
            prop_assert_eq!(p.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
        }
    }

    #[test]
    fn chunk_and_split_cover_the_dim(len in 0usize..9, n in 1usize..5, size in 1usize..5) {
        let x = Tensor::arange(0.0, len as f64, 1.0, DType::F32, Device::Cpu).unwrap();
        let chunks = x.chunk(n, 0).unwrap();
        // torch.chunk: chunks of ceil(len / n), the last one smaller
        let step = len.div_ceil(n).max(1);
        let want: Vec<usize> = (0..len).step_by(step).map(|s| step.min(len - s)).collect();
        if len > 0 {
            prop_assert_eq!(chunks.iter().map(|c| c.shape()[0]).collect::<Vec<_>>(), want);
        }
        let parts = x.split(size, 0).unwrap();
        let joined: Vec<f64> = parts.iter().flat_map(|p| p.to_vec_f64().unwrap()).collect();
        prop_assert_eq!(joined, x.to_vec_f64().unwrap());
    }
}

#[test]
fn squeeze_unsqueeze_stack() {
    let x = Tensor::from_vec(values(3, 6, 1.0), &[2, 1, 3]).unwrap();
    assert_eq!(x.squeeze(1).unwrap().shape(), &[2, 3]);
    assert_eq!(x.unsqueeze(0).unwrap().shape(), &[1, 2, 1, 3]);
    assert_eq!(x.unsqueeze(-1).unwrap().shape(), &[2, 1, 3, 1]);
    assert!(x.squeeze(0).unwrap_err().to_string().contains("squeeze"));
    let s = Tensor::stack(&[x.clone(), x.clone()], 1).unwrap();
    assert_eq!(s.shape(), &[2, 2, 1, 3]);
    assert_eq!(
        s.get(1, 1).unwrap().to_vec_f64().unwrap(),
        x.to_vec_f64().unwrap()
    );
    let e = Tensor::stack(&[x.clone(), x.reshape(&[3, 2]).unwrap()], 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("stack"), "{e}");
}

#[test]
fn view_gradients_match_finite_differences() {
    let x = Tensor::from_vec(values(5, 24, 1.0), &[2, 3, 4]).unwrap();
    let y = Tensor::from_vec(values(6, 8, 1.0), &[2, 1, 4]).unwrap();
    grad_check("permute", std::slice::from_ref(&x), &[true], |v| {
        v[0].permute(&[2, 0, 1])?.contiguous()?.sqr()
    });
    grad_check("reshape", std::slice::from_ref(&x), &[true], |v| {
        v[0].t()?.reshape(&[6, 4])?.sin()
    });
    grad_check("narrow", std::slice::from_ref(&x), &[true], |v| {
        v[0].narrow(1, 1, 2)?.exp()
    });
    grad_check("broadcast", std::slice::from_ref(&y), &[true], |v| {
        v[0].broadcast_as(&[3, 2, 3, 4])?.sqr()
    });
    grad_check("cat", &[x.clone(), y.clone()], &[true, true], |v| {
        Tensor::cat(&[v[0].clone(), v[1].clone()], 1)?.sqr()
    });
    grad_check("stack+unsqueeze", std::slice::from_ref(&y), &[true], |v| {
        Tensor::stack(&[v[0].clone(), v[0].sqr()?], 0)?.squeeze(2)
    });
    grad_check("chunk", std::slice::from_ref(&x), &[true], |v| {
        let c = v[0].chunk(2, 2)?;
        c[0].mul(&c[1])
    });
    grad_check("sum/mean", std::slice::from_ref(&x), &[true], |v| {
        v[0].sum_dims(&[0, 2], true)?.mul(&v[0].mean(1, true)?)
    });
}

#[test]
fn cast_backward_casts_the_gradient_back() {
    // finite differences through f32 rounding are too noisy; the adjoint of a cast is a cast
    let w = Var::from_tensor(&Tensor::from_vec(vec![0.1f64, 0.2, 0.3], &[3]).unwrap()).unwrap();
    let y = w.as_tensor().to_dtype(DType::BF16).unwrap();
    assert!(y.is_tracked());
    let g = Tensor::from_vec(vec![1.5f32, -2.0, 0.25], &[3])
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let grads = y.backward_with(&g).unwrap();
    let gw = grads.get_var(&w).unwrap();
    assert_eq!(gw.dtype(), DType::F64);
    assert_eq!(gw.to_vec::<f64>().unwrap(), vec![1.5, -2.0, 0.25]);
}

#[test]
fn gradients_accumulate_until_zeroed() {
    let w = Var::from_tensor(&Tensor::from_vec(vec![1f32, -2.0, 3.0], &[3]).unwrap()).unwrap();
    let loss = || w.as_tensor().sqr().unwrap().sum_all().unwrap();
    let g1 = loss().backward().unwrap();
    assert_eq!(
        g1.get_var(&w).unwrap().to_vec::<f32>().unwrap(),
        vec![2.0, -4.0, 6.0]
    );
    loss().backward().unwrap();
    assert_eq!(
        w.grad().unwrap().to_vec::<f32>().unwrap(),
        vec![4.0, -8.0, 12.0],
        "two passes add up"
    );
    w.zero_grad();
    assert!(w.grad().is_none());
    // a Var used twice in one graph gets both contributions
    let t = w.as_tensor();
    t.mul(&t)
        .unwrap()
        .add(&t)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(
        w.grad().unwrap().to_vec::<f32>().unwrap(),
        vec![3.0, -3.0, 7.0]
    );
}

#[test]
fn no_grad_and_detach_stop_recording() {
    let w = Var::from_tensor(&Tensor::from_vec(vec![1f64, 2.0], &[2]).unwrap()).unwrap();
    let y = no_grad(|| w.as_tensor().exp().unwrap());
    assert!(!y.is_tracked());
    assert!(
        y.sum_all()
            .unwrap()
            .backward()
            .unwrap_err()
            .to_string()
            .contains("does not depend")
    );
    let d = w.as_tensor().detach();
    assert!(!d.is_tracked());
    // gradients flow only through the tracked branch
    let t = w.as_tensor();
    let loss = t.mul(&t.detach()).unwrap().sum_all().unwrap();
    loss.backward().unwrap();
    assert_eq!(w.grad().unwrap().to_vec::<f64>().unwrap(), vec![1.0, 2.0]);
}

#[test]
fn var_set_replaces_value_and_checks_shape() {
    let w = Var::zeros(&[2, 2], DType::F32, Device::Cpu).unwrap();
    w.set(&Tensor::ones(&[2, 2], DType::F32, Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(w.as_tensor().to_vec::<f32>().unwrap(), vec![1.0; 4]);
    let loss = w.as_tensor().sum_all().unwrap();
    let g = loss.backward().unwrap();
    assert!(
        g.get_var(&w).is_some(),
        "gradients still map to the Var after set"
    );
    let e = w
        .set(&Tensor::ones(&[4], DType::F32, Device::Cpu).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("Var::set") && e.contains("[2, 2]") && e.contains("[4]"),
        "{e}"
    );
    assert!(Var::from_tensor(&Tensor::zeros(&[2], DType::I64, Device::Cpu).unwrap()).is_err());
}

#[test]
fn backward_needs_a_scalar_or_a_gradient() {
    let w = Var::from_tensor(&Tensor::from_vec(vec![1f32, 2.0], &[2]).unwrap()).unwrap();
    let y = w.as_tensor().sqr().unwrap();
    assert!(
        y.backward()
            .unwrap_err()
            .to_string()
            .contains("one-element")
    );
    let g = y
        .backward_with(&Tensor::from_vec(vec![1f32, 10.0], &[2]).unwrap())
        .unwrap();
    assert_eq!(
        g.get_var(&w).unwrap().to_vec::<f32>().unwrap(),
        vec![2.0, 40.0]
    );
}

#[test]
fn deep_graphs_do_not_overflow_the_stack() {
    let w = Var::from_tensor(&Tensor::from_vec(vec![1f32], &[1]).unwrap()).unwrap();
    let mut t = w.as_tensor();
    for _ in 0..20_000 {
        t = t.mul_scalar(1.0).unwrap();
    }
    t.sum_all().unwrap().backward().unwrap();
    assert_eq!(w.grad().unwrap().to_vec::<f32>().unwrap(), vec![1.0]);
}

#[test]
fn construction_helpers() {
    let a = Tensor::arange(0.0, 5.0, 2.0, DType::I64, Device::Cpu).unwrap();
    assert_eq!(a.to_vec::<i64>().unwrap(), vec![0, 2, 4]);
    let f = Tensor::full(2.5, &[2, 0, 3], DType::BF16, Device::Cpu).unwrap();
    assert_eq!(f.numel(), 0);
    let r1 = Tensor::randn(7, &[1000], 1.0, 2.0, DType::F64, Device::Cpu)
        .unwrap()
        .to_vec::<f64>()
        .unwrap();
    let r2 = Tensor::randn(7, &[1000], 1.0, 2.0, DType::F64, Device::Cpu)
        .unwrap()
        .to_vec::<f64>()
        .unwrap();
    assert_eq!(r1, r2, "seeded");
    let mean = r1.iter().sum::<f64>() / 1000.0;
    let var = r1.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 999.0;
    assert!(
        (mean - 1.0).abs() < 0.2 && (var.sqrt() - 2.0).abs() < 0.2,
        "mean {mean} std {}",
        var.sqrt()
    );
    let u = Tensor::rand_uniform(3, &[1000], -1.0, 1.0, DType::F32, Device::Cpu)
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    assert!(u.iter().all(|&v| (-1.0..1.0).contains(&v)));
    assert!(
        Tensor::from_vec(vec![1f32; 5], &[2, 3])
            .unwrap_err()
            .to_string()
            .contains("[2, 3]")
    );
    assert!(Tensor::arange(0.0, 1.0, 0.0, DType::F32, Device::Cpu).is_err());
}
