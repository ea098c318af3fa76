//! gemm: the packed AVX-512 path and the portable path against the f64 plain-loop reference,
//! over shapes around the tile edges (MR = 12, NR = 32, KC = 512), strided and transposed
//! operands, a strided output, and every epilogue (accumulate, bias, activation, residual).
//! Tolerance: |got - ref| <= 1e-5 * (1 + sum_k |a_ik b_kj| + |bias_j| + |c_ij| + |res_ij|), so
//! the bound scales with the size of the terms that were summed; a misplaced element is off by
//! a whole term and fails.

mod common;

use mgm_kernels::activation::Activation;
use mgm_kernels::gemm::{
    self, Backend, Epilogue, MatMut, MatRef, PackedLhs, PackedRhs, Parallelism,
};
use proptest::prelude::*;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const KERNEL: &str = "gemm";
const TOL: f64 = 1e-5;

fn data(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

/// A `rows x cols` view into fresh data: row-major with `pad` extra elements per row, or
/// transposed (column-major storage) when `transposed`.
fn view(data: &[f32], rows: usize, cols: usize, pad: usize, transposed: bool) -> MatRef<'_> {
    if transposed {
        MatRef::new(data, rows, cols, 1, rows + pad).expect("view")
    } else {
        MatRef::new(data, rows, cols, cols + pad, 1).expect("view")
    }
}

fn storage(rows: usize, cols: usize, pad: usize, transposed: bool) -> usize {
    if transposed {
        (rows + pad) * cols
    } else {
        rows * (cols + pad)
    }
}

struct Case {
    m: usize,
    k: usize,
    n: usize,
    a_t: bool,
    b_t: bool,
    pad: usize,
    ldc_pad: usize,
    accumulate: bool,
    bias: bool,
    activation: Activation,
    residual: bool,
    seed: u64,
}

fn run_case(case: &Case, path: &str) -> Result<f64, String> {
    let Case { m, k, n, pad, .. } = *case;
    let ad = data(storage(m, k, pad, case.a_t), case.seed);
    let bd = data(storage(k, n, pad, case.b_t), case.seed ^ 1);
    let a = view(&ad, m, k, pad, case.a_t);
    let b = view(&bd, k, n, pad, case.b_t);
    let bias = data(n, case.seed ^ 2);
    let resd = data(storage(m, n, pad, false), case.seed ^ 3);
    let ldc = n + case.ldc_pad;
    let c0 = data(m * ldc, case.seed ^ 4);
    let epi = Epilogue {
        accumulate: case.accumulate,
        bias: case.bias.then_some(&bias[..]),
        activation: case.activation,
        residual: case.residual.then(|| view(&resd, m, n, pad, false)),
    };
    let mut want = c0.clone();
    gemm::reference(a, b, MatMut::new(&mut want, m, n, ldc).expect("out"), &epi)
        .map_err(|e| e.to_string())?;
    let mut got = c0.clone();
    let out = MatMut::new(&mut got, m, n, ldc).expect("out");
    match path {
        "cpu" => gemm::cpu(a, b, out, &epi),
        "gemv" => gemm::gemv(a, b.t(), out, &epi),
        "gemm_nt" => gemm::gemm_nt(a, b.t(), out, &epi),
        "cpu_serial" => gemm::cpu_packed(
            &PackedLhs::new(a),
            &PackedRhs::new(b),
            out,
            &epi,
            Parallelism::Serial,
        ),
        _ => {
            let be = backend(path);
            gemm::cpu_packed(
                &PackedLhs::with_backend(a, be).map_err(|e| e.to_string())?,
                &PackedRhs::with_backend(b, be).map_err(|e| e.to_string())?,
                out,
                &epi,
                Parallelism::Rayon,
            )
        }
    }
    .map_err(|e| e.to_string())?;
    let mut worst = 0f64;
    for i in 0..m {
        for j in 0..ldc {
            let o = i * ldc + j;
            if j >= n {
                // the padding between rows is never written
                if got[o].to_bits() != c0[o].to_bits() {
                    return Err(format!("{path}: padding ({i}, {j}) was written"));
                }
                continue;
            }
            let mut scale = 1.0;
            for kk in 0..k {
                scale += (f64::from(elem(&ad, i, kk, m, k, pad, case.a_t))
                    * f64::from(elem(&bd, kk, j, k, n, pad, case.b_t)))
                .abs();
            }
            if case.bias {
                scale += f64::from(bias[j]).abs();
            }
            if case.accumulate {
                scale += f64::from(c0[o]).abs();
            }
            if case.residual {
                scale += f64::from(resd[i * (n + pad) + j]).abs();
            }
            let e = (f64::from(got[o]) - f64::from(want[o])).abs() / scale;
            if e.is_nan() || e > TOL {
                return Err(format!(
                    "{path} m={m} k={k} n={n}: ({i}, {j}) got {}, reference {}, scaled error \
                     {e:.3e} > {TOL:.0e}",
                    got[o], want[o]
                ));
            }
            worst = worst.max(e);
        }
    }
    Ok(worst)
}

