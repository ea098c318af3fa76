//! Property tests of `matmul` against an f64 triple loop: broadcast batch dims, 1-D promotion,
//! size-0/1 dims, strided views, every float dtype, gradients and error messages.
mod common;
use common::*;
use mgm_tensor::{DType, Device, Tensor};
use proptest::prelude::*;

/// torch.matmul by definition, in f64: promotes 1-D operands, broadcasts batch dims with NumPy
/// rules, then sums products. Returns (output shape, values).
fn reference(a: &[f64], sa: &[usize], b: &[f64], sb: &[usize]) -> (Vec<usize>, Vec<f64>) {
    let pa: Vec<usize> = if sa.len() == 1 {
        vec![1, sa[0]]
    } else {
        sa.to_vec()
    };
    let pb: Vec<usize> = if sb.len() == 1 {
        vec![sb[0], 1]
    } else {
        sb.to_vec()
    };
    let (m, k) = (pa[pa.len() - 2], pa[pa.len() - 1]);
    let n = pb[pb.len() - 1];
    let ba = &pa[..pa.len() - 2];
    let bb = &pb[..pb.len() - 2];
    let rank = ba.len().max(bb.len());
    let dim_of = |s: &[usize], i: usize| {
        if i + s.len() >= rank {
            s[i + s.len() - rank]
        } else {
            1
        }
    };
    let batch: Vec<usize> = (0..rank)
        .map(|i| match (dim_of(ba, i), dim_of(bb, i)) {
            (1, d) | (d, _) => d,
        })
        .collect();
    let count: usize = batch.iter().product();
    let mut out = vec![0.0; count * m * n];
    for bi in 0..count {
        let idx = unravel(bi, &batch);
        // flat batch index of each operand, broadcasting size-1 and missing dims
        let flat = |s: &[usize]| {
            let mut f = 0;
            for (j, &d) in s.iter().enumerate() {
                let i = idx[j + rank - s.len()];
                f = f * d + if d == 1 { 0 } else { i };
            }
            f
        };
        let (fa, fb) = (flat(ba), flat(bb));
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0;
                for p in 0..k {
                    acc += a[fa * m * k + i * k + p] * b[fb * k * n + p * n + j];
                }
                out[bi * m * n + i * n + j] = acc;
            }
        }
    }
    let mut shape = batch;
    if sa.len() > 1 {
        shape.push(m);
    }
    if sb.len() > 1 {
        shape.push(n);
    }
    (shape, out)
}

/// Random broadcast-compatible operand shapes (including 1-D operands and size-0/1 dims).
fn matmul_shapes() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    (
        prop::collection::vec((0usize..=3, 0usize..3), 0..=2),
        0usize..3,
        0usize..=2,
        1usize..=4,
        0usize..=5,
        0usize..=5,
        0usize..=5,
    )
        .prop_map(|(batch, ra_extra, rank_kind, _r, m, k, n)| {
            // each batch dim: (size, who gets 1: 0 = nobody, 1 = lhs, 2 = rhs)
            let mut ba: Vec<usize> = batch
                .iter()
                .map(|&(d, w)| if w == 1 { 1 } else { d })
                .collect();
            let mut bb: Vec<usize> = batch
                .iter()
                .map(|&(d, w)| if w == 2 { 1 } else { d })
                .collect();
            // drop leading dims of one side to exercise rank broadcasting
            if ra_extra == 1 && !ba.is_empty() {
                ba.remove(0);
            } else if ra_extra == 2 && !bb.is_empty() {
                bb.remove(0);
            }
            let mut sa = ba;
            sa.extend([m, k]);
            let mut sb = bb;
            sb.extend([k, n]);
            match rank_kind {
                1 => (vec![k], sb),
                2 if sa.len() == 2 => (sa, vec![k]),
                _ => (sa, sb),
            }
        })
}

fn dtype_strategy() -> impl Strategy<Value = DType> {
    prop_oneof![
        Just(DType::F32),
        Just(DType::F64),
        Just(DType::BF16),
        Just(DType::F16)
    ]
}

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 | DType::F64 => 1e-5,
        _ => 1e-2,
    }
}

