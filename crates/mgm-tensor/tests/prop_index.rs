//! Property tests of the indexing ops (index_select, embedding, gather, scatter_add, index_add,
//! topk, triu/tril) against plain loops over f64 values, their gradients against finite
//! differences, and their errors.
mod common;
use common::*;
use mgm_tensor::{DType, Device, Tensor};
use proptest::prelude::*;

fn cfg() -> ProptestConfig {
    ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
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

fn index_dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::I64), Just(DType::U32), Just(DType::U8)]
}

/// Values exactly representable in every dtype (small integers, halves for floats) so that
/// copies compare exactly and sums stay exact.
fn exact_values(seed: u64, n: usize, dtype: DType) -> Vec<f64> {
    values(seed, n, 8.0)
        .iter()
        .map(|x| {
            if dtype.is_float() {
                (x * 2.0).round() / 2.0
            } else {
                (x + 8.0).floor()
            }
        })
        .collect()
}

/// `count` indices in `[0, size)` drawn from `seed` (empty when `size` is 0).
fn indices(seed: u64, count: usize, size: usize) -> Vec<i64> {
    if size == 0 {
        return Vec::new();
    }
    values(seed, count, 1.0)
        .iter()
        .map(|x| (((x + 1.0) / 2.0 * size as f64) as i64).min(size as i64 - 1))
        .collect()
}

