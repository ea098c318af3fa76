//! quant: the integer paths (the best for this CPU, tiles of weight and activation rows from
//! 8 rows on, and the portable one) against the f64 reference of the same quantized
//! math (scaled error <= 1e-5), the quantization error itself
//! against the unquantized product (within the formats' bounds), storage round trips, and
//! argument errors.

mod common;

use mgm_kernels::gemm::{Epilogue, MatMut, MatRef};
use mgm_kernels::quant::{self, QuantFormat, QuantMatrix};
use proptest::prelude::*;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const KERNEL: &str = "quant";

fn data(len: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-scale..scale)).collect()
}

#[derive(Clone, Copy)]
enum Path {
    Reference,
    Best,
    Portable,
}

fn run(x: &[f32], m: usize, k: usize, w: &QuantMatrix, epi: &Epilogue<'_>, path: Path) -> Vec<f32> {
    let mut y = vec![f32::NAN; m * w.n()];
    let (xr, out) = (
        MatRef::row_major(x, m, k).unwrap(),
        MatMut::row_major(&mut y, m, w.n()).unwrap(),
    );
    match path {
        Path::Reference => quant::reference(xr, w, out, epi).unwrap(),
        Path::Best => quant::cpu(xr, w, out, epi).unwrap(),
        Path::Portable => quant::cpu_portable(xr, w, out, epi).unwrap(),
    }
    y
}

/// Every path against the f64 reference for one case; the worst error over the outputs,
/// each scaled by the size of its summed terms.
fn paths_match_reference(
    m: usize,
    k: usize,
    n: usize,
    format: QuantFormat,
    bias: bool,
    seed: u64,
) -> Result<f64, TestCaseError> {
    let w = data(n * k, 0.05, seed);
    let x = data(m * k, 2.0, seed ^ 1);
    let b = data(n, 0.5, seed ^ 2);
    let q = QuantMatrix::quantize(MatRef::row_major(&w, n, k).unwrap(), format).unwrap();
    let epi = Epilogue {
        bias: bias.then_some(&b[..]),
        ..Epilogue::default()
    };
    let want = run(&x, m, k, &q, &epi, Path::Reference);
    let mut worst = 0f64;
    for path in [Path::Best, Path::Portable] {
        let got = run(&x, m, k, &q, &epi, path);
        for i in 0..m {
            for j in 0..n {
                let scale: f64 = 1.0
                    + (0..k)
                        .map(|t| f64::from(x[i * k + t]).abs() * f64::from(q.value(j, t)).abs())
                        .sum::<f64>();
                let e = (f64::from(got[i * n + j]) - f64::from(want[i * n + j])).abs() / scale;
                prop_assert!(
                    e <= 1e-5,
                    "{format:?} m={m} k={k} n={n} ({i},{j}): {} vs {} ({e:e})",
                    got[i * n + j],
                    want[i * n + j]
                );
                worst = worst.max(e);
            }
        }
    }
    Ok(worst)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::cases(48)))]

    #[test]
    fn quant_paths_match_reference(
        m in prop_oneof![1..=3usize, 7..=9usize, 10..=20usize, 40..=70usize],
        k32 in prop_oneof![1..=12usize, 16..=21usize], extra in 0..32usize,
        n in 1..=70usize, q4 in any::<bool>(), bias in any::<bool>(), seed in any::<u64>(),
    ) {
        let format = if q4 { QuantFormat::Q4 } else { QuantFormat::Q8 };
        // whole groups and a ragged last one
        let k = k32 * 32 + extra - 1 + usize::from(extra == 0);
        let worst = paths_match_reference(m, k, n, format, bias, seed)?;
        common::record(KERNEL, format.name(), worst);
    }
}

/// The decode step's shapes on every path: one row of activations, `k` LLaMA-sized or with a
/// ragged end (a short last block of groups, a short last group), an odd number of whole
/// blocks (the decode kernel takes them in pairs), and enough weight rows that each task's
/// band holds many (tasks get `n / (4 threads)` rows).
#[test]
fn decode_shapes_match_reference() {
    for format in [QuantFormat::Q4, QuantFormat::Q8] {
        for (k, n) in [
            (2048, 67),
            (32 * 12, 33),
            (32 * 24, 9),
            (32 * 17 + 5, 301),
            (32 * 19, 301),
            (32 * 16, 4),
            (64, 1),
        ] {
            paths_match_reference(1, k, n, format, true, (k * 31 + n) as u64).unwrap();
        }
    }
}