/// Element `(i, j)` of a view made by [`view`], read from its storage directly.
fn elem(d: &[f32], i: usize, j: usize, rows: usize, cols: usize, pad: usize, t: bool) -> f32 {
    if t {
        d[j * (rows + pad) + i]
    } else {
        d[i * (cols + pad) + j]
    }
}

fn backend(path: &str) -> Backend {
    match path {
        "portable" => Backend::Portable,
        "avx512" => Backend::Avx512,
        "amx" => Backend::Amx,
        _ => unreachable!("known path"),
    }
}

/// Every path this machine can run: the default ones and each available backend.
fn paths() -> Vec<&'static str> {
    let mut p = vec!["cpu", "cpu_serial", "portable"];
    for (name, be) in [("avx512", Backend::Avx512), ("amx", Backend::Amx)] {
        if be.is_available() {
            p.push(name);
        }
    }
    p
}

fn dim() -> impl Strategy<Value = usize> {
    prop_oneof![0..=3usize, 11..=13usize, 31..=33usize, 1..=70usize]
}

fn activation() -> impl Strategy<Value = Activation> {
    prop_oneof![
        Just(Activation::Identity),
        Just(Activation::GeluErf),
        Just(Activation::GeluTanh),
        Just(Activation::QuickGelu),
        Just(Activation::Silu),
        Just(Activation::Relu),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::cases(48)))]

    #[test]
    fn gemm_paths_match_reference(
        m in dim(), k in prop_oneof![dim(), 500..=1100usize], n in dim(),
        a_t in any::<bool>(), b_t in any::<bool>(), pad in 0..3usize, ldc_pad in 0..3usize,
        accumulate in any::<bool>(), bias in any::<bool>(), activation in activation(),
        residual in any::<bool>(), seed in any::<u64>(),
    ) {
        let case = Case { m, k, n, a_t, b_t, pad, ldc_pad, accumulate, bias, activation, residual, seed };
        for path in paths() {
            let err = run_case(&case, path).map_err(TestCaseError::fail)?;
            common::record(KERNEL, path, err);
        }
        if b_t && !a_t {
            // W^T stored as W [n, k] and X row-major: the in-place paths of Linear
            let err = run_case(&case, "gemm_nt").map_err(TestCaseError::fail)?;
            common::record(KERNEL, "gemm_nt", err);
            if m <= gemm::GEMV_ROWS {
                let err = run_case(&case, "gemv").map_err(TestCaseError::fail)?;
                common::record(KERNEL, "gemv", err);
            }
        }
    }
}

/// A decode step's product (one row of `x`, the weight read in place) for `k` below, at and
/// around the GEMV's 64-element passes and its 16-wide tail, `n` across several bands.
#[test]
fn gemv_single_row_matches_reference() {
    for k in [1, 15, 16, 63, 64, 65, 100, 2048 + 7] {
        for n in [1, 5, 67, 130] {
            let case = Case {
                m: 1,
                k,
                n,
                a_t: false,
                b_t: true,
                pad: 1,
                ldc_pad: 0,
                accumulate: false,
                bias: true,
                activation: Activation::Identity,
                residual: false,
                seed: (k * 131 + n) as u64,
            };
            for path in ["gemv", "gemm_nt"] {
                run_case(&case, path).unwrap_or_else(|e| panic!("{path} k={k} n={n}: {e}"));
            }
        }
    }
}

