//! windowed_attention: fast CPU and PTX (mgm-ptx executor) against the f64 plain-loop reference
//! (relative Frobenius error <= 1e-5 per (batch, head) slab), plus edge cases and errors.

mod common;

use mgm_kernels::topk_attention::{self, TopK};
use mgm_kernels::windowed_attention::{self as wa, Mask, Shape};
use mgm_kernels::{Error, KernelLaunch};
use proptest::prelude::*;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const KERNEL: &str = "windowed_attention";
const TOL: f64 = 1e-5;
const DIMS: [usize; 9] = [1, 3, 5, 31, 32, 33, 64, 127, 128];

/// Seeded uniform values in [-2, 2): wide enough that softmax rows are far from uniform.
fn data(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

/// A mask from raw random numbers, scaled to n so windows hit both edges, W = 1, r = 0,
/// windows wider than n and bands that leave rows empty.
fn pick_mask(sel: u8, a: usize, b: usize, n: usize) -> Mask {
    match sel % 8 {
        0 => Mask::Causal { w: 1 },
        1 => Mask::Causal { w: 1 + a % (n + 8) },
        2 => Mask::Causal { w: usize::MAX },
        3 => Mask::Bidirectional { r: 0 },
        4 => Mask::Bidirectional { r: a % (n + 4) },
        5 => {
            let lo = (a % (2 * n + 6)) as isize - (n + 3) as isize;
            Mask::Band {
                lo,
                hi: lo + (b % (n + 4)) as isize,
            }
        }
        6 => Mask::Full,
        _ => Mask::Causal { w: n },
    }
}

struct Case {
    shape: Shape,
    mask: Mask,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl Case {
    fn new(shape: Shape, mask: Mask, seed: u64) -> Case {
        let len = shape.batch * shape.heads * shape.n * shape.d;
        Case {
            shape,
            mask,
            q: data(len, seed),
            k: data(len, seed ^ 0x9e37_79b9),
            v: data(len, seed ^ 0x7f4a_7c15),
        }
    }

    fn reference(&self) -> Vec<f64> {
        wa::reference_f64(&self.q, &self.k, &self.v, self.shape, self.mask).expect("reference")
    }

    /// Output buffer pre-filled with NaN so an element the kernel never writes fails the check.
    fn out(&self) -> Vec<f32> {
        vec![f32::NAN; self.q.len()]
    }

    fn cpu(&self) -> Vec<f32> {
        let mut out = self.out();
        wa::cpu(&self.q, &self.k, &self.v, &mut out, self.shape, self.mask).expect("cpu");
        out
    }

    fn ptx(&self) -> Result<Vec<f32>, String> {
        let mut out = self.out();
        let launch: KernelLaunch<'_> =
            wa::launch(&self.q, &self.k, &self.v, &mut out, self.shape, self.mask)
                .map_err(|e| e.to_string())?;
        common::run_ptx(launch).map_err(|e| format!("{:?} {:?}: {e}", self.shape, self.mask))?;
        Ok(out)
    }
}

/// Max over slabs of the relative Frobenius error of one slab.
fn check_slabs(what: &str, case: &Case, got: &[f32], want: &[f64]) -> Result<f64, String> {
    let slab = (case.shape.n * case.shape.d).max(1);
    let mut worst = 0f64;
    for (s, (g, w)) in got.chunks(slab).zip(want.chunks(slab)).enumerate() {
        let what = format!("{what} {:?} {:?} slab {s}", case.shape, case.mask);
        worst = worst.max(common::check_frobenius(&what, g, w, TOL)?);
    }
    Ok(worst)
}

fn shape_strategy(max_n: usize) -> impl Strategy<Value = Shape> {
    (
        1..=2usize,
        1..=2usize,
        prop_oneof![1..=4usize, 5..=max_n],
        0..DIMS.len(),
    )
        .prop_map(|(batch, heads, n, di)| Shape {
            batch,
            heads,
            n,
            d: DIMS[di],
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::cases(48)))]

    #[test]
    fn cpu_matches_reference(
        shape in shape_strategy(260),
        sel in any::<u8>(), a in 0..100_000usize, b in 0..100_000usize, seed in any::<u64>(),
    ) {
        let case = Case::new(shape, pick_mask(sel, a, b, shape.n), seed);
        let err = check_slabs("cpu", &case, &case.cpu(), &case.reference())
            .map_err(TestCaseError::fail)?;
        common::record(KERNEL, "cpu", err);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::cases(24)))]

    #[test]
    fn ptx_matches_reference(
        shape in shape_strategy(140),
        sel in any::<u8>(), a in 0..100_000usize, b in 0..100_000usize, seed in any::<u64>(),
    ) {
        let case = Case::new(shape, pick_mask(sel, a, b, shape.n), seed);
        let got = case.ptx().map_err(TestCaseError::fail)?;
        let err = check_slabs("ptx", &case, &got, &case.reference()).map_err(TestCaseError::fail)?;
        common::record(KERNEL, "ptx", err);
    }
}

