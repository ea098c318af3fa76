//! attention (decode): the fast CPU path against the f64 plain-loop reference (relative
//! Frobenius <= 1e-5), over row/key counts and head widths around the vector width, with and
//! without masks (including fully masked rows), plus NaN propagation.

mod common;

use mgm_kernels::attention::{self, Shape};
use proptest::prelude::*;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const KERNEL: &str = "attention";

fn data(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::cases(64)))]

    #[test]
    fn decode_matches_reference(
        rows in 1..=9usize, keys in 1..=70usize, d in prop_oneof![1..=17usize, Just(64)],
        dv in 1..=33usize, masked in prop_oneof![Just(0.0), 0.0..0.6, Just(1.0)], seed in any::<u64>(),
    ) {
        let s = Shape { rows, keys, d, dv };
        let (q, k, v) = (data(rows * d, seed), data(keys * d, seed ^ 1), data(keys * dv, seed ^ 2));
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 3);
        let mask: Vec<f32> = (0..rows * keys)
            .map(|_| if rng.random::<f64>() < masked { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        for m in [None, Some(&mask[..])] {
            let mut want = vec![0f32; rows * dv];
            attention::reference(&q, &k, &v, m, s, 0.3, &mut want).unwrap();
            let mut got = vec![f32::NAN; rows * dv];
            attention::cpu(&q, &k, &v, m, s, 0.3, &mut got).unwrap();
            // the error relative to the size of the terms each output sums, not to the output:
            // an output that cancels to near zero (one dv = 1 row summed to 4.9e-4 from terms
            // of total size 1.08) is off by f32 rounding of its terms, which a norm of the
            // outputs alone turns into a 2e-4 "relative" error
            let terms = term_sizes(&q, &k, &v, m, s, 0.3);
            let num: f64 = got
                .iter()
                .zip(&want)
                .map(|(&g, &w)| (f64::from(g) - f64::from(w)).powi(2))
                .sum();
            let den: f64 = terms.iter().map(|t| t * t).sum();
            let err = num.sqrt() / den.sqrt().max(f64::MIN_POSITIVE);
            prop_assert!(
                num == 0.0 || err <= 1e-5,
                "{s:?}: relative Frobenius error {err:.3e} > 1e-5 (NaN never passes)"
            );
            common::record(KERNEL, "cpu", if num == 0.0 { 0.0 } else { err });
        }
    }
}

/// `sum_j p_ij |v_jc|` for every output `(i, c)`, in f64: the size of the terms the output
/// sums (`p` the row's softmax of `scale * q k^T`, masked keys left out).
fn term_sizes(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[f32]>,
    s: Shape,
    scale: f64,
) -> Vec<f64> {
    let mut out = vec![0f64; s.rows * s.dv];
    for i in 0..s.rows {
        let scores: Vec<f64> = (0..s.keys)
            .map(|j| {
                let dot: f64 = (0..s.d)
                    .map(|t| f64::from(q[i * s.d + t]) * f64::from(k[j * s.d + t]))
                    .sum();
                scale * dot + mask.map_or(0.0, |m| f64::from(m[i * s.keys + j]))
            })
            .collect();
        let top = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if top == f64::NEG_INFINITY {
            continue;
        }
        let e: Vec<f64> = scores.iter().map(|x| (x - top).exp()).collect();
        let z: f64 = e.iter().sum();
        for c in 0..s.dv {
            out[i * s.dv + c] = (0..s.keys)
                .map(|j| e[j] / z * f64::from(v[j * s.dv + c]).abs())
                .sum();
        }
    }
    out
}

#[test]
fn decode_masked_rows_are_zero_and_nan_stays_in_its_row() {
    let s = Shape {
        rows: 2,
        keys: 3,
        d: 2,
        dv: 2,
    };
    let mut q = data(4, 1);
    let (k, v) = (data(6, 2), data(6, 3));
    let mask = [
        f32::NEG_INFINITY,
        f32::NEG_INFINITY,
        f32::NEG_INFINITY,
        0.0,
        0.0,
        0.0,
    ];
    let mut out = [1f32; 4];
    attention::cpu(&q, &k, &v, Some(&mask), s, 1.0, &mut out).unwrap();
    assert_eq!(&out[..2], &[0.0, 0.0]);
    assert!(out[2..].iter().all(|x| x.is_finite()));
    q[3] = f32::NAN;
    attention::cpu(&q, &k, &v, None, s, 1.0, &mut out).unwrap();
    assert!(out[..2].iter().all(|x| x.is_finite()) && out[2..].iter().all(|x| x.is_nan()));
    let e = attention::cpu(&q, &k, &v, None, Shape { keys: 4, ..s }, 1.0, &mut out).unwrap_err();
    assert!(e.to_string().contains("`k` has 6 elements"), "{e}");
}