/// The large shapes take the parallel path with several blocks in both directions.
#[test]
fn gemm_large_parallel_matches_reference() {
    for (m, k, n) in [(577, 64, 300), (200, 1030, 290), (45, 700, 97)] {
        let case = Case {
            m,
            k,
            n,
            a_t: false,
            b_t: true,
            pad: 1,
            ldc_pad: 2,
            accumulate: true,
            bias: true,
            activation: Activation::QuickGelu,
            residual: true,
            seed: 7,
        };
        // gemm_nt: W stored [n, k] read in place, packed a chunk per task from 40 rows on
        for path in paths().into_iter().chain(["gemm_nt"]) {
            let err = run_case(&case, path).unwrap_or_else(|e| panic!("{e}"));
            common::record(KERNEL, path, err);
        }
    }
}

/// NaN and infinity in an operand reach exactly the outputs they feed.
#[test]
fn gemm_propagates_nan_to_its_row_only() {
    let (m, k, n) = (13, 5, 33);
    let mut a = data(m * k, 1);
    a[3 * k + 2] = f32::NAN;
    let b = data(k * n, 2);
    let mut c = vec![0f32; m * n];
    gemm::cpu(
        MatRef::row_major(&a, m, k).unwrap(),
        MatRef::row_major(&b, k, n).unwrap(),
        MatMut::row_major(&mut c, m, n).unwrap(),
        &Epilogue::default(),
    )
    .unwrap();
    for i in 0..m {
        for j in 0..n {
            assert_eq!(c[i * n + j].is_nan(), i == 3, "({i}, {j})");
        }
    }
}

/// Every activation of the epilogue over a wide range of pre-activations (k = 1, so the
/// product is exact): large magnitudes saturate, NaN stays NaN, and both paths stay within
/// 1e-6 * (1 + |x|) of the f64 formula.
#[test]
fn gemm_epilogue_activations_hold_on_extreme_inputs() {
    let mut xs: Vec<f32> = (-400..=400).map(|i| i as f32 * 0.25).collect();
    xs.extend([f32::NAN, 1e30, -1e30, 88.5, -88.5, 1e-30, -0.0]);
    let m = xs.len();
    let one = [1f32];
    for act in [
        Activation::Identity,
        Activation::GeluErf,
        Activation::GeluTanh,
        Activation::QuickGelu,
        Activation::Silu,
        Activation::Relu,
    ] {
        let epi = Epilogue {
            activation: act,
            ..Epilogue::default()
        };
        let a = MatRef::row_major(&xs, m, 1).unwrap();
        let b = MatRef::row_major(&one, 1, 1).unwrap();
        for path in paths().into_iter().filter(|p| *p != "cpu_serial") {
            let mut got = vec![0f32; m];
            let out = MatMut::row_major(&mut got, m, 1).unwrap();
            match path {
                "cpu" => gemm::cpu(a, b, out, &epi).unwrap(),
                _ => gemm::cpu_packed(
                    &PackedLhs::with_backend(a, backend(path)).unwrap(),
                    &PackedRhs::with_backend(b, backend(path)).unwrap(),
                    out,
                    &epi,
                    Parallelism::Serial,
                )
                .unwrap(),
            }
            for (&x, &g) in xs.iter().zip(&got) {
                let want = act.reference_f64(f64::from(x));
                if want.is_nan() {
                    assert!(g.is_nan(), "{path} {act:?}({x}) = {g}, want NaN");
                    continue;
                }
                let e = (f64::from(g) - want).abs() / (1.0 + want.abs());
                assert!(
                    e <= 1e-6,
                    "{path} {act:?}({x}) = {g}, want {want} (error {e:e})"
                );
            }
        }
    }
}
