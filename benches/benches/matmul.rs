//! Square matmul through `Tensor::matmul` (f32 and bf16) against the `gemm` crate called
//! directly, in GFLOP/s (2 n^3 FLOPs per product); then mgm-kernels' packed GEMM on CLIP-L's
//! linear-layer shapes for each backend this CPU has (the work a frozen `Linear` does per call:
//! activations packed, weight packed once) against gemm on the same row-major operands.
//!
//! The peer is called the way `mgm_tensor::ops::matmul` calls gemm: row-major operands, the
//! destination overwritten (`read_dst` false, alpha 0, beta 1) and
//! `Parallelism::Rayon(rayon::current_num_threads())`. Its output buffer is allocated once,
//! as a direct user of gemm would; `Tensor::matmul` allocates its result on every call, which is
//! part of what it costs. bf16 has no gemm kernel, so mgm widens bf16 to f32; its peers are
//! gemm f32 on the same size (the work mgm actually does) and gemm's own f16 kernel.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput, criterion_group};
use mgm_benches::{Row, interleaved, report};
use mgm_kernels::gemm::{
    self as kgemm, Backend, Epilogue, MatMut, MatRef, PackedLhs, PackedRhs, Parallelism,
};
use mgm_tensor::{DType, Device, Tensor};

const SIZES: [usize; 3] = [512, 1024, 2048];
/// CLIP ViT-L/14-336's projections: (tokens, in, out) of q|k|v, out_proj, fc1, fc2.
const LINEAR: [(usize, usize, usize); 4] = [
    (577, 1024, 3072),
    (577, 1024, 1024),
    (577, 1024, 4096),
    (577, 4096, 1024),
];