fn index_tensor(idx: &[i64], shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_vec(idx.to_vec(), shape)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn flat(idx: &[usize], shape: &[usize]) -> usize {
    idx.iter().zip(shape).fold(0, |acc, (&i, &d)| acc * d + i)
}

/// Reference gather: out[p] = x[p with p[dim] = index[p]].
fn ref_gather(x: &[f64], shape: &[usize], dim: usize, idx: &[i64], ishape: &[usize]) -> Vec<f64> {
    (0..idx.len())
        .map(|i| {
            let mut p = unravel(i, ishape);
            p[dim] = idx[i] as usize;
            x[flat(&p, shape)]
        })
        .collect()
}

/// Reference scatter_add: out = x; out[p with p[dim] = index[p]] += src[p] over index's positions.
fn ref_scatter_add(
    x: &[f64],
    shape: &[usize],
    dim: usize,
    idx: &[i64],
    ishape: &[usize],
    src: &[f64],
    sshape: &[usize],
) -> Vec<f64> {
    let mut out = x.to_vec();
    for (i, &ix) in idx.iter().enumerate() {
        let p = unravel(i, ishape);
        let mut q = p.clone();
        q[dim] = ix as usize;
        out[flat(&q, shape)] += src[flat(&p, sshape)];
    }
    out
}

/// A shape of rank 1..=3 (dims 0..=4), a dim of it, and an index shape no larger than the shape
/// outside `dim` (any size along `dim`).
fn gather_case() -> impl Strategy<Value = (Vec<usize>, usize, Vec<usize>)> {
    shape_strategy_min(1, 3, 0, 4).prop_flat_map(|shape| {
        let rank = shape.len();
        (Just(shape), 0..rank).prop_flat_map(|(shape, dim)| {
            let ishape: Vec<_> = shape
                .iter()
                .enumerate()
                .map(|(d, &s)| {
                    if d == dim {
                        (0..=5usize).boxed()
                    } else {
                        (0..=s).boxed()
                    }
                })
                .collect();
            (Just(shape), Just(dim), ishape)
        })
    })
}

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn index_select_matches_reference(
        shape in shape_strategy_min(1, 4, 0, 4),
        dim_pick in 0usize..4,
        count in 0usize..6,
        seed in any::<u64>(),
        kind in view_kind(),
        dtype in any_dtype(),
        idtype in index_dtype(),
    ) {
        let dim = dim_pick % shape.len();
        let n: usize = shape.iter().product();
        let x = make_view(&exact_values(seed, n, dtype), &shape, kind, dtype);
        let xv = x.to_vec_f64().unwrap();
        let count = if shape[dim] == 0 { 0 } else { count };
        let idx = indices(seed ^ 1, count, shape[dim]);
        let it = index_tensor(&idx, &[count], idtype);
        let y = x.index_select(dim as isize - shape.len() as isize, &it).unwrap();
        let mut oshape = shape.clone();
        oshape[dim] = count;
        prop_assert_eq!(y.shape(), &oshape[..]);
        prop_assert_eq!(y.dtype(), dtype);
        let expect: Vec<f64> = (0..y.numel())
            .map(|i| {
                let mut p = unravel(i, &oshape);
                p[dim] = idx[p[dim]] as usize;
                xv[flat(&p, &shape)]
            })
            .collect();
        prop_assert_eq!(y.to_vec_f64().unwrap(), expect);
    }

    #[test]
    fn embedding_matches_reference(
        vocab in 1usize..6,
        width in 0usize..5,
        ids_shape in shape_strategy(3, 3),
        seed in any::<u64>(),
        kind in view_kind(),
    ) {
        let table = make_view(&exact_values(seed, vocab * width, DType::F32), &[vocab, width], kind, DType::F32);
        let tv = table.to_vec_f64().unwrap();
        let n: usize = ids_shape.iter().product();
        let ids = indices(seed ^ 2, n, vocab);
        let y = table.embedding(&index_tensor(&ids, &ids_shape, DType::I64)).unwrap();
        let mut oshape = ids_shape.clone();
        oshape.push(width);
        prop_assert_eq!(y.shape(), &oshape[..]);
        let expect: Vec<f64> = ids.iter().flat_map(|&i| tv[i as usize * width..(i as usize + 1) * width].to_vec()).collect();
        prop_assert_eq!(y.to_vec_f64().unwrap(), expect);
    }

    #[test]
    fn gather_matches_reference(
        (shape, dim, ishape) in gather_case(),
        seed in any::<u64>(),
        kind in view_kind(),
        dtype in any_dtype(),
        idtype in index_dtype(),
    ) {
        let n: usize = shape.iter().product();
        let x = make_view(&exact_values(seed, n, dtype), &shape, kind, dtype);
        let xv = x.to_vec_f64().unwrap();
        let m: usize = ishape.iter().product();
        prop_assume!(shape[dim] > 0 || m == 0);
        let idx = indices(seed ^ 3, m, shape[dim]);
        // the index tensor itself as a strided view, too
        let it = make_view(&idx.iter().map(|&i| i as f64).collect::<Vec<_>>(), &ishape, kind, idtype);
        let y = x.gather(dim as isize, &it).unwrap();
        prop_assert_eq!(y.shape(), &ishape[..]);
        prop_assert_eq!(y.to_vec_f64().unwrap(), ref_gather(&xv, &shape, dim, &idx, &ishape));
    }

    #[test]
    fn scatter_add_matches_reference(
        (shape, dim, ishape) in gather_case(),
        extra in prop::collection::vec(0usize..2, 3),
        seed in any::<u64>(),
        kind in view_kind(),
        dtype in any_dtype(),
    ) {
        let n: usize = shape.iter().product();
        let m: usize = ishape.iter().product();
        prop_assume!(shape[dim] > 0 || m == 0);
        let x = make_view(&exact_values(seed, n, dtype), &shape, kind, dtype);
        // src may be larger than index in every dim: only the covered part is read
        let sshape: Vec<usize> = ishape.iter().zip(&extra).map(|(i, e)| i + e).collect();
        let sn: usize = sshape.iter().product();
        // small values keep integer sums in range (u8 wraps like PyTorch, but keep it exact)
        let sv: Vec<f64> = exact_values(seed ^ 4, sn, dtype).iter().map(|v| if dtype.is_float() { *v } else { v.min(3.0) }).collect();
        let xs: Vec<f64> = x.to_vec_f64().unwrap().iter().map(|v| if dtype.is_float() { *v } else { v.min(200.0) }).collect();
        let x = make_view(&xs, &shape, kind, dtype);
        let src = make_view(&sv, &sshape, kind, dtype);
        let idx = indices(seed ^ 5, m, shape[dim]);
        let it = index_tensor(&idx, &ishape, DType::I64);
        let y = x.scatter_add(dim as isize, &it, &src).unwrap();
        prop_assert_eq!(y.shape(), &shape[..]);
        let expect = ref_scatter_add(&xs, &shape, dim, &idx, &ishape, &src.to_vec_f64().unwrap(), &sshape);
        // bf16/f16 round after each add; everything here is a small multiple of 1/2 so sums stay exact
        prop_assert_eq!(y.to_vec_f64().unwrap(), expect);
    }

    #[test]
    fn index_add_matches_reference(
        shape in shape_strategy_min(1, 3, 0, 4),
        dim_pick in 0usize..3,
        count in 0usize..6,
        seed in any::<u64>(),
        kind in view_kind(),
        dtype in prop_oneof![Just(DType::F32), Just(DType::F64), Just(DType::BF16), Just(DType::I64)],
    ) {
        let dim = dim_pick % shape.len();
        let count = if shape[dim] == 0 { 0 } else { count };
        let n: usize = shape.iter().product();
        let x = make_view(&exact_values(seed, n, dtype), &shape, kind, dtype);
        let mut sshape = shape.clone();
        sshape[dim] = count;
        let sn: usize = sshape.iter().product();
        let src = make_view(&exact_values(seed ^ 6, sn, dtype), &sshape, kind, dtype);
        let idx = indices(seed ^ 7, count, shape[dim]);
        let y = x.index_add(dim as isize, &index_tensor(&idx, &[count], DType::U32), &src).unwrap();
        let mut expect = x.to_vec_f64().unwrap();
        let sv = src.to_vec_f64().unwrap();
        for (i, &s) in sv.iter().enumerate() {
            let mut p = unravel(i, &sshape);
            p[dim] = idx[p[dim]] as usize;
            expect[flat(&p, &shape)] += s;
        }
        prop_assert_eq!(y.to_vec_f64().unwrap(), expect);
    }

    #[test]
    fn topk_matches_sorted_reference(
        shape in shape_strategy_min(1, 3, 0, 5),
        dim_pick in 0usize..3,
        k_pick in 0usize..6,
        largest in any::<bool>(),
        nan in any::<bool>(),
        seed in any::<u64>(),
        kind in view_kind(),
        dtype in any_dtype(),
    ) {
        let dim = dim_pick % shape.len();
        let size = shape[dim];
        let k = k_pick.min(size);
        let n: usize = shape.iter().product();
        // coarse values force ties; NaN sorts above everything, as in PyTorch
        let vals: Vec<f64> = exact_values(seed, n, dtype)
            .iter()
            .enumerate()
            .map(|(i, v)| if nan && dtype.is_float() && i % 5 == 2 { f64::NAN } else { (v / 2.0).floor() })
            .collect();
        let x = make_view(&vals, &shape, kind, dtype);
        let (v, i) = x.topk(k, dim as isize, largest).unwrap();
        let mut oshape = shape.clone();
        oshape[dim] = k;
        prop_assert_eq!(v.shape(), &oshape[..]);
        prop_assert_eq!(i.shape(), &oshape[..]);
        prop_assert_eq!(i.dtype(), DType::I64);
        let xv = x.to_vec_f64().unwrap();
        let got_v = v.to_vec_f64().unwrap();
        let got_i = i.to_vec::<i64>().unwrap();
        for o in 0..v.numel() {
            let p = unravel(o, &oshape);
            // the row of x through p, ordered by (value desc or asc, NaN first when largest, index)
            let mut row: Vec<(usize, f64)> = (0..size)
                .map(|j| {
                    let mut q = p.clone();
                    q[dim] = j;
                    (j, xv[flat(&q, &shape)])
                })
                .collect();
            row.sort_by(|a, b| {
                let key = |x: f64| if x.is_nan() { f64::INFINITY } else { x };
                let (ka, kb) = (key(a.1), key(b.1));
                let ord = if largest { kb.partial_cmp(&ka) } else { ka.partial_cmp(&kb) }.unwrap();
                // NaN and +inf cannot both occur here: values are finite
                ord.then(a.0.cmp(&b.0))
            });
            let (j, want) = row[p[dim]];
            prop_assert_eq!(got_i[o], j as i64, "index at {:?}", p);
            prop_assert!(got_v[o] == want || (got_v[o].is_nan() && want.is_nan()), "value at {:?}", p);
        }
    }

    #[test]
    fn triu_tril_match_reference(
        shape in shape_strategy_min(2, 4, 0, 4),
        diagonal in -4i64..5,
        seed in any::<u64>(),
        kind in view_kind(),
        dtype in any_dtype(),
    ) {
        let n: usize = shape.iter().product();
        let x = make_view(&exact_values(seed, n, dtype), &shape, kind, dtype);
        let xv = x.to_vec_f64().unwrap();
        let r = shape.len();
        let keep = |i: usize, upper: bool| {
            let p = unravel(i, &shape);
            let d = p[r - 1] as i64 - p[r - 2] as i64;
            if upper { d >= diagonal } else { d <= diagonal }
        };
        for upper in [true, false] {
            let y = if upper { x.triu(diagonal) } else { x.tril(diagonal) }.unwrap();
            prop_assert_eq!(y.dtype(), dtype);
            let expect: Vec<f64> = (0..n).map(|i| if keep(i, upper) { xv[i] } else { 0.0 }).collect();
            prop_assert_eq!(y.to_vec_f64().unwrap(), expect);
        }
    }
}

