//! The MoE router and layer against a plain f64 reference: top-k selection, renormalised
//! weights, capacity drops (slot-major, first choices win), the load-balancing loss
//! (transformers' `load_balancing_loss_func`), the layer's mixed output, and the loss's gradient
//! against central finite differences.

mod common;

use common::{gelu, var};

use mgm_fusion::{MoeLayer, MoeRouter};
use mgm_tensor::nn::VarStore;
use mgm_tensor::{DType, Tensor};
use proptest::prelude::*;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn data(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

struct Plain {
    probs: Vec<f64>,
    experts: Vec<usize>,
    weights: Vec<f64>,
    kept: Vec<bool>,
    load: Vec<usize>,
    aux: f64,
    /// Smallest gap between a token's k-th and (k+1)-th probability (ties make top-k ambiguous).
    gap: f64,
}

/// The router by the book, in f64.
fn plain(
    x: &[f64],
    t: usize,
    d: usize,
    gate: &[f64],
    e: usize,
    k: usize,
    cap: Option<f64>,
) -> Plain {
    let mut probs = vec![0f64; t * e];
    let mut experts = vec![0usize; t * k];
    let mut weights = vec![0f64; t * k];
    let mut gap = f64::INFINITY;
    for tok in 0..t {
        let logits: Vec<f64> = (0..e)
            .map(|j| (0..d).map(|c| x[tok * d + c] * gate[j * d + c]).sum())
            .collect();
        let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = logits.iter().map(|l| (l - mx).exp()).sum();
        let p: Vec<f64> = logits.iter().map(|l| (l - mx).exp() / z).collect();
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap());
        if k < e {
            gap = gap.min(p[order[k - 1]] - p[order[k]]);
        }
        let top: f64 = order[..k].iter().map(|&j| p[j]).sum();
        for s in 0..k {
            experts[tok * k + s] = order[s];
            weights[tok * k + s] = p[order[s]] / top;
        }
        probs[tok * e..(tok + 1) * e].copy_from_slice(&p);
    }
    let capacity = cap.map(|c| (c * (t * k) as f64 / e as f64).ceil() as usize);
    let mut load = vec![0usize; e];
    let mut kept = vec![true; t * k];
    for s in 0..k {
        for tok in 0..t {
            let ex = experts[tok * k + s];
            if capacity.is_some_and(|c| load[ex] >= c) {
                kept[tok * k + s] = false;
                weights[tok * k + s] = 0.0;
            } else {
                load[ex] += 1;
            }
        }
    }
    let mut aux = 0f64;
    for j in 0..e {
        let f = experts.iter().filter(|&&x| x == j).count() as f64 / t as f64;
        let pm = (0..t).map(|tok| probs[tok * e + j]).sum::<f64>() / t as f64;
        aux += f * pm;
    }
    Plain {
        probs,
        experts,
        weights,
        kept,
        load,
        aux: aux * e as f64,
        gap,
    }
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn router_matches_plain_reference(
        t in 1..=40usize, d in 1..=12usize, e in 1..=8usize, k_pick in 0..8usize,
        cap in prop_oneof![Just(None), Just(Some(0.5)), Just(Some(1.0)), Just(Some(1.5))],
        seed in any::<u64>(),
    ) {
        let k = 1 + k_pick % e;
        let vs = VarStore::new_trainable(seed);
        let router = MoeRouter::load(&vs, d, e, k, cap).unwrap();
        let x = data(t * d, seed ^ 7);
        let r = router.route(&Tensor::from_vec(x.clone(), &[t, d]).unwrap()).unwrap();
        let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let want = plain(&x64, t, d, &var(&vs, "gate.weight"), e, k, cap);
        prop_assume!(want.gap > 1e-5);
        prop_assert_eq!(&r.experts, &want.experts);
        prop_assert_eq!(&r.kept, &want.kept);
        prop_assert_eq!(&r.load, &want.load);
        prop_assert_eq!(r.dropped, want.kept.iter().filter(|&&v| !v).count());
        for (a, b) in r.probs.to_vec_f64().unwrap().iter().zip(&want.probs) {
            prop_assert!(close(*a, *b, 1e-5), "prob {a} vs {b}");
        }
        for (a, b) in r.weights.to_vec_f64().unwrap().iter().zip(&want.weights) {
            prop_assert!(close(*a, *b, 1e-5), "weight {a} vs {b}");
        }
        let aux = r.aux_loss.to_scalar_f64().unwrap();
        prop_assert!(close(aux, want.aux, 1e-5), "aux {aux} vs {}", want.aux);
        // every token's kept weights sum to 1 without drops
        if cap.is_none() {
            for tok in 0..t {
                let s: f64 = want.weights[tok * k..(tok + 1) * k].iter().sum();
                prop_assert!(close(s, 1.0, 1e-12));
            }
        }
    }
}

