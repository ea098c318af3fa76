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
            let want64: Vec<f64> = want.iter().map(|&x| f64::from(x)).collect();
            let err = common::check_frobenius(&format!("{s:?}"), &got, &want64, 1e-5)
                .map_err(TestCaseError::fail)?;
            common::record(KERNEL, "cpu", err);
        }
    }
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
