//! Scaled dot-product attention and MultiHeadAttention against plain f64 loops: broadcast and
//! strided operands, bool and float masks, fully masked rows, the merged-head output layout,
//! f32/bf16 tolerances, the autograd path (finite differences) and shape errors.
mod common;
use std::collections::HashMap;

use common::*;
use mgm_tensor::nn::{
    Module, MultiHeadAttention, ProjNames, VarStore, scaled_dot_product_attention,
    scaled_dot_product_attention_merged,
};
use mgm_tensor::{DType, Tensor};

fn t64(seed: u64, shape: &[usize], scale: f64) -> Tensor {
    Tensor::from_vec(values(seed, shape.iter().product(), scale), shape).unwrap()
}

/// Element at logical multi-index `idx` of a row-major `shape`, broadcasting size-1 dims.
fn at(v: &[f64], shape: &[usize], idx: &[usize]) -> f64 {
    let off = idx.len() - shape.len();
    let mut flat = 0;
    for (d, &s) in shape.iter().enumerate() {
        let i = if s == 1 { 0 } else { idx[off + d] };
        flat = flat * s + i;
    }
    v[flat]
}

/// Mask kinds for the reference: additive float values or bool (nonzero = attend).
enum RefMask<'a> {
    Float(&'a [f64], &'a [usize]),
    Bool(&'a [u8], &'a [usize]),
}

/// The plain-loop reference: batch dims broadcast, f64 throughout, all-masked rows give zeros.
#[allow(clippy::too_many_arguments)]
fn reference(
    q: (&[f64], &[usize]),
    k: (&[f64], &[usize]),
    v: (&[f64], &[usize]),
    mask: Option<RefMask>,
    batch: &[usize],
    scale: f64,
) -> Vec<f64> {
    let (lq, d) = (q.1[q.1.len() - 2], q.1[q.1.len() - 1]);
    let lk = k.1[k.1.len() - 2];
    let dv = v.1[v.1.len() - 1];
    let count: usize = batch.iter().product();
    let mut out = Vec::new();
    for b in 0..count {
        let bi = unravel(b, batch);
        for i in 0..lq {
            let mut scores = vec![0f64; lk];
            for (j, s) in scores.iter_mut().enumerate() {
                let mut acc = 0.0;
                for c in 0..d {
                    let qi = [bi.clone(), vec![i, c]].concat();
                    let ki = [bi.clone(), vec![j, c]].concat();
                    acc += at(q.0, q.1, &qi) * at(k.0, k.1, &ki);
                }
                *s = acc * scale;
                let mi = [bi.clone(), vec![i, j]].concat();
                match &mask {
                    Some(RefMask::Float(m, ms)) => *s += at(m, ms, &mi),
                    Some(RefMask::Bool(m, ms)) => {
                        let mf: Vec<f64> = m.iter().map(|&x| x as f64).collect();
                        if at(&mf, ms, &mi) == 0.0 {
                            *s = f64::NEG_INFINITY;
                        }
                    }
                    None => {}
                }
            }
            let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = if mx == f64::NEG_INFINITY {
                vec![0.0; lk]
            } else {
                let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                e.iter().map(|x| x / z).collect()
            };
            for c in 0..dv {
                let mut acc = 0.0;
                for (j, pj) in p.iter().enumerate() {
                    let vi = [bi.clone(), vec![j, c]].concat();
                    acc += pj * at(v.0, v.1, &vi);
                }
                out.push(acc);
            }
        }
    }
    out
}