fn check(sa: &[usize], sb: &[usize], ka: ViewKind, kb: ViewKind, dtype: DType, seed: u64) {
    let na: usize = sa.iter().product();
    let nb: usize = sb.iter().product();
    let a = make_view(&values(seed, na, 1.0), sa, ka, dtype);
    let b = make_view(&values(seed + 1, nb, 1.0), sb, kb, dtype);
    let (shape, want) = reference(&a.to_vec_f64().unwrap(), sa, &b.to_vec_f64().unwrap(), sb);
    let c = a
        .matmul(&b)
        .unwrap_or_else(|e| panic!("{sa:?} x {sb:?}: {e}"));
    assert_eq!(c.shape(), &shape[..], "{sa:?} x {sb:?}");
    assert_eq!(c.dtype(), dtype);
    let got = c.to_vec_f64().unwrap();
    let err = rel_frobenius(&got, &want);
    let zero_ref = want.iter().all(|&r| r == 0.0);
    let ok = if zero_ref {
        got.iter().all(|&g| g == 0.0)
    } else {
        err <= tolerance(dtype)
    };
    assert!(
        ok,
        "{sa:?} ({ka:?}) x {sb:?} ({kb:?}) {dtype}: relative Frobenius error {err}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn matmul_matches_f64_reference(
        (sa, sb) in matmul_shapes(),
        ka in view_kind(),
        kb in view_kind(),
        dtype in dtype_strategy(),
        seed in 0u64..1000,
    ) {
        check(&sa, &sb, ka, kb, dtype, seed);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn matmul_backward_matches_finite_differences((sa, sb) in matmul_shapes(), seed in 0u64..1000) {
        let na: usize = sa.iter().product();
        let nb: usize = sb.iter().product();
        let a = Tensor::from_vec(values(seed, na, 1.0), &sa).unwrap();
        let b = Tensor::from_vec(values(seed + 7, nb, 1.0), &sb).unwrap();
        grad_check("matmul", &[a, b], &[true, true], |x| x[0].matmul(&x[1]));
    }
}

#[test]
fn matmul_1d_cases_match_torch_shapes() {
    let v = |n: usize| Tensor::from_vec(values(n as u64, n, 1.0), &[n]).unwrap();
    let m = |s: &[usize]| Tensor::from_vec(values(9, s.iter().product(), 1.0), s).unwrap();
    assert_eq!(v(3).matmul(&v(3)).unwrap().shape(), &[] as &[usize]);
    assert_eq!(m(&[2, 3]).matmul(&v(3)).unwrap().shape(), &[2]);
    assert_eq!(v(3).matmul(&m(&[3, 4])).unwrap().shape(), &[4]);
    assert_eq!(v(3).matmul(&m(&[5, 3, 4])).unwrap().shape(), &[5, 4]);
    assert_eq!(m(&[5, 2, 3]).matmul(&v(3)).unwrap().shape(), &[5, 2]);
    for (sa, sb) in [
        (vec![3], vec![3]),
        (vec![3], vec![2, 3, 4]),
        (vec![2, 2, 3], vec![3]),
    ] {
        check(
            &sa,
            &sb,
            ViewKind::Narrowed,
            ViewKind::Permuted,
            DType::F32,
            3,
        );
    }
}

/// Sizes that take gemm's threaded path, the batch-parallel path and the folded
/// shared-weight path.
#[test]
fn matmul_large_shapes_take_every_batch_strategy() {
    for (sa, sb) in [
        (vec![70, 90], vec![90, 65]),
        (vec![3, 33, 40], vec![40, 21]),
        (vec![6, 20, 24], vec![6, 24, 18]),
        (vec![2, 1, 20, 24], vec![3, 24, 18]),
        (vec![150, 130], vec![130, 140]),
    ] {
        for kind in [ViewKind::Contiguous, ViewKind::Permuted, ViewKind::Narrowed] {
            check(&sa, &sb, kind, ViewKind::Contiguous, DType::F32, 11);
            check(&sa, &sb, ViewKind::Contiguous, kind, DType::BF16, 12);
        }
    }
}

/// Expanded (stride-0) views reach gemm as they are.
#[test]
fn matmul_of_expanded_views_matches_reference() {
    let a0 = Tensor::from_vec(values(1, 4, 1.0), &[4, 1]).unwrap();
    let a = a0.broadcast_as(&[4, 5]).unwrap();
    let b0 = Tensor::from_vec(values(2, 6, 1.0), &[1, 6]).unwrap();
    let b = b0.broadcast_as(&[5, 6]).unwrap();
    let (_, want) = reference(
        &a.to_vec_f64().unwrap(),
        &[4, 5],
        &b.to_vec_f64().unwrap(),
        &[5, 6],
    );
    let got = a.matmul(&b).unwrap().to_vec_f64().unwrap();
    assert!(rel_frobenius(&got, &want) <= 1e-5);
    let ab = Tensor::from_vec(values(3, 20, 1.0), &[4, 5])
        .unwrap()
        .broadcast_as(&[3, 4, 5])
        .unwrap();
    let got = ab.matmul(&b).unwrap().to_vec_f64().unwrap();
    let (_, want) = reference(
        &ab.to_vec_f64().unwrap(),
        &[3, 4, 5],
        &b.to_vec_f64().unwrap(),
        &[5, 6],
    );
    assert!(rel_frobenius(&got, &want) <= 1e-5);
}

#[test]
fn matmul_bf16_accumulates_in_f32() {
    // 4096 terms of 1/256: a bf16 accumulator stalls at 1 (1 + 2^-8 rounds back to 1), an f32
    // one reaches the exact total 16.
    let a = Tensor::full(1.0 / 256.0, &[1, 4096], DType::BF16, Device::Cpu).unwrap();
    let b = Tensor::ones(&[4096, 1], DType::BF16, Device::Cpu).unwrap();
    assert_eq!(a.matmul(&b).unwrap().to_vec_f64().unwrap(), vec![16.0]);
}

#[test]
fn matmul_backward_shared_weight_and_broadcast_batch() {
    let x = Tensor::from_vec(values(5, 2 * 3 * 4, 1.0), &[2, 3, 4]).unwrap();
    let w = Tensor::from_vec(values(6, 4 * 5, 1.0), &[4, 5]).unwrap();
    grad_check(
        "matmul_shared_rhs",
        &[x.clone(), w.clone()],
        &[true, true],
        |t| t[0].matmul(&t[1]),
    );
    let wl = Tensor::from_vec(values(7, 3 * 2, 1.0), &[3, 2]).unwrap();
    let xr = Tensor::from_vec(values(8, 4 * 2 * 5, 1.0), &[4, 2, 5]).unwrap();
    grad_check("matmul_shared_lhs", &[wl, xr], &[true, true], |t| {
        t[0].matmul(&t[1])
    });
    let a = Tensor::from_vec(values(9, 2 * 3 * 4, 1.0), &[2, 1, 3, 4]).unwrap();
    let b = Tensor::from_vec(values(10, 3 * 4 * 2, 1.0), &[3, 4, 2]).unwrap();
    grad_check("matmul_broadcast_batch", &[a, b], &[true, true], |t| {
        t[0].matmul(&t[1])
    });
    grad_check("matmul_transposed_views", &[x, w], &[true, true], |t| {
        t[0].transpose(1, 2)?
            .contiguous()?
            .transpose(1, 2)?
            .matmul(&t[1].t()?.contiguous()?.t()?)
    });
}

#[test]
fn matmul_bad_shapes_and_dtypes_are_errors() {
    let a = Tensor::zeros(&[2, 3], DType::F32, Device::Cpu).unwrap();
    let b = Tensor::zeros(&[4, 5], DType::F32, Device::Cpu).unwrap();
    let e = a.matmul(&b).unwrap_err().to_string();
    assert_eq!(
        e,
        "matmul: shapes [2, 3] and [4, 5] do not match (inner dims 3 != 4)"
    );
    let a3 = Tensor::zeros(&[2, 2, 3], DType::F32, Device::Cpu).unwrap();
    let b3 = Tensor::zeros(&[3, 3, 4], DType::F32, Device::Cpu).unwrap();
    let e = a3.matmul(&b3).unwrap_err().to_string();
    assert!(
        e.starts_with("matmul:") && e.contains("[2]") && e.contains("[3]"),
        "{e}"
    );
    let s = Tensor::scalar(1f32);
    assert!(s.matmul(&a).unwrap_err().to_string().starts_with("matmul:"));
    let i = Tensor::zeros(&[2, 3], DType::I64, Device::Cpu).unwrap();
    let i2 = Tensor::zeros(&[3, 2], DType::I64, Device::Cpu).unwrap();
    assert!(
        i.matmul(&i2)
            .unwrap_err()
            .to_string()
            .starts_with("matmul:")
    );
    let d = Tensor::zeros(&[3, 2], DType::F64, Device::Cpu).unwrap();
    assert!(a.matmul(&d).unwrap_err().to_string().starts_with("matmul:"));
}