#[test]
fn tril_mask_is_the_causal_mask() {
    let m = Tensor::tril_mask(3, 4, 0, Device::Cpu).unwrap();
    assert_eq!(m.dtype(), DType::U8);
    assert_eq!(
        m.to_vec::<u8>().unwrap(),
        vec![1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0]
    );
    let u = Tensor::triu_mask(2, 3, 1, Device::Cpu).unwrap();
    assert_eq!(u.to_vec::<u8>().unwrap(), vec![0, 1, 1, 0, 0, 1]);
}

#[test]
fn topk_handles_large_rows_and_middle_dims() {
    // a row long enough to take the select_nth path with many ties
    let vals: Vec<f64> = (0..2 * 300 * 3).map(|i| ((i * 37) % 101) as f64).collect();
    let x = Tensor::from_vec(vals.clone(), &[2, 300, 3]).unwrap();
    let (v, i) = x.topk(7, 1, true).unwrap();
    let iv = i.to_vec::<i64>().unwrap();
    let vv = v.to_vec::<f64>().unwrap();
    for b in 0..2 {
        for c in 0..3 {
            let mut row: Vec<(usize, f64)> =
                (0..300).map(|j| (j, vals[(b * 300 + j) * 3 + c])).collect();
            row.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
            for r in 0..7 {
                assert_eq!(iv[(b * 7 + r) * 3 + c], row[r].0 as i64);
                assert_eq!(vv[(b * 7 + r) * 3 + c], row[r].1);
            }
        }
    }
}