fn vals(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

#[test]
fn sdpa_f32_matches_loop_reference_with_broadcast_batch() {
    // k/v shared by the batch ([1, H, ..]) as in cross-attention over one memory
    let (qs, ks, vs) = ([2, 3, 5, 8], [1, 3, 7, 8], [1, 3, 7, 6]);
    let (q, k, v) = (t64(1, &qs, 1.0), t64(2, &ks, 1.0), t64(3, &vs, 1.0));
    let scale = 1.0 / 8f64.sqrt();
    let expect = reference(
        (&vals(&q), &qs),
        (&vals(&k), &ks),
        (&vals(&v), &vs),
        None,
        &[2, 3],
        scale,
    );
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let y = scaled_dot_product_attention(&f(&q), &f(&k), &f(&v), None, None).unwrap();
    assert_eq!(y.shape(), &[2, 3, 5, 6]);
    assert_eq!(y.dtype(), DType::F32);
    let err = rel_frobenius(&vals(&y), &expect);
    assert!(err <= 1e-5, "relative Frobenius error {err}");
}

#[test]
fn sdpa_f64_reads_transposed_views_without_copies() {
    // q/k/v as [B, T, H, d] projections viewed as [B, H, T, d]
    let (b, t, h, d) = (2, 9, 4, 5);
    let base = |s| t64(s, &[b, t, h, d], 1.0);
    let (q, k, v) = (base(4), base(5), base(6));
    let view = |x: &Tensor| x.transpose(1, 2).unwrap();
    let (qv, kv, vv) = (view(&q), view(&k), view(&v));
    assert!(!qv.is_contiguous());
    let y = scaled_dot_product_attention(&qv, &kv, &vv, None, Some(0.3)).unwrap();
    let c = |x: &Tensor| vals(&x.contiguous().unwrap());
    let s = [b, h, t, d];
    let expect = reference(
        (&c(&qv), &s),
        (&c(&kv), &s),
        (&c(&vv), &s),
        None,
        &[b, h],
        0.3,
    );
    assert_close(&vals(&y), &expect, "strided f64 sdpa");
}

#[test]
fn sdpa_bool_mask_true_attends_and_fully_masked_row_is_zero() {
    let (qs, ks) = ([1, 2, 4, 3], [1, 2, 5, 3]);
    let (q, k, v) = (t64(7, &qs, 1.0), t64(8, &ks, 1.0), t64(9, &ks, 1.0));
    // [Lq, Lk] mask broadcast over batch and heads; query row 2 sees no key at all
    let ms = [4, 5];
    let m: Vec<u8> = (0..20)
        .map(|i| {
            if i / 5 == 2 {
                0
            } else {
                u8::from((i * 7) % 3 != 0)
            }
        })
        .collect();
    let mask = Tensor::from_vec(m.clone(), &ms).unwrap();
    let y = scaled_dot_product_attention(&q, &k, &v, Some(&mask), None).unwrap();
    let expect = reference(
        (&vals(&q), &qs),
        (&vals(&k), &ks),
        (&vals(&v), &ks),
        Some(RefMask::Bool(&m, &ms)),
        &[1, 2],
        1.0 / 3f64.sqrt(),
    );
    let got = vals(&y);
    assert_close(&got, &expect, "bool-masked sdpa");
    // row 2 of each head is exactly zero, never NaN
    for head in 0..2 {
        let row = &got[(head * 4 + 2) * 3..(head * 4 + 3) * 3];
        assert!(row.iter().all(|&x| x == 0.0), "fully masked row: {row:?}");
    }
}

#[test]
fn sdpa_float_mask_is_added_to_the_scores() {
    let (qs, ks) = ([3, 6, 4], [3, 6, 4]);
    let (q, k, v) = (t64(10, &qs, 1.0), t64(11, &ks, 1.0), t64(12, &ks, 1.0));
    // per-batch mask [3, 1, 6]: broadcast over the query rows (a key-padding mask)
    let ms = [3, 1, 6];
    let mut m = values(13, 18, 2.0);
    m[4] = f64::NEG_INFINITY;
    let mask = Tensor::from_vec(m.clone(), &ms).unwrap();
    let y = scaled_dot_product_attention(&q, &k, &v, Some(&mask), Some(0.7)).unwrap();
    let expect = reference(
        (&vals(&q), &qs),
        (&vals(&k), &ks),
        (&vals(&v), &ks),
        Some(RefMask::Float(&m, &ms)),
        &[3],
        0.7,
    );
    assert_close(&vals(&y), &expect, "float-masked sdpa");
}

#[test]
fn sdpa_merged_equals_sdpa_then_transpose_reshape() {
    let (b, h, lq, lk, d) = (2, 3, 6, 4, 5);
    let q = t64(14, &[b, h, lq, d], 1.0);
    let k = t64(15, &[b, h, lk, d], 1.0);
    let v = t64(16, &[b, h, lk, d], 1.0);
    let merged = scaled_dot_product_attention_merged(&q, &k, &v, None, None).unwrap();
    assert_eq!(merged.shape(), &[b, lq, h * d]);
    let s = [b, h, lq, d];
    let sk = [b, h, lk, d];
    let per_head = reference(
        (&vals(&q), &s),
        (&vals(&k), &sk),
        (&vals(&v), &sk),
        None,
        &[b, h],
        1.0 / 5f64.sqrt(),
    );
    // per_head is [b, h, lq, d]; merged is [b, lq, h, d]
    let got = vals(&merged);
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..lq {
                for c in 0..d {
                    let r = per_head[((bi * h + hi) * lq + i) * d + c];
                    let a = got[((bi * lq + i) * h + hi) * d + c];
                    assert!(
                        (a - r).abs() <= 1e-12 * (1.0 + r.abs()),
                        "b{bi} h{hi} i{i} c{c}"
                    );
                }
            }
        }
    }
}

