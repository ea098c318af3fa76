//! rms_norm: fast CPU and PTX (mgm-ptx executor) against the f64 plain-loop reference
//! (|diff| <= 1e-5 * (1 + |ref|)) for the LLaMA (`* w`) and Gemma (`* (1 + w)`) variants, plus
//! edge cases and argument errors.

mod common;

use mgm_kernels::Error;
use mgm_kernels::rms_norm::{self, Variant};
use proptest::prelude::*;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const KERNEL: &str = "rms_norm";
const TOL: f64 = 1e-5;

fn data(len: usize, lo: f32, hi: f32, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(lo..hi)).collect()
}

struct Case {
    rows: usize,
    cols: usize,
    eps: f32,
    variant: Variant,
    x: Vec<f32>,
    w: Vec<f32>,
}

impl Case {
    fn new(rows: usize, cols: usize, scale: f32, variant: Variant, seed: u64) -> Case {
        Case {
            rows,
            cols,
            eps: 1e-6,
            variant,
            x: data(rows * cols, -scale, scale, seed),
            w: data(cols, -2.0, 2.0, seed ^ 0x5151),
        }
    }

    fn what(&self, path: &str) -> String {
        format!(
            "{KERNEL} {path} rows={} cols={} {:?}",
            self.rows, self.cols, self.variant
        )
    }

    fn reference(&self) -> Vec<f64> {
        let wide = |s: &[f32]| s.iter().map(|&v| f64::from(v)).collect::<Vec<f64>>();
        rms_norm::reference_f64(
            &wide(&self.x),
            &wide(&self.w),
            self.rows,
            self.cols,
            self.eps,
            self.variant,
        )
        .expect("reference")
    }

    /// Output pre-filled with NaN so an element the kernel never writes fails the check.
    fn cpu(&self) -> Vec<f32> {
        let mut y = vec![f32::NAN; self.x.len()];
        rms_norm::cpu(
            &self.x,
            &self.w,
            &mut y,
            self.rows,
            self.cols,
            self.eps,
            self.variant,
        )
        .expect("cpu");
        y
    }

    fn ptx(&self) -> Result<Vec<f32>, String> {
        let mut y = vec![f32::NAN; self.x.len()];
        let launch = rms_norm::launch(
            &self.x,
            &self.w,
            &mut y,
            self.rows,
            self.cols,
            self.eps,
            self.variant,
        )
        .map_err(|e| e.to_string())?;
        common::run_ptx(launch).map_err(|e| format!("{}: {e}", self.what("ptx")))?;
        Ok(y)
    }
}

fn variant() -> impl Strategy<Value = Variant> {
    prop_oneof![Just(Variant::Llama), Just(Variant::Gemma)]
}

fn cols_strategy(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![1..=4usize, 30..=34usize, 1..=max]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::cases(128)))]

    #[test]
    fn cpu_matches_reference(
        rows in 1..=40usize, cols in cols_strategy(900), scale in prop_oneof![0.01f32..1.0, 1.0f32..100.0],
        v in variant(), seed in any::<u64>(),
    ) {
        let c = Case::new(rows, cols, scale, v, seed);
        let err = common::check_elementwise(&c.what("cpu"), &c.cpu(), &c.reference(), TOL)
            .map_err(TestCaseError::fail)?;
        common::record(KERNEL, "cpu", err);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::cases(64)))]

    #[test]
    fn ptx_matches_reference(
        rows in 1..=12usize, cols in cols_strategy(400), scale in prop_oneof![0.01f32..1.0, 1.0f32..100.0],
        v in variant(), seed in any::<u64>(),
    ) {
        let c = Case::new(rows, cols, scale, v, seed);
        let got = c.ptx().map_err(TestCaseError::fail)?;
        let err = common::check_elementwise(&c.what("ptx"), &got, &c.reference(), TOL)
            .map_err(TestCaseError::fail)?;
        common::record(KERNEL, "ptx", err);
    }
}