#[test]
fn index_gradients_match_finite_differences() {
    let x = Tensor::from_vec(values(21, 24, 2.0), &[2, 3, 4]).unwrap();
    let idx = Tensor::from_vec(vec![2i64, 0, 2, 1, 2], &[5]).unwrap();
    grad_check("index_select", std::slice::from_ref(&x), &[true], |x| {
        x[0].index_select(1, &idx)
    });
    grad_check("index_select_t", std::slice::from_ref(&x), &[true], |x| {
        x[0].transpose(0, 2)?.index_select(0, &idx.narrow(0, 0, 3)?)
    });
    let table = Tensor::from_vec(values(22, 15, 1.0), &[5, 3]).unwrap();
    let ids = Tensor::from_vec(vec![4u32, 0, 4, 2], &[2, 2]).unwrap();
    grad_check("embedding", &[table], &[true], |t| t[0].embedding(&ids));

    let gi = Tensor::from_vec(vec![0i64, 2, 2, 1, 0, 0], &[2, 3, 1]).unwrap();
    grad_check("gather", std::slice::from_ref(&x), &[true], |x| {
        x[0].gather(1, &gi)
    });
    // src larger than index: the uncovered part gets a zero gradient
    let src = Tensor::from_vec(values(23, 2 * 4 * 3, 1.0), &[2, 4, 3]).unwrap();
    let si = Tensor::from_vec(vec![1i64, 0, 2, 0, 0, 1, 2, 2, 1, 0, 1, 3], &[2, 3, 2]).unwrap();
    grad_check("scatter_add", &[x.clone(), src], &[true, true], |t| {
        t[0].scatter_add(2, &si, &t[1])
    });
    let add_src = Tensor::from_vec(values(24, 2 * 5 * 4, 1.0), &[2, 5, 4]).unwrap();
    grad_check("index_add", &[x.clone(), add_src], &[true, true], |t| {
        t[0].index_add(1, &idx, &t[1])
    });
    grad_check("topk", std::slice::from_ref(&x), &[true], |x| {
        Ok(x[0].topk(2, 1, true)?.0)
    });
    grad_check("topk_smallest", std::slice::from_ref(&x), &[true], |x| {
        Ok(x[0].topk(3, -1, false)?.0)
    });
    grad_check("triu", std::slice::from_ref(&x), &[true], |x| x[0].triu(1));
    grad_check("tril", std::slice::from_ref(&x), &[true], |x| x[0].tril(-1));
}

