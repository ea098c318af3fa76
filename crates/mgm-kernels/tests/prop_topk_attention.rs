//! topk_attention: fast CPU and PTX (mgm-ptx executor) against the f64 plain-loop reference
//! (relative Frobenius error <= 1e-5 per (batch, head) slab), plus ties, masks, edge cases and
//! errors.
//!
//! q and k are drawn from {-1, -3/4, ..., 1}: every q.k is then exact in f32 and in f64, so the
//! f32 paths and the reference rank scores identically (with continuous values a k-th and
//! (k+1)-th score closer than f32 rounding would flip the kept set and fail the test for no
//! fault of the kernel), and small head dims produce plenty of exact ties.

mod common;

use mgm_kernels::topk_attention::{self as tk, Mask, Shape, TopK};
use mgm_kernels::windowed_attention;
use mgm_kernels::{Error, KernelLaunch};
use proptest::prelude::*;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const KERNEL: &str = "topk_attention";
const TOL: f64 = 1e-5;
const DIMS: [usize; 9] = [1, 3, 5, 31, 32, 33, 64, 127, 128];

/// Seeded quarters in [-1, 1] (see the module doc).
fn quantized(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len)
        .map(|_| rng.random_range(-4i32..=4) as f32 / 4.0)
        .collect()
}