/// One column, a one-warp block, and wide rows whose block has 8 warps (the cross-warp
/// reduction and its barrier) with several columns per thread.
#[test]
fn ptx_block_sizes_match_reference() {
    for (i, &(rows, cols)) in [(3, 1), (2, 32), (2, 129), (2, 1100), (1, 4100)]
        .iter()
        .enumerate()
    {
        for v in [Variant::Llama, Variant::Gemma] {
            let c = Case::new(rows, cols, 3.0, v, 70 + i as u64);
            let got = c.ptx().unwrap();
            let err = common::check_elementwise(&c.what("ptx"), &got, &c.reference(), TOL).unwrap();
            common::record(KERNEL, "ptx", err);
            let err =
                common::check_elementwise(&c.what("cpu"), &c.cpu(), &c.reference(), TOL).unwrap();
            common::record(KERNEL, "cpu", err);
        }
    }
}

#[test]
fn gemma_adds_one_to_the_weight() {
    // With w = 0 Gemma is a plain RMS normalisation and LLaMA gives zeros.
    let mut c = Case::new(2, 9, 2.0, Variant::Gemma, 5);
    c.w.fill(0.0);
    let g = c.ptx().unwrap();
    for (r, row) in c.x.chunks(9).zip(g.chunks(9)) {
        let rms = (r.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / 9.0 + 1e-6).sqrt();
        for (&xv, &yv) in r.iter().zip(row) {
            assert!((f64::from(yv) - f64::from(xv) / rms).abs() < 1e-5);
        }
    }
    c.variant = Variant::Llama;
    assert!(c.ptx().unwrap().iter().all(|&v| v == 0.0));
    assert!(c.cpu().iter().all(|&v| v == 0.0));
}

#[test]
fn zero_row_stays_zero() {
    let mut c = Case::new(3, 50, 1.0, Variant::Llama, 8);
    c.x[50..100].fill(0.0);
    for (path, y) in [("cpu", c.cpu()), ("ptx", c.ptx().unwrap())] {
        assert!(
            y[50..100].iter().all(|&v| v == 0.0),
            "{KERNEL} {path}: zero row"
        );
        common::check_elementwise(&c.what(path), &y, &c.reference(), TOL).unwrap();
    }
}

#[test]
fn empty_shapes_do_nothing() {
    for (rows, cols) in [(0, 5), (3, 0), (0, 0)] {
        let (x, w) = (vec![1.0f32; rows * cols], vec![1.0f32; cols]);
        let mut y = vec![0.0f32; rows * cols];
        rms_norm::reference(&x, &w, &mut y, rows, cols, 1e-6, Variant::Llama).unwrap();
        rms_norm::cpu(&x, &w, &mut y, rows, cols, 1e-6, Variant::Gemma).unwrap();
        let l = rms_norm::launch(&x, &w, &mut y, rows, cols, 1e-6, Variant::Llama).unwrap();
        common::run_ptx(l).unwrap();
    }
}

#[test]
fn bad_arguments_name_the_kernel() {
    let (x, w) = ([0.0f32; 6], [0.0f32; 3]);
    let mut y = [0.0f32; 6];
    let l = Variant::Llama;
    let errs = [
        rms_norm::cpu(&x[..5], &w, &mut y, 2, 3, 1e-6, l).unwrap_err(),
        rms_norm::cpu(&x, &w[..2], &mut y, 2, 3, 1e-6, l).unwrap_err(),
        rms_norm::reference(&x, &w, &mut y[..4], 2, 3, 1e-6, l).unwrap_err(),
        rms_norm::launch(&x, &w, &mut y, 3, 3, 1e-6, l).unwrap_err(),
    ];
    for e in errs {
        assert!(
            matches!(
                e,
                Error::Length {
                    kernel: "rms_norm",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().starts_with("rms_norm:"), "{e}");
    }
    for eps in [-1.0, f32::NAN, f32::INFINITY] {
        let e = rms_norm::cpu(&x, &w, &mut y, 2, 3, eps, l).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Param {
                    kernel: "rms_norm",
                    ..
                }
            ),
            "{e}"
        );
    }
}