#[test]
fn index_errors_name_the_op_and_the_index() {
    let x = Tensor::zeros(&[3, 4], DType::F32, Device::Cpu).unwrap();
    let bad = Tensor::from_vec(vec![0i64, 3], &[2]).unwrap();
    let e = x.index_select(0, &bad).unwrap_err().to_string();
    assert!(
        e.contains("index_select") && e.contains("index 3") && e.contains("size 3"),
        "{e}"
    );
    let neg = Tensor::from_vec(vec![-1i64], &[1]).unwrap();
    let e = x.embedding(&neg).unwrap_err().to_string();
    assert!(e.contains("index -1"), "{e}");
    let fidx = Tensor::from_vec(vec![0f32], &[1]).unwrap();
    let e = x.index_select(0, &fidx).unwrap_err().to_string();
    assert!(e.contains("index_select") && e.contains("f32"), "{e}");
    let gi = Tensor::from_vec(vec![0i64; 5], &[5]).unwrap();
    let e = x.gather(0, &gi).unwrap_err().to_string();
    assert!(e.contains("gather") && e.contains("rank"), "{e}");
    let gi = Tensor::from_vec(vec![0i64; 10], &[2, 5]).unwrap();
    let e = x.gather(0, &gi).unwrap_err().to_string();
    assert!(e.contains("gather") && e.contains("[2, 5]"), "{e}");
    let src = Tensor::zeros(&[1, 4], DType::F32, Device::Cpu).unwrap();
    let e = x
        .scatter_add(
            0,
            &Tensor::zeros(&[2, 4], DType::I64, Device::Cpu).unwrap(),
            &src,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("scatter_add") && e.contains("src"), "{e}");
    let e = x
        .scatter_add(
            0,
            &Tensor::zeros(&[1, 4], DType::I64, Device::Cpu).unwrap(),
            &src.to_dtype(DType::F64).unwrap(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("scatter_add") && e.contains("dtype"), "{e}");
    let e = x.topk(5, 1, true).unwrap_err().to_string();
    assert!(e.contains("topk") && e.contains("k = 5"), "{e}");
    let e = x
        .embedding(&Tensor::zeros(&[1], DType::I64, Device::Cpu).unwrap())
        .is_ok();
    assert!(e);
    let v = Tensor::zeros(&[4], DType::F32, Device::Cpu).unwrap();
    let e = v.triu(0).unwrap_err().to_string();
    assert!(e.contains("triu") && e.contains("2 dims"), "{e}");
    let e = v.embedding(&bad).unwrap_err().to_string();
    assert!(e.contains("embedding") && e.contains("[vocab, dim]"), "{e}");
}