fn shape(batch: usize, heads: usize, n: usize, d: usize) -> Shape {
    Shape { batch, heads, n, d }
}

/// The edge cases both fast paths must get right, checked against the reference.
fn edge_cases() -> Vec<(Shape, Mask)> {
    vec![
        (shape(1, 1, 1, 1), Mask::Causal { w: 1 }),
        (shape(1, 1, 1, 128), Mask::Full),
        (shape(1, 2, 33, 5), Mask::Causal { w: 1 }),
        (shape(2, 1, 40, 33), Mask::Causal { w: 40 }),
        (shape(1, 1, 37, 31), Mask::Causal { w: 1000 }),
        (shape(1, 1, 45, 3), Mask::Bidirectional { r: 0 }),
        (shape(1, 1, 70, 64), Mask::Bidirectional { r: 9 }),
        (shape(1, 1, 50, 127), Mask::Bidirectional { r: 50 }),
        // Rows 0 and 1 have no key; then a band entirely in the future.
        (shape(1, 1, 35, 32), Mask::Band { lo: -5, hi: -2 }),
        (shape(1, 1, 20, 7), Mask::Band { lo: 3, hi: 30 }),
        // Every row empty.
        (shape(1, 1, 6, 4), Mask::Band { lo: 10, hi: 12 }),
        // Several key tiles per block (the second barrier guards their reuse).
        (shape(1, 1, 100, 16), Mask::Full),
        (shape(1, 1, 130, 128), Mask::Causal { w: 70 }),
        (shape(1, 3, 600, 8), Mask::Causal { w: 40 }),
    ]
}

#[test]
fn cpu_edge_cases_match_reference() {
    for (i, (shape, mask)) in edge_cases().into_iter().enumerate() {
        let case = Case::new(shape, mask, 1000 + i as u64);
        let err = check_slabs("cpu", &case, &case.cpu(), &case.reference()).unwrap();
        common::record(KERNEL, "cpu", err);
    }
}

#[test]
fn ptx_edge_cases_match_reference() {
    for (i, (shape, mask)) in edge_cases().into_iter().enumerate() {
        let case = Case::new(shape, mask, 2000 + i as u64);
        let got = case.ptx().unwrap();
        let err = check_slabs("ptx", &case, &got, &case.reference()).unwrap();
        common::record(KERNEL, "ptx", err);
    }
}

/// W = 1 attends only the query's own key, so every path returns V itself.
#[test]
fn diagonal_window_returns_v() {
    let case = Case::new(shape(2, 3, 41, 33), Mask::Causal { w: 1 }, 7);
    let reference = case.reference();
    let cpu = case.cpu();
    let ptx = case.ptx().unwrap();
    for (idx, &v) in case.v.iter().enumerate() {
        assert!((reference[idx] - v as f64).abs() <= 1e-6, "reference {idx}");
        assert!((cpu[idx] - v).abs() <= 1e-6, "cpu {idx}");
        assert!((ptx[idx] - v).abs() <= 1e-6, "ptx {idx}");
    }
}

/// A band with no key for the first rows: they are exactly zero, never NaN.
#[test]
fn rows_without_keys_are_zero() {
    let case = Case::new(shape(1, 1, 9, 6), Mask::Band { lo: -3, hi: -2 }, 8);
    for out in [case.cpu(), case.ptx().unwrap()] {
        assert!(out[..2 * 6].iter().all(|&x| x == 0.0), "{out:?}");
        assert!(out[2 * 6..].iter().all(|&x| x.is_finite() && x != 0.0));
    }
}

