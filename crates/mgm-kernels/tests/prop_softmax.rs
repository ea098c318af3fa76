//! softmax: fast CPU and PTX (mgm-ptx executor, worst-case approximations) against the f64
//! plain-loop reference (|diff| <= 1e-5 * (1 + |ref|)), plus the special rows (all -inf, NaN,
//! +inf) and argument errors.

mod common;

use mgm_kernels::{Error, softmax};
use proptest::prelude::*;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const KERNEL: &str = "softmax";
const TOL: f64 = 1e-5;

/// Seeded values in [-scale, scale), with about `masked` of them -inf (attention masks), and
/// some rows fully masked when `masked` is large.
fn data(len: usize, scale: f32, masked: f64, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len)
        .map(|_| {
            if rng.random::<f64>() < masked {
                f32::NEG_INFINITY
            } else {
                rng.random_range(-scale..scale)
            }
        })
        .collect()
}

fn reference(x: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    softmax::reference_f64(&x64, rows, cols).expect("reference")
}

/// Output pre-filled with NaN so an element the kernel never writes fails the check.
fn cpu(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut y = vec![f32::NAN; x.len()];
    softmax::cpu(x, &mut y, rows, cols).expect("cpu");
    y
}

fn ptx(x: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>, String> {
    let mut y = vec![f32::NAN; x.len()];
    let launch = softmax::launch(x, &mut y, rows, cols).map_err(|e| e.to_string())?;
    common::run_ptx(launch).map_err(|e| format!("{KERNEL} rows={rows} cols={cols}: {e}"))?;
    Ok(y)
}

fn cols_strategy(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![1..=4usize, 30..=34usize, 1..=max]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::cases(128)))]

    #[test]
    fn cpu_matches_reference(
        rows in 1..=40usize, cols in cols_strategy(700), scale in prop_oneof![0.1f32..30.0, 30.0f32..300.0],
        masked in prop_oneof![Just(0.0), 0.0..0.5, Just(0.97)], seed in any::<u64>(),
    ) {
        let x = data(rows * cols, scale, masked, seed);
        let what = format!("{KERNEL} cpu rows={rows} cols={cols}");
        let err = common::check_elementwise(&what, &cpu(&x, rows, cols), &reference(&x, rows, cols), TOL)
            .map_err(TestCaseError::fail)?;
        common::record(KERNEL, "cpu", err);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::cases(64)))]

    #[test]
    fn ptx_matches_reference(
        rows in 1..=13usize, cols in cols_strategy(300), scale in prop_oneof![0.1f32..30.0, 30.0f32..300.0],
        masked in prop_oneof![Just(0.0), 0.0..0.5, Just(0.97)], seed in any::<u64>(),
    ) {
        let x = data(rows * cols, scale, masked, seed);
        let got = ptx(&x, rows, cols).map_err(TestCaseError::fail)?;
        let what = format!("{KERNEL} ptx rows={rows} cols={cols}");
        let err = common::check_elementwise(&what, &got, &reference(&x, rows, cols), TOL)
            .map_err(TestCaseError::fail)?;
        common::record(KERNEL, "ptx", err);
    }
}

/// Long rows (each lane loops many times), a single element, and rows past a block boundary.
#[test]
fn ptx_wide_and_single_element_rows_match_reference() {
    for (i, &(rows, cols)) in [(1, 1), (5, 1), (2, 1500), (9, 64)].iter().enumerate() {
        let x = data(rows * cols, 8.0, 0.1, 40 + i as u64);
        let what = format!("{KERNEL} ptx rows={rows} cols={cols}");
        let got = ptx(&x, rows, cols).unwrap();
        let err = common::check_elementwise(&what, &got, &reference(&x, rows, cols), TOL).unwrap();
        common::record(KERNEL, "ptx", err);
    }
}

/// Row 0 all -inf, row 1 a NaN, row 2 a +inf, row 3 ordinary with one -inf.
fn special_rows(cols: usize) -> Vec<f32> {
    let mut x = data(4 * cols, 3.0, 0.0, 9);
    x[..cols].fill(f32::NEG_INFINITY);
    x[cols + cols / 2] = f32::NAN;
    x[2 * cols + cols / 3] = f32::INFINITY;
    x[3 * cols] = f32::NEG_INFINITY;
    x
}

fn check_special(path: &str, y: &[f32], cols: usize) {
    assert!(
        y[..cols].iter().all(|&v| v == 0.0),
        "{KERNEL} {path}: all -inf row must be zeros"
    );
    assert!(
        y[cols..2 * cols].iter().all(|v| v.is_nan()),
        "{KERNEL} {path}: NaN row must be NaN"
    );
    assert!(
        y[2 * cols..3 * cols].iter().all(|v| v.is_nan()),
        "{KERNEL} {path}: +inf row must be NaN"
    );
    let last = &y[3 * cols..];
    assert_eq!(last[0], 0.0, "{KERNEL} {path}: masked entry");
    let sum: f32 = last.iter().sum();
    assert!((sum - 1.0).abs() < 1e-5, "{KERNEL} {path}: row sum {sum}");
}

#[test]
fn masked_nan_and_inf_rows_follow_pytorch() {
    for cols in [1, 7, 45] {
        let x = special_rows(cols);
        let r: Vec<f32> = reference(&x, 4, cols).iter().map(|&v| v as f32).collect();
        if cols > 1 {
            check_special("reference", &r, cols);
            check_special("cpu", &cpu(&x, 4, cols), cols);
            check_special("ptx", &ptx(&x, 4, cols).unwrap(), cols);
        }
        // One column: every special value sits in the only entry; -inf alone is still zeros.
        let y = ptx(&x, 4, cols).unwrap();
        assert_eq!(y[0], 0.0, "{KERNEL} ptx: masked single entry");
    }
}

#[test]
fn nan_and_all_masked_in_one_row_is_nan() {
    // max.f32 skips the NaN, so the kernel sees an "all -inf" max: the NaN must still win.
    let x = [f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY];
    assert!(reference(&x, 1, 3).iter().all(|v| v.is_nan()));
    assert!(cpu(&x, 1, 3).iter().all(|v| v.is_nan()));
    assert!(ptx(&x, 1, 3).unwrap().iter().all(|v| v.is_nan()));
}

#[test]
fn empty_shapes_do_nothing() {
    for (rows, cols) in [(0, 5), (3, 0), (0, 0)] {
        let x = vec![1.0f32; rows * cols];
        let mut y = vec![0.0f32; rows * cols];
        softmax::reference(&x, &mut y, rows, cols).unwrap();
        softmax::cpu(&x, &mut y, rows, cols).unwrap();
        common::run_ptx(softmax::launch(&x, &mut y, rows, cols).unwrap()).unwrap();
    }
}

#[test]
fn wrong_lengths_name_the_kernel() {
    let x = [0.0f32; 6];
    let mut y = [0.0f32; 5];
    for e in [
        softmax::cpu(&x, &mut y, 2, 3).unwrap_err(),
        softmax::reference(&x, &mut y, 2, 3).unwrap_err(),
        softmax::launch(&x, &mut y, 2, 3).unwrap_err(),
        softmax::cpu(&x[..5], &mut y, 2, 3).unwrap_err(),
        softmax::reference_f64(&[0.0; 4], 2, 3).unwrap_err(),
    ] {
        assert!(
            matches!(
                e,
                Error::Length {
                    kernel: "softmax",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().starts_with("softmax:"), "{e}");
    }
    let e = softmax::cpu(&[], &mut [], usize::MAX, 2).unwrap_err();
    assert!(e.to_string().contains("softmax"), "{e}");
}