/// Two n x n standard-normal operands of `dtype` (drawn in f32, then cast).
fn operands(n: usize, dtype: DType) -> (Tensor, Tensor) {
    let make = |seed| {
        Tensor::randn(seed, &[n, n], 0.0, 1.0, DType::F32, Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("randn of a valid shape")
    };
    (make(1), make(2))
}

/// The same operands as `operands(n, _)` as plain row-major f32 buffers.
fn f32_buffers(n: usize) -> (Vec<f32>, Vec<f32>) {
    let (a, b) = operands(n, DType::F32);
    (
        a.to_vec::<f32>().expect("f32 tensor"),
        b.to_vec::<f32>().expect("f32 tensor"),
    )
}

/// The same operands rounded to gemm's f16.
fn f16_buffers(n: usize) -> (Vec<gemm::f16>, Vec<gemm::f16>) {
    let (a, b) = f32_buffers(n);
    let cast = |v: Vec<f32>| v.into_iter().map(gemm::f16::from_f32).collect();
    (cast(a), cast(b))
}

/// `c = a b` for row-major n x n buffers through `gemm::gemm`, with the same arguments and
/// parallelism as mgm-tensor's matmul. `T` is f32 or `gemm::f16`.
fn gemm_square<T: Copy + 'static>(c: &mut [T], a: &[T], b: &[T], n: usize, zero: T, one: T) {
    assert!(a.len() == n * n && b.len() == n * n && c.len() == n * n);
    // SAFETY: all three buffers hold n*n elements, row-major (column stride 1, row stride n),
    // so every index gemm touches is in bounds; `c` is an exclusive borrow, distinct from `a`
    // and `b`. With read_dst false gemm overwrites `c` with zero*c + one*a*b.
    unsafe {
        gemm::gemm(
            n,
            n,
            n,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            n as isize,
            b.as_ptr(),
            1,
            n as isize,
            zero,
            one,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}

/// `c = a b` for row-major `[m, k] x [k, n]` through `gemm::gemm`, as for the square case.
fn gemm_rect(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize) {
    assert!(a.len() == m * k && b.len() == k * n && c.len() == m * n);
    // SAFETY: row-major buffers of exactly these sizes (column stride 1, row strides k, n and
    // n); `c` is exclusive and distinct from the inputs; read_dst false overwrites it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}

fn gemm_f32(c: &mut [f32], a: &[f32], b: &[f32], n: usize) {
    gemm_square(c, a, b, n, 0.0, 1.0);
}

fn gemm_f16(c: &mut [gemm::f16], a: &[gemm::f16], b: &[gemm::f16], n: usize) {
    gemm_square(c, a, b, n, gemm::f16::ZERO, gemm::f16::ONE);
}

/// Rounds per side: enough for a stable best on 2 cores, few enough for a short run.
fn rounds(n: usize) -> usize {
    if n <= 512 {
        21
    } else if n <= 1024 {
        11
    } else {
        7
    }
}

fn table() {
    let mut rows = Vec::new();
    let gflops = |n: usize| 2.0 * (n as f64).powi(3);
    for n in SIZES {
        let (a, b) = operands(n, DType::F32);
        let (av, bv) = f32_buffers(n);
        let mut c = vec![0f32; n * n];
        let t = interleaved(
            rounds(n),
            &mut [
                &mut || drop(black_box(a.matmul(&b).expect("matmul"))),
                &mut || gemm_f32(&mut c, &av, &bv, n),
            ],
        );
        let case = format!("matmul f32 {n}");
        rows.push(Row::from_timings(
            &case,
            "GFLOP/s",
            gflops(n),
            1e-9,
            t[0],
            t[1],
            "gemm f32",
        ));
    }
    for n in SIZES {
        let (a, b) = operands(n, DType::BF16);
        let (av, bv) = f32_buffers(n);
        let (ah, bh) = f16_buffers(n);
        let mut c = vec![0f32; n * n];
        let mut ch = vec![gemm::f16::ZERO; n * n];
        let t = interleaved(
            rounds(n),
            &mut [
                &mut || drop(black_box(a.matmul(&b).expect("matmul"))),
                &mut || gemm_f32(&mut c, &av, &bv, n),
                &mut || gemm_f16(&mut ch, &ah, &bh, n),
            ],
        );
        let case = format!("matmul bf16 {n}");
        for (peer, name) in [(t[1], "gemm f32"), (t[2], "gemm f16")] {
            rows.push(Row::from_timings(
                &case,
                "GFLOP/s",
                gflops(n),
                1e-9,
                t[0],
                peer,
                name,
            ));
        }
    }
    // The packed GEMM as a frozen linear layer runs it (weight packed once, the activations
    // packed per call) on CLIP-L's shapes, per backend, against gemm on row-major operands.
    for (m, k, n) in LINEAR {
        let a = Tensor::randn(3, &[m, k], 0.0, 1.0, DType::F32, Device::Cpu).expect("randn");
        let w = Tensor::randn(4, &[k, n], 0.0, 0.02, DType::F32, Device::Cpu).expect("randn");
        let (av, wv) = (
            a.to_vec::<f32>().expect("f32"),
            w.to_vec::<f32>().expect("f32"),
        );
        for backend in [Backend::Amx, Backend::Avx512, Backend::Portable] {
            if !backend.is_available() {
                continue;
            }
            let packed =
                PackedRhs::with_backend(MatRef::row_major(&wv, k, n).expect("shape"), backend)
                    .expect("available backend");
            let (mut c, mut c2) = (vec![0f32; m * n], vec![0f32; m * n]);
            let t = interleaved(
                11,
                &mut [
                    &mut || {
                        let lhs = PackedLhs::with_backend(
                            MatRef::row_major(&av, m, k).expect("shape"),
                            backend,
                        )
                        .expect("available backend");
                        kgemm::cpu_packed(
                            &lhs,
                            &packed,
                            MatMut::row_major(&mut c, m, n).expect("shape"),
                            &Epilogue::default(),
                            Parallelism::Rayon,
                        )
                        .expect("gemm")
                    },
                    &mut || gemm_rect(&mut c2, &av, &wv, m, k, n),
                ],
            );
            rows.push(Row::from_timings(
                &format!("linear f32 {m}x{k}x{n} packed ({backend:?})"),
                "GFLOP/s",
                2.0 * (m * k * n) as f64,
                1e-9,
                t[0],
                t[1],
                "gemm f32",
            ));
        }
    }
    report(
        "matmul",
        &format!(
            "ours vs gemm called directly, {} rayon threads, interleaved rounds, best of each side",
            rayon::current_num_threads()
        ),
        &rows,
    );
}

fn bench(c: &mut Criterion) {
    for dtype in [DType::F32, DType::BF16] {
        let mut g = c.benchmark_group(format!("matmul_{dtype}"));
        // A 2048 product takes ~0.1 s here: flat sampling with 10 samples keeps the group short.
        g.sampling_mode(SamplingMode::Flat);
        g.sample_size(10);
        g.warm_up_time(Duration::from_millis(500));
        g.measurement_time(Duration::from_secs(2));
        for n in SIZES {
            g.throughput(Throughput::Elements(2 * (n as u64).pow(3)));
            let (a, b) = operands(n, dtype);
            g.bench_function(format!("mgm/{n}"), |bch| {
                bch.iter(|| black_box(a.matmul(&b).expect("matmul")))
            });
            if dtype == DType::F32 {
                let (av, bv) = f32_buffers(n);
                let mut out = vec![0f32; n * n];
                g.bench_function(format!("gemm_f32/{n}"), |bch| {
                    bch.iter(|| gemm_f32(&mut out, &av, &bv, n))
                });
            } else {
                let (ah, bh) = f16_buffers(n);
                let mut out = vec![gemm::f16::ZERO; n * n];
                g.bench_function(format!("gemm_f16/{n}"), |bch| {
                    bch.iter(|| gemm_f16(&mut out, &ah, &bh, n))
                });
            }
        }
        g.finish();
    }
}

criterion_group!(benches, bench);

fn main() {
    mgm_benches::table_then_criterion(table, benches);
}