/// Windowed attention and top-k attention with k >= n are both dense masked attention.
#[test]
fn matches_topk_with_k_at_least_n() {
    for (i, (shape, mask)) in edge_cases().into_iter().enumerate() {
        let case = Case::new(shape, mask, 3000 + i as u64);
        let mut topk = case.out();
        let params = TopK { mask, k: shape.n };
        topk_attention::cpu(&case.q, &case.k, &case.v, &mut topk, shape, params).unwrap();
        let topk_f64: Vec<f64> = topk.iter().map(|&x| x as f64).collect();
        check_slabs("windowed vs topk", &case, &case.cpu(), &topk_f64).unwrap();
    }
}

/// The fast path costs O(n * W): 2^18 tokens with W = 3 finish at once (an O(n^2) path would
/// need ~10^11 operations). Row i only sees keys i-2..=i, so it equals the last row of the
/// reference run on that slice alone.
#[test]
fn cpu_long_sequence_small_window_is_linear() {
    let (n, d, mask) = (1 << 18, 2, Mask::Causal { w: 3 });
    let case = Case::new(shape(1, 1, n, d), mask, 12);
    let out = case.cpu();
    for i in [0, 1, 2, 777, 123_456, n - 1] {
        let lo = i.saturating_sub(2);
        let rows = i + 1 - lo;
        let part = |x: &[f32]| x[lo * d..(i + 1) * d].to_vec();
        let (q, k, v) = (part(&case.q), part(&case.k), part(&case.v));
        let want = wa::reference_f64(&q, &k, &v, shape(1, 1, rows, d), mask).unwrap();
        let got = &out[i * d..(i + 1) * d];
        common::check_frobenius(&format!("row {i}"), got, &want[(rows - 1) * d..], TOL).unwrap();
    }
}

#[test]
fn empty_problems_do_nothing() {
    for s in [shape(0, 2, 5, 4), shape(2, 0, 5, 4), shape(2, 2, 0, 4)] {
        let case = Case::new(s, Mask::Causal { w: 3 }, 9);
        assert!(case.cpu().is_empty());
        assert!(case.ptx().unwrap().is_empty());
        assert!(case.reference().is_empty());
    }
}

fn expect_err(r: Result<(), Error>, needle: &str) {
    let msg = r.expect_err("expected an error").to_string();
    assert!(msg.starts_with(KERNEL), "{msg}");
    assert!(msg.contains(needle), "{msg} lacks {needle}");
}

#[test]
fn bad_arguments_are_errors_naming_the_kernel() {
    let s = shape(1, 2, 3, 4);
    let ok = vec![0f32; 24];
    let short = vec![0f32; 23];
    let mut out = vec![0f32; 24];
    let mut out_long = vec![0f32; 25];
    let m = Mask::Causal { w: 2 };
    type Path = fn(&[f32], &[f32], &[f32], &mut [f32], Shape, Mask) -> mgm_kernels::Result<()>;
    let launch: Path = |q, k, v, o, s, m| wa::launch(q, k, v, o, s, m).map(drop);
    for f in [wa::reference as Path, wa::cpu, launch] {
        expect_err(
            f(&short, &ok, &ok, &mut out, s, m),
            "`q` has 23 elements, expected 24",
        );
        expect_err(f(&ok, &short, &ok, &mut out, s, m), "`k`");
        expect_err(f(&ok, &ok, &short, &mut out, s, m), "`v`");
        expect_err(f(&ok, &ok, &ok, &mut out_long, s, m), "`out` has 25");
        expect_err(
            f(&ok, &ok, &ok, &mut out, s, Mask::Causal { w: 0 }),
            "w = 0",
        );
        let band = Mask::Band { lo: 2, hi: 1 };
        expect_err(f(&ok, &ok, &ok, &mut out, s, band), "lo = 2 > hi = 1");
        let (d0, d129) = (shape(1, 2, 3, 0), shape(1, 1, 1, 129));
        expect_err(f(&[], &[], &[], &mut [], d0, m), "d = 0");
        let big = vec![0f32; 129];
        let mut big_out = big.clone();
        expect_err(f(&big, &big, &big, &mut big_out, d129, m), "d = 129");
    }
    // Launch-only limits (CUDA grid y/z); n = 0 keeps the buffers empty.
    let r = wa::launch(&[], &[], &[], &mut [], shape(1, 70_000, 0, 8), m).map(drop);
    expect_err(r, "65535");
}