/// Several weights on one input (`cpu_many`: one quantization of `X`, one parallel loop over
/// every weight's bands, a layout per format) give each product as the f64 reference does,
/// with each product's own bias and activation, for decode and prefill row counts, mixed
/// formats and widths from a few rows to many bands; a product whose shape does not fit is an
/// error that names it.
#[test]
fn many_products_on_one_input_match_the_reference() {
    use mgm_kernels::activation::Activation;
    for (case, m) in [1usize, 3, 9, 40].into_iter().enumerate() {
        let k = 32 * 19 + 7;
        let shapes = [
            (QuantFormat::Q4, 301, Activation::Silu),
            (QuantFormat::Q8, 37, Activation::Identity),
            (QuantFormat::Q4, 5, Activation::Identity),
        ];
        let x = data(m * k, 2.0, case as u64);
        let ws: Vec<QuantMatrix> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(f, n, _))| {
                let w = data(n * k, 0.05, 10 + i as u64);
                QuantMatrix::quantize(MatRef::row_major(&w, n, k).unwrap(), f).unwrap()
            })
            .collect();
        let biases: Vec<Vec<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| data(s.1, 0.5, 20 + i as u64))
            .collect();
        let epis: Vec<Epilogue<'_>> = shapes
            .iter()
            .zip(&biases)
            .map(|(s, b)| Epilogue {
                bias: Some(b),
                activation: s.2,
                ..Epilogue::default()
            })
            .collect();
        let mut outs: Vec<Vec<f32>> = shapes.iter().map(|s| vec![f32::NAN; m * s.1]).collect();
        {
            let mut products: Vec<quant::Product<'_>> = ws
                .iter()
                .zip(outs.iter_mut())
                .zip(&epis)
                .map(|((w, o), e)| (w, MatMut::row_major(o, m, w.n()).unwrap(), e))
                .collect();
            quant::cpu_many(MatRef::row_major(&x, m, k).unwrap(), &mut products).unwrap();
        }
        for ((w, e), got) in ws.iter().zip(&epis).zip(&outs) {
            let want = run(&x, m, k, w, e, Path::Reference);
            for (i, (&g, &r)) in got.iter().zip(&want).enumerate() {
                let scale = 1.0
                    + (0..k)
                        .map(|t| {
                            f64::from(x[(i / w.n()) * k + t]).abs()
                                * f64::from(w.value(i % w.n(), t)).abs()
                        })
                        .sum::<f64>();
                let err = (f64::from(g) - f64::from(r)).abs() / scale;
                assert!(
                    err <= 1e-5,
                    "m={m} {:?} n={} output {i}: {g} vs {r}",
                    w.format(),
                    w.n()
                );
            }
        }
    }
    // a product of the wrong width is refused before any runs
    let x = data(2 * 64, 1.0, 5);
    let w = QuantMatrix::quantize(
        MatRef::row_major(&data(4 * 64, 0.1, 6), 4, 64).unwrap(),
        QuantFormat::Q8,
    )
    .unwrap();
    let narrow = QuantMatrix::quantize(
        MatRef::row_major(&data(4 * 32, 0.1, 7), 4, 32).unwrap(),
        QuantFormat::Q4,
    )
    .unwrap();
    let (mut a, mut b) = (vec![0f32; 8], vec![0f32; 8]);
    let e = Epilogue::default();
    let err = quant::cpu_many(
        MatRef::row_major(&x, 2, 64).unwrap(),
        &mut [
            (&w, MatMut::row_major(&mut a, 2, 4).unwrap(), &e),
            (&narrow, MatMut::row_major(&mut b, 2, 4).unwrap(), &e),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("inner dims differ"), "{err}");
}

/// What quantization costs: relative Frobenius error of `X W^T` against the f32 product, for
/// weights of a realistic scale (N(0, 0.02)-like uniform) and unit activations.
#[test]
fn quantization_error_is_within_the_formats_bounds() {
    let (m, k, n) = (4, 1024, 256);
    let w = data(n * k, 0.035, 1);
    let x = data(m * k, 1.7, 2);
    let mut exact = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            exact[i * n + j] = (0..k)
                .map(|t| f64::from(x[i * k + t]) * f64::from(w[j * k + t]))
                .sum();
        }
    }
    for (format, bound) in [(QuantFormat::Q8, 1e-2), (QuantFormat::Q4, 1.2e-1)] {
        let q = QuantMatrix::quantize(MatRef::row_major(&w, n, k).unwrap(), format).unwrap();
        let got = run(&x, m, k, &q, &Epilogue::default(), Path::Best);
        let (num, den) = got
            .iter()
            .zip(&exact)
            .fold((0f64, 0f64), |(a, b), (&g, &e)| {
                (a + (f64::from(g) - e).powi(2), b + e * e)
            });
        let rel = (num / den).sqrt();
        assert!(
            rel < bound,
            "{format:?}: relative error {rel:.3e} >= {bound}"
        );
        assert!(
            rel > 1e-5,
            "{format:?}: no quantization error at all ({rel:e})?"
        );
    }
}

#[test]
fn quant_storage_round_trips_and_bad_input_is_an_error() {
    let w = data(8 * 64, 1.0, 3);
    for format in [QuantFormat::Q8, QuantFormat::Q4] {
        let q = QuantMatrix::quantize(MatRef::row_major(&w, 8, 64).unwrap(), format).unwrap();
        let back = QuantMatrix::from_bytes(
            format,
            8,
            64,
            std::sync::Arc::new(q.data().to_vec()),
            std::sync::Arc::new(q.scales().to_vec()),
        )
        .unwrap();
        assert_eq!(back.dequantize(), q.dequantize());
        assert_eq!(
            q.bytes(),
            if format == QuantFormat::Q8 {
                8 * 64 + 8 * 2 * 2
            } else {
                8 * 32 + 8 * 2 * 2
            }
        );
    }
    // a ragged last group: 48 inputs are one group of 32 and one of 16
    let q = QuantMatrix::quantize(
        MatRef::row_major(&w[..8 * 48], 8, 48).unwrap(),
        QuantFormat::Q4,
    )
    .unwrap();
    assert_eq!((q.groups(), q.data().len()), (2, 8 * 32));
    let mut bad = w.clone();
    bad[5] = f32::NAN;
    let e = QuantMatrix::quantize(MatRef::row_major(&bad, 8, 64).unwrap(), QuantFormat::Q8)
        .unwrap_err()
        .to_string();
    assert!(e.contains("(0, 5)"), "{e}");
    let e = QuantMatrix::from_bytes(
        QuantFormat::Q8,
        8,
        64,
        std::sync::Arc::new(vec![0u8; 10]),
        std::sync::Arc::new(vec![0u8; 32]),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("needs 512 data bytes and 32 scale bytes"), "{e}");
}
