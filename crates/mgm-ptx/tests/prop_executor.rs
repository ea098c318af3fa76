//! Property tests: kernels on random sizes and launch shapes against plain Rust references.

mod common;

use common::*;
use mgm_ptx::Arg;
use proptest::prelude::*;

const REDUCE: &str = include_str!("ptx/reduce.ptx");

fn axpy_kernel() -> String {
    kernel(
        "axpy",
        ", .param .u64 x, .param .u64 y, .param .f32 a, .param .u32 n",
        "ld.param.u32 %r2, [n];\nsetp.ge.u32 %p1, %r1, %r2;\n@%p1 bra END;\nld.param.u64 %rd2, [x];\nld.param.u64 %rd3, [y];\n\
         ld.param.f32 %f1, [a];\nadd.s64 %rd4, %rd2, %rd30;\nadd.s64 %rd5, %rd3, %rd30;\nld.global.f32 %f2, [%rd4];\n\
         ld.global.f32 %f3, [%rd5];\nfma.rn.f32 %f4, %f1, %f2, %f3;\nst.global.f32 [%rd29], %f4;\nEND:",
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn elementwise_fma_matches_rust_exactly(
        xs in proptest::collection::vec(-1e3f32..1e3, 1..3000),
        a in -10f32..10.0,
        warps in 1u32..16,
    ) {
        let m = module(&axpy_kernel());
        let n = xs.len();
        let ys: Vec<f32> = xs.iter().map(|v| v * 0.5 - 1.0).collect();
        let threads = warps * 32;
        let blocks = (n as u32).div_ceil(threads);
        let mut out = vec![f32::NAN; n];
        let mut args = [
            Arg::output(&mut out),
            Arg::input(&xs),
            Arg::input(&ys),
            Arg::F32(a),
            Arg::U32(n as u32),
        ];
        run(&m, "axpy", launch(blocks, threads), &mut args).unwrap();
        for i in 0..n {
            prop_assert_eq!(out[i].to_bits(), a.mul_add(xs[i], ys[i]).to_bits(), "index {}", i);
        }
    }

    #[test]
    fn block_reduction_matches_f64_sum(xs in proptest::collection::vec(-100f32..100.0, 1..4000)) {
        let m = module(REDUCE);
        let n = xs.len();
        let blocks = n.div_ceil(256);
        let mut out = vec![f32::NAN; blocks];
        let mut args = [Arg::input(&xs), Arg::output(&mut out), Arg::U32(n as u32)];
        let stats = run(&m, "block_sum", launch(blocks as u32, 256), &mut args).unwrap();
        prop_assert_eq!(stats.barriers, 9 * blocks as u64);
        for b in 0..blocks {
            let chunk = &xs[b * 256..((b + 1) * 256).min(n)];
            let want: f64 = chunk.iter().map(|&v| v as f64).sum();
            let scale: f64 = chunk.iter().map(|&v| (v as f64).abs()).sum();
            let err = (out[b] as f64 - want).abs();
            prop_assert!(err <= 1e-5 * (1.0 + scale), "block {}: {} vs {}", b, out[b], want);
        }
    }

    #[test]
    fn warp_shuffle_reduction_matches_f64_sum(
        xs in proptest::collection::vec(-100f32..100.0, 1..40),
        blocks in 1usize..5,
    ) {
        // Pad to whole warps: every lane takes part in the shuffles.
        let mut x: Vec<f32> = Vec::new();
        for b in 0..blocks * 2 {
            x.extend(xs.iter().cycle().skip(b).take(32));
        }
        let m = module(REDUCE);
        let mut out = vec![f32::NAN; blocks * 2];
        let mut args = [Arg::input(&x), Arg::output(&mut out)];
        run(&m, "warp_sum", launch(blocks as u32, 64), &mut args).unwrap();
        for w in 0..blocks * 2 {
            let chunk = &x[w * 32..(w + 1) * 32];
            let want: f64 = chunk.iter().map(|&v| v as f64).sum();
            let scale: f64 = chunk.iter().map(|&v| (v as f64).abs()).sum();
            let err = (out[w] as f64 - want).abs();
            prop_assert!(err <= 1e-5 * (1.0 + scale), "warp {}: {} vs {}", w, out[w], want);
        }
    }
}