#[test]
fn moe_layer_mixes_the_kept_experts() {
    let (t, d, h, e, k) = (13, 6, 5, 4, 2);
    let vs = VarStore::new_trainable(3);
    let layer = MoeLayer::load(&vs, d, h, e, k, Some(1.0)).unwrap();
    let x = data(t * d, 11);
    let (y, r) = layer
        .forward(&Tensor::from_vec(x.clone(), &[t, d]).unwrap())
        .unwrap();
    assert!(
        r.dropped > 0,
        "capacity 1.0 with 13 tokens drops some assignment"
    );
    let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let want = plain(&x64, t, d, &var(&vs, "router.gate.weight"), e, k, Some(1.0));
    assert_eq!(r.experts, want.experts);
    let y = y.to_vec_f64().unwrap();
    for tok in 0..t {
        let mut out = vec![0f64; d];
        for s in 0..k {
            if !want.kept[tok * k + s] {
                continue;
            }
            let ex = want.experts[tok * k + s];
            let p = |n: &str| var(&vs, &format!("experts.{ex}.{n}"));
            let (w1, b1, w2, b2) = (
                p("fc1.weight"),
                p("fc1.bias"),
                p("fc2.weight"),
                p("fc2.bias"),
            );
            let hid: Vec<f64> = (0..h)
                .map(|j| {
                    gelu(
                        b1[j]
                            + (0..d)
                                .map(|c| w1[j * d + c] * x64[tok * d + c])
                                .sum::<f64>(),
                    )
                })
                .collect();
            for c in 0..d {
                let v = b2[c] + (0..h).map(|j| w2[c * h + j] * hid[j]).sum::<f64>();
                out[c] += want.weights[tok * k + s] * v;
            }
        }
        for c in 0..d {
            assert!(
                close(y[tok * d + c], out[c], 1e-5),
                "({tok},{c}): {} vs {}",
                y[tok * d + c],
                out[c]
            );
        }
    }
}

#[test]
fn aux_loss_gradient_matches_finite_differences() {
    let (t, d, e, k) = (9, 5, 4, 2);
    let vs = VarStore::new_trainable(5).with_dtype(DType::F64);
    let router = MoeRouter::load(&vs, d, e, k, None).unwrap();
    let x: Vec<f64> = data(t * d, 2).iter().map(|&v| f64::from(v)).collect();
    let xt = Tensor::from_vec(x.clone(), &[t, d]).unwrap();
    let r = router.route(&xt).unwrap();
    let gate = vs
        .all_vars()
        .into_iter()
        .find(|(n, _)| n == "gate.weight")
        .unwrap()
        .1;
    let grad = r
        .aux_loss
        .backward()
        .unwrap()
        .get_var(&gate)
        .unwrap()
        .to_vec_f64()
        .unwrap();
    let w0 = gate.as_tensor().to_vec_f64().unwrap();
    let h = 1e-6;
    for i in 0..w0.len() {
        let at = |delta: f64| {
            let mut w = w0.clone();
            w[i] += delta;
            plain(&x, t, d, &w, e, k, None).aux
        };
        let fd = (at(h) - at(-h)) / (2.0 * h);
        assert!(
            (grad[i] - fd).abs() <= 1e-7 * (1.0 + fd.abs()),
            "d aux / d w[{i}]: {} vs {fd}",
            grad[i]
        );
    }
}

#[test]
fn bad_router_configs_are_errors() {
    let vs = VarStore::new_trainable(0);
    let e = MoeRouter::load(&vs, 4, 3, 4, None).unwrap_err().to_string();
    assert!(e.contains("top_k must be in 1..=3"), "{e}");
    let e = MoeRouter::load(&vs, 4, 3, 1, Some(0.0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("capacity factor"), "{e}");
    let r = MoeRouter::load(&vs, 4, 3, 1, None).unwrap();
    let e = r
        .route(&Tensor::zeros(&[2, 5], DType::F32, mgm_tensor::Device::Cpu).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("[2, 5]") && e.contains("[T, 4]"), "{e}");
}