#[test]
fn sdpa_large_f32_uses_row_blocks_and_matches_reference() {
    // one batch entry with many query rows: the kernel splits rows across tasks
    let (qs, ks) = ([1, 1, 70, 16], [1, 1, 33, 16]);
    let (q, k, v) = (t64(17, &qs, 1.0), t64(18, &ks, 1.0), t64(19, &ks, 1.0));
    let expect = reference(
        (&vals(&q), &qs),
        (&vals(&k), &ks),
        (&vals(&v), &ks),
        None,
        &[1, 1],
        0.25,
    );
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let y = scaled_dot_product_attention(&f(&q), &f(&k), &f(&v), None, None).unwrap();
    let err = rel_frobenius(&vals(&y), &expect);
    assert!(err <= 1e-5, "relative Frobenius error {err}");
}

#[test]
fn sdpa_bf16_within_one_percent() {
    let (qs, ks) = ([2, 2, 9, 8], [2, 2, 11, 8]);
    let (q, k, v) = (t64(20, &qs, 1.0), t64(21, &ks, 1.0), t64(22, &ks, 1.0));
    let b = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
    let y = scaled_dot_product_attention(&b(&q), &b(&k), &b(&v), None, None).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let expect = reference(
        (&vals(&q), &qs),
        (&vals(&k), &ks),
        (&vals(&v), &ks),
        None,
        &[2, 2],
        1.0 / 8f64.sqrt(),
    );
    let err = rel_frobenius(&vals(&y), &expect);
    assert!(err <= 1e-2, "bf16 relative Frobenius error {err}");
}

#[test]
fn sdpa_gradients_match_finite_differences() {
    let q = t64(23, &[1, 2, 3, 4], 1.0);
    let k = t64(24, &[1, 2, 5, 4], 1.0);
    let v = t64(25, &[1, 2, 5, 3], 1.0);
    let mask = Tensor::from_vec(vec![1u8, 1, 0, 1, 1], &[5]).unwrap();
    grad_check("sdpa", &[q, k, v], &[true, true, true], |x| {
        scaled_dot_product_attention(&x[0], &x[1], &x[2], Some(&mask), None)
    });
}

#[test]
fn sdpa_tracked_and_untracked_paths_agree() {
    let q = t64(26, &[2, 2, 6, 4], 1.0);
    let k = t64(27, &[2, 2, 6, 4], 1.0);
    let fused = scaled_dot_product_attention_merged(&q, &k, &k, None, None).unwrap();
    let var = mgm_tensor::Var::from_tensor(&q).unwrap();
    let composed =
        scaled_dot_product_attention_merged(&var.as_tensor(), &k, &k, None, None).unwrap();
    assert!(composed.is_tracked());
    assert_close_tol(&vals(&composed), &vals(&fused), 1e-12, "tracked vs fused");
}

#[test]
fn sdpa_rejects_mismatched_shapes_and_masks() {
    let q = t64(28, &[2, 5, 4], 1.0);
    let k = t64(29, &[2, 6, 3], 1.0);
    let e = scaled_dot_product_attention(&q, &k, &k, None, None).unwrap_err();
    assert!(e.to_string().contains("head dims differ (4 != 3)"), "{e}");
    let k = t64(29, &[2, 6, 4], 1.0);
    let v = t64(30, &[2, 7, 4], 1.0);
    let e = scaled_dot_product_attention(&q, &k, &v, None, None).unwrap_err();
    assert!(
        e.to_string().contains("key and value lengths differ"),
        "{e}"
    );
    let mask = Tensor::from_vec(vec![1u8; 10], &[2, 5]).unwrap();
    let e = scaled_dot_product_attention(&q, &k, &k, Some(&mask), None).unwrap_err();
    assert!(e.to_string().contains("[2, 5, 6]"), "{e}");
}

fn store(entries: Vec<(String, Tensor)>) -> VarStore {
    VarStore::from_tensors(entries.into_iter().collect::<HashMap<_, _>>()).unwrap()
}