/// Seeded uniform values in [-2, 2) (V, and q/k where no selection happens).
fn uniform(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

fn pick_mask(sel: u8, a: usize, b: usize, n: usize) -> Mask {
    match sel % 7 {
        0 => Mask::Causal { w: 1 + a % (n + 8) },
        1 => Mask::Causal { w: usize::MAX },
        2 => Mask::Bidirectional { r: 0 },
        3 => Mask::Bidirectional { r: a % (n + 4) },
        4 => {
            let lo = (a % (2 * n + 6)) as isize - (n + 3) as isize;
            Mask::Band {
                lo,
                hi: lo + (b % (n + 4)) as isize,
            }
        }
        _ => Mask::Full,
    }
}

/// k = 1, k = n, k > n and values in between.
fn pick_k(sel: u8, c: usize, n: usize) -> usize {
    match sel % 5 {
        0 => 1,
        1 => n,
        2 => n + 1 + c % 5,
        _ => 1 + c % n,
    }
}

struct Case {
    shape: Shape,
    topk: TopK,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl Case {
    fn new(shape: Shape, topk: TopK, seed: u64) -> Case {
        let len = shape.batch * shape.heads * shape.n * shape.d;
        Case {
            shape,
            topk,
            q: quantized(len, seed),
            k: quantized(len, seed ^ 0x9e37_79b9),
            v: uniform(len, seed ^ 0x7f4a_7c15),
        }
    }

    fn reference(&self) -> Vec<f64> {
        tk::reference_f64(&self.q, &self.k, &self.v, self.shape, self.topk).expect("reference")
    }

    /// Output buffer pre-filled with NaN so an element the kernel never writes fails the check.
    fn out(&self) -> Vec<f32> {
        vec![f32::NAN; self.q.len()]
    }

    fn cpu(&self) -> Vec<f32> {
        let mut out = self.out();
        tk::cpu(&self.q, &self.k, &self.v, &mut out, self.shape, self.topk).expect("cpu");
        out
    }

    /// Runs the PTX with a scratch of `scratch_rows` rows (None: `scratch_len`); fewer rows
    /// than queries make each block loop over several rows.
    fn ptx(&self, scratch_rows: Option<usize>) -> Result<Vec<f32>, String> {
        let mut out = self.out();
        let full = tk::scratch_len(self.shape, self.topk);
        let rows = self.shape.batch * self.shape.heads * self.shape.n;
        let len = match scratch_rows {
            Some(r) if rows > 0 => full / rows.min(tk::MAX_BLOCKS) * r,
            _ => full,
        };
        // Garbage in the scratch: the kernel must not depend on its initial contents.
        let mut scratch = vec![0xdead_beef_u32; len];
        let launch: KernelLaunch<'_> = tk::launch(
            &self.q,
            &self.k,
            &self.v,
            &mut out,
            &mut scratch,
            self.shape,
            self.topk,
        )
        .map_err(|e| e.to_string())?;
        common::run_ptx(launch).map_err(|e| format!("{:?} {:?}: {e}", self.shape, self.topk))?;
        Ok(out)
    }
}

fn check_slabs(what: &str, case: &Case, got: &[f32], want: &[f64]) -> Result<f64, String> {
    let slab = (case.shape.n * case.shape.d).max(1);
    let mut worst = 0f64;
    for (s, (g, w)) in got.chunks(slab).zip(want.chunks(slab)).enumerate() {
        let what = format!("{what} {:?} {:?} slab {s}", case.shape, case.topk);
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

fn topk_for(n: usize, sel: u8, a: usize, b: usize) -> TopK {
    TopK {
        mask: pick_mask(sel, a, b, n),
        k: pick_k(sel / 7, a ^ b, n),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::cases(48)))]

    #[test]
    fn cpu_matches_reference(
        shape in shape_strategy(260),
        sel in any::<u8>(), a in 0..100_000usize, b in 0..100_000usize, seed in any::<u64>(),
    ) {
        let case = Case::new(shape, topk_for(shape.n, sel, a, b), seed);
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
        scratch_rows in prop_oneof![Just(None), (1..4usize).prop_map(Some)],
    ) {
        let case = Case::new(shape, topk_for(shape.n, sel, a, b), seed);
        let got = case.ptx(scratch_rows).map_err(TestCaseError::fail)?;
        let err = check_slabs("ptx", &case, &got, &case.reference()).map_err(TestCaseError::fail)?;
        common::record(KERNEL, "ptx", err);
    }
}

fn shape(batch: usize, heads: usize, n: usize, d: usize) -> Shape {
    Shape { batch, heads, n, d }
}

fn topk(mask: Mask, k: usize) -> TopK {
    TopK { mask, k }
}

fn edge_cases() -> Vec<(Shape, TopK)> {
    vec![
        (shape(1, 1, 1, 1), topk(Mask::Full, 1)),
        (shape(1, 1, 1, 128), topk(Mask::Causal { w: 1 }, 5)),
        (shape(1, 2, 33, 5), topk(Mask::Full, 1)),
        (shape(2, 1, 40, 33), topk(Mask::Full, 40)),
        (shape(1, 1, 37, 31), topk(Mask::Causal { w: 9 }, 100)),
        (shape(1, 1, 45, 3), topk(Mask::Bidirectional { r: 0 }, 1)),
        (shape(1, 1, 70, 64), topk(Mask::Bidirectional { r: 9 }, 4)),
        (shape(1, 1, 50, 127), topk(Mask::Causal { w: 20 }, 3)),
        // Rows 0 and 1 have no finite score.
        (shape(1, 1, 35, 32), topk(Mask::Band { lo: -5, hi: -2 }, 2)),
        (shape(1, 1, 6, 4), topk(Mask::Band { lo: 10, hi: 12 }, 1)),
        // More than 128 window keys: several P.V chunks per row.
        (shape(1, 1, 200, 8), topk(Mask::Full, 5)),
        (shape(1, 1, 150, 1), topk(Mask::Full, 150)),
    ]
}

#[test]
fn cpu_edge_cases_match_reference() {
    for (i, (shape, topk)) in edge_cases().into_iter().enumerate() {
        let case = Case::new(shape, topk, 1000 + i as u64);
        let err = check_slabs("cpu", &case, &case.cpu(), &case.reference()).unwrap();
        common::record(KERNEL, "cpu", err);
    }
}

#[test]
fn ptx_edge_cases_match_reference() {
    for (i, (shape, topk)) in edge_cases().into_iter().enumerate() {
        let case = Case::new(shape, topk, 2000 + i as u64);
        for rows in [None, Some(1)] {
            let got = case.ptx(rows).unwrap();
            let err = check_slabs("ptx", &case, &got, &case.reference()).unwrap();
            common::record(KERNEL, "ptx", err);
        }
    }
}

/// Repeated key rows tie exactly: all copies at the threshold are kept (more than k entries).
#[test]
fn repeated_keys_tie_and_are_all_kept() {
    let s = shape(1, 2, 70, 33);
    let mut case = Case::new(s, topk(Mask::Full, 3), 11);
    // Only 4 distinct key rows per slab, so each score value appears ~17 times.
    for slab in 0..2 {
        for j in 4..70 {
            let (src, dst) = ((slab * 70 + j % 4) * 33, (slab * 70 + j) * 33);
            case.k.copy_within(src..src + 33, dst);
        }
    }
    let want = case.reference();
    check_slabs("cpu", &case, &case.cpu(), &want).unwrap();
    check_slabs("ptx", &case, &case.ptx(None).unwrap(), &want).unwrap();
}

/// A hand-computed case: d = 1, q = 1, keys [1, 1, 0, -1], V [10, 20, 30, 40], k = 1: the two
/// tied top scores are both kept with equal weight, so every row is (10 + 20) / 2 = 15.
#[test]
fn ties_at_threshold_hand_computed() {
    let s = shape(1, 1, 4, 1);
    let case = Case {
        shape: s,
        topk: topk(Mask::Full, 1),
        q: vec![1.0; 4],
        k: vec![1.0, 1.0, 0.0, -1.0],
        v: vec![10.0, 20.0, 30.0, 40.0],
    };
    for out in [case.cpu(), case.ptx(None).unwrap()] {
        for x in out {
            assert!((x - 15.0).abs() <= 1e-5, "{x}");
        }
    }
    assert!(case.reference().iter().all(|&x| (x - 15.0).abs() <= 1e-12));
}

/// k >= the number of allowed keys is dense masked attention: equal to windowed attention,
/// here with continuous values (no selection happens, so rounding cannot flip it).
#[test]
fn k_at_least_window_is_windowed_attention() {
    let cases = [
        (shape(2, 2, 77, 31), Mask::Full, 77),
        (shape(1, 1, 50, 64), Mask::Causal { w: 16 }, 16),
        (shape(1, 1, 50, 5), Mask::Bidirectional { r: 3 }, 7),
        (shape(1, 1, 30, 3), Mask::Band { lo: -4, hi: -1 }, 1000),
    ];
    for (i, (s, mask, k)) in cases.into_iter().enumerate() {
        let len = s.batch * s.heads * s.n * s.d;
        let case = Case {
            shape: s,
            topk: topk(mask, k),
            q: uniform(len, 40 + i as u64),
            k: uniform(len, 50 + i as u64),
            v: uniform(len, 60 + i as u64),
        };
        let want = windowed_attention::reference_f64(&case.q, &case.k, &case.v, s, mask).unwrap();
        check_slabs(
            "reference",
            &case,
            &case
                .reference()
                .iter()
                .map(|&x| x as f32)
                .collect::<Vec<_>>(),
            &want,
        )
        .unwrap();
        check_slabs("cpu", &case, &case.cpu(), &want).unwrap();
        check_slabs("ptx", &case, &case.ptx(None).unwrap(), &want).unwrap();
    }
}

/// The fast path costs O(n * W) under a window: 2^17 tokens finish at once. Row i only sees
/// keys i-3..=i, so it equals the last row of the reference run on that slice alone.
#[test]
fn cpu_long_sequence_small_window_is_linear() {
    let (n, d) = (1 << 17, 3);
    let t = topk(Mask::Causal { w: 4 }, 2);
    let case = Case::new(shape(1, 1, n, d), t, 12);
    let out = case.cpu();
    for i in [0, 1, 3, 777, 100_000, n - 1] {
        let lo = i.saturating_sub(3);
        let rows = i + 1 - lo;
        let part = |x: &[f32]| x[lo * d..(i + 1) * d].to_vec();
        let (q, k, v) = (part(&case.q), part(&case.k), part(&case.v));
        let want = tk::reference_f64(&q, &k, &v, shape(1, 1, rows, d), t).unwrap();
        let got = &out[i * d..(i + 1) * d];
        common::check_frobenius(&format!("row {i}"), got, &want[(rows - 1) * d..], TOL).unwrap();
    }
}

#[test]
fn empty_problems_do_nothing() {
    for s in [shape(0, 2, 5, 4), shape(2, 0, 5, 4), shape(2, 2, 0, 4)] {
        let case = Case::new(s, topk(Mask::Causal { w: 3 }, 2), 9);
        assert!(case.cpu().is_empty());
        assert!(case.ptx(None).unwrap().is_empty());
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
    let t = topk(Mask::Causal { w: 2 }, 1);
    type Path = fn(&[f32], &[f32], &[f32], &mut [f32], Shape, TopK) -> mgm_kernels::Result<()>;
    let launch: Path = |q, k, v, o, s, t| {
        let mut scratch = vec![0u32; tk::scratch_len(s, t)];
        tk::launch(q, k, v, o, &mut scratch, s, t).map(drop)
    };
    for f in [tk::reference as Path, tk::cpu, launch] {
        expect_err(
            f(&short, &ok, &ok, &mut out, s, t),
            "`q` has 23 elements, expected 24",
        );
        expect_err(f(&ok, &ok, &short, &mut out, s, t), "`v`");
        expect_err(f(&ok, &ok, &ok, &mut out, s, topk(Mask::Full, 0)), "k = 0");
        let w0 = topk(Mask::Causal { w: 0 }, 1);
        expect_err(f(&ok, &ok, &ok, &mut out, s, w0), "w = 0");
        let big = vec![0f32; 129];
        let mut big_out = big.clone();
        expect_err(
            f(&big, &big, &big, &mut big_out, shape(1, 1, 1, 129), t),
            "d = 129",
        );
    }
    // The scratch must hold one row of window keys (width min(n, W) = 2 here).
    let mut scratch = [0u32; 1];
    let r = tk::launch(&ok, &ok, &ok, &mut out, &mut scratch, s, t).map(drop);
    expect_err(r, "scratch has 1 words, needs at least one row of 2");
}
