//! The GPU twins of the PTX property tests: the same kernels through cudarc on a real device,
//! against the f64 references. They need a CUDA GPU, so they are ignored in CI (where the
//! mgm-ptx executor runs the same PTX); `cargo xtask verify` runs them with `--include-ignored`
//! when a driver is present.
#![cfg(feature = "cuda")]

mod common;

use mgm_kernels::cuda::Gpu;
use mgm_kernels::{layer_norm_gelu, rms_norm, softmax, topk_attention, windowed_attention};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use windowed_attention::{Mask, Shape};

fn gpu() -> Gpu {
    Gpu::new(0).unwrap_or_else(|e| panic!("this test needs a CUDA GPU: {e}"))
}

fn data(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(-scale..scale)).collect()
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Row shapes with widths that are not multiples of 32, and one wide row.
const ROWS: [(usize, usize); 5] = [(1, 1), (3, 31), (7, 33), (64, 257), (2, 4099)];

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_softmax_matches_reference() {
    let g = gpu();
    for (i, &(rows, cols)) in ROWS.iter().enumerate() {
        let x = data(i as u64, rows * cols, 8.0);
        let mut y = vec![f32::NAN; x.len()];
        softmax::cuda(&g, &x, &mut y, rows, cols).expect("launch");
        let r = softmax::reference_f64(&widen(&x), rows, cols).expect("reference");
        let e = common::check_elementwise("softmax gpu", &y, &r, 1e-5).unwrap();
        common::record("softmax", "gpu", e);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_rms_norm_matches_reference() {
    let g = gpu();
    for (i, &(rows, cols)) in ROWS.iter().enumerate() {
        for variant in [rms_norm::Variant::Llama, rms_norm::Variant::Gemma] {
            let x = data(i as u64, rows * cols, 3.0);
            let w = data(100 + i as u64, cols, 1.0);
            let mut y = vec![f32::NAN; x.len()];
            rms_norm::cuda(&g, &x, &w, &mut y, rows, cols, 1e-6, variant).expect("launch");
            let r = rms_norm::reference_f64(&widen(&x), &widen(&w), rows, cols, 1e-6, variant)
                .expect("reference");
            let e = common::check_elementwise("rms_norm gpu", &y, &r, 1e-5).unwrap();
            common::record("rms_norm", "gpu", e);
        }
    }
}

fn attention_cases() -> Vec<(Shape, Mask)> {
    let mut out = Vec::new();
    for (n, d) in [(1, 1), (33, 5), (100, 64), (257, 128), (64, 31)] {
        for mask in [
            Mask::Causal { w: 1 },
            Mask::Causal { w: 17 },
            Mask::Bidirectional { r: 3 },
            Mask::Full,
        ] {
            out.push((
                Shape {
                    batch: 2,
                    heads: 2,
                    n,
                    d,
                },
                mask,
            ));
        }
    }
    out
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_windowed_attention_matches_reference() {
    let g = gpu();
    for (i, (shape, mask)) in attention_cases().into_iter().enumerate() {
        let len = shape.batch * shape.heads * shape.n * shape.d;
        let (q, k, v) = (
            data(3 * i as u64, len, 1.0),
            data(3 * i as u64 + 1, len, 1.0),
            data(3 * i as u64 + 2, len, 1.0),
        );
        let mut out = vec![f32::NAN; len];
        windowed_attention::cuda(&g, &q, &k, &v, &mut out, shape, mask).expect("launch");
        let r = windowed_attention::reference_f64(&q, &k, &v, shape, mask).expect("reference");
        let e = common::check_frobenius("windowed_attention gpu", &out, &r, 1e-5).unwrap();
        common::record("windowed_attention", "gpu", e);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_topk_attention_matches_reference() {
    let g = gpu();
    for (i, (shape, mask)) in attention_cases().into_iter().enumerate() {
        for k_keep in [1, 4, shape.n + 1] {
            let len = shape.batch * shape.heads * shape.n * shape.d;
            // Quarter steps keep every score exact, so the kept set cannot flip on rounding.
            let grid = |s: u64| -> Vec<f32> {
                data(s, len, 2.0)
                    .iter()
                    .map(|x| (x * 4.0).round() / 4.0)
                    .collect()
            };
            let (q, k, v) = (
                grid(7 * i as u64),
                grid(7 * i as u64 + 1),
                data(7 * i as u64 + 2, len, 1.0),
            );
            let topk = topk_attention::TopK { mask, k: k_keep };
            let mut out = vec![f32::NAN; len];
            topk_attention::cuda(&g, &q, &k, &v, &mut out, shape, topk).expect("launch");
            let r = topk_attention::reference_f64(&q, &k, &v, shape, topk).expect("reference");
            let e = common::check_frobenius("topk_attention gpu", &out, &r, 1e-5).unwrap();
            common::record("topk_attention", "gpu", e);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_layer_norm_gelu_forward_and_backward_match_reference() {
    use layer_norm_gelu::{Gelu, Grads, Params, Stats};
    let g = gpu();
    for (i, &(rows, cols)) in ROWS.iter().enumerate().skip(1) {
        for gelu in [Gelu::Erf, Gelu::Tanh] {
            let p = Params {
                rows,
                cols,
                eps: 1e-5,
                gelu,
            };
            // Row spread well above eps keeps dx well conditioned (see prop_layer_norm_gelu).
            let x = data(i as u64, rows * cols, 4.0);
            let (gm, bt) = (
                data(50 + i as u64, cols, 1.5),
                data(60 + i as u64, cols, 1.0),
            );
            let (mut y, mut mean, mut rstd) =
                (vec![f32::NAN; x.len()], vec![0f32; rows], vec![0f32; rows]);
            layer_norm_gelu::cuda(&g, &x, &gm, &bt, &mut y, &mut mean, &mut rstd, p).expect("fwd");
            let r = layer_norm_gelu::reference_f64(&widen(&x), &widen(&gm), &widen(&bt), p)
                .expect("ref");
            let e = common::check_elementwise("layer_norm_gelu gpu fwd", &y, &r.y, 1e-5).unwrap();
            common::record("layer_norm_gelu fwd_f32", "gpu", e);

            let dy = data(70 + i as u64, x.len(), 1.0);
            let (mut dx, mut dgm, mut dbt) = (
                vec![f32::NAN; x.len()],
                vec![f32::NAN; cols],
                vec![f32::NAN; cols],
            );
            let stats = Stats {
                mean: &mean,
                rstd: &rstd,
            };
            let grads = Grads {
                dx: &mut dx,
                dgamma: &mut dgm,
                dbeta: &mut dbt,
            };
            layer_norm_gelu::cuda_bwd(&g, &x, &gm, &bt, stats, &dy, grads, p).expect("bwd");
            // The reference backward gets the same f32 statistics the kernel used.
            let rb = layer_norm_gelu::reference_bwd_f64(
                &widen(&x),
                &widen(&gm),
                &widen(&bt),
                &widen(&mean),
                &widen(&rstd),
                &widen(&dy),
                p,
            )
            .expect("ref bwd");
            let mut e =
                common::check_elementwise("layer_norm_gelu gpu dx", &dx, &rb.dx, 1e-5).unwrap();
            e = e.max(
                common::check_elementwise("layer_norm_gelu gpu dgamma", &dgm, &rb.dgamma, 1e-5)
                    .unwrap(),
            );
            e = e.max(
                common::check_elementwise("layer_norm_gelu gpu dbeta", &dbt, &rb.dbeta, 1e-5)
                    .unwrap(),
            );
            common::record("layer_norm_gelu bwd_f32", "gpu", e);
        }
    }
}