#[test]
fn multi_head_attention_matches_loop_reference_with_clip_names() {
    let (b, t, dim, heads) = (2, 7, 12, 3);
    let mut entries = Vec::new();
    let mut w = HashMap::new();
    for (i, n) in ["q_proj", "k_proj", "v_proj", "out_proj"]
        .iter()
        .enumerate()
    {
        let wt = t64(40 + i as u64, &[dim, dim], 0.4);
        let bt = t64(50 + i as u64, &[dim], 0.4);
        w.insert(*n, (vals(&wt), vals(&bt)));
        entries.push((format!("attn.{n}.weight"), wt));
        entries.push((format!("attn.{n}.bias"), bt));
    }
    let vs = store(entries);
    let mha = MultiHeadAttention::load(&vs.pp("attn"), dim, heads, ProjNames::CLIP, true).unwrap();
    vs.finish().unwrap();
    let x = t64(60, &[b, t, dim], 1.0);
    let y = mha.forward(&x).unwrap();
    assert_eq!(y.shape(), &[b, t, dim]);

    let xv = vals(&x);
    let proj = |n: &str, inp: &[f64]| -> Vec<f64> {
        let (wv, bv) = &w[n];
        let rows = inp.len() / dim;
        let mut o = vec![0.0; rows * dim];
        for r in 0..rows {
            for j in 0..dim {
                let mut acc = bv[j];
                for c in 0..dim {
                    acc += inp[r * dim + c] * wv[j * dim + c];
                }
                o[r * dim + j] = acc;
            }
        }
        o
    };
    let hd = dim / heads;
    // [b, t, h, hd] -> [b, h, t, hd]
    let split = |p: Vec<f64>| -> Vec<f64> {
        let mut o = vec![0.0; p.len()];
        for bi in 0..b {
            for ti in 0..t {
                for hi in 0..heads {
                    for c in 0..hd {
                        o[((bi * heads + hi) * t + ti) * hd + c] =
                            p[(bi * t + ti) * dim + hi * hd + c];
                    }
                }
            }
        }
        o
    };
    let (q, k, v) = (
        split(proj("q_proj", &xv)),
        split(proj("k_proj", &xv)),
        split(proj("v_proj", &xv)),
    );
    let s = [b, heads, t, hd];
    let att = reference(
        (&q, &s),
        (&k, &s),
        (&v, &s),
        None,
        &[b, heads],
        1.0 / (hd as f64).sqrt(),
    );
    let mut merged = vec![0.0; att.len()];
    for bi in 0..b {
        for hi in 0..heads {
            for ti in 0..t {
                for c in 0..hd {
                    merged[(bi * t + ti) * dim + hi * hd + c] =
                        att[((bi * heads + hi) * t + ti) * hd + c];
                }
            }
        }
    }
    let expect = proj("out_proj", &merged);
    assert_close(&vals(&y), &expect, "MultiHeadAttention f64");

    // f32 weights and input: within the f32 attention tolerance
    let vs32 = vs.with_dtype(DType::F32);
    let mha32 =
        MultiHeadAttention::load(&vs32.pp("attn"), dim, heads, ProjNames::CLIP, true).unwrap();
    let y32 = mha32.forward(&x.to_dtype(DType::F32).unwrap()).unwrap();
    let err = rel_frobenius(&vals(&y32), &expect);
    assert!(err <= 1e-5, "f32 relative Frobenius error {err}");
}

#[test]
fn multi_head_attention_rejects_width_not_divisible_by_heads() {
    let vs = VarStore::new_trainable(0);
    let e = MultiHeadAttention::load(&vs.pp("attn"), 10, 3, ProjNames::LLAMA, true).unwrap_err();
    assert!(e.to_string().contains("split into 3 heads"), "{e}");
}

#[test]
fn sdpa_empty_head_dim_averages_values_and_no_keys_gives_zeros() {
    // d = 0: every score is 0, so each query averages the values
    let q = Tensor::zeros(&[1, 3, 0], DType::F32, mgm_tensor::Device::Cpu).unwrap();
    let k = Tensor::zeros(&[1, 4, 0], DType::F32, mgm_tensor::Device::Cpu).unwrap();
    let v = t64(31, &[1, 4, 2], 1.0).to_dtype(DType::F32).unwrap();
    let y = scaled_dot_product_attention(&q, &k, &v, None, Some(1.0)).unwrap();
    let vv = vals(&v);
    let mean = [
        (0..4).map(|j| vv[j * 2]).sum::<f64>() / 4.0,
        (0..4).map(|j| vv[j * 2 + 1]).sum::<f64>() / 4.0,
    ];
    let expect: Vec<f64> = (0..3).flat_map(|_| mean).collect();
    assert_close(&vals(&y), &expect, "d = 0");
    // Lk = 0: nothing to attend to
    let q = t64(32, &[2, 3, 4], 1.0);
    let k = Tensor::zeros(&[2, 0, 4], DType::F64, mgm_tensor::Device::Cpu).unwrap();
    let v = Tensor::zeros(&[2, 0, 5], DType::F64, mgm_tensor::Device::Cpu).unwrap();
    let y = scaled_dot_product_attention(&q, &k, &v, None, None).unwrap();
    assert_eq!(y.shape(), &[2, 3, 5]);
    assert!(vals(&y).iter().all(|&x| x == 0.0));
}
