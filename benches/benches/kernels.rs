//! mgm-kernels' fast CPU paths against the unfused / dense alternatives, measured in the same run.
//!
//! - Fused LayerNorm + GELU (`layer_norm_gelu::cpu`, one pass producing y) against mgm-tensor's
//!   `layer_norm` followed by `gelu`: two passes over the activations, each allocating its
//!   output. The fused side allocates its output (and the saved mean/rstd) per call too, so the
//!   ratio is the fusion's, not the allocator's. Shape [8192, 1024] f32 (MGM's LN width for
//!   patch-info mining queries), exact (erf) GELU.
//! - Windowed attention (`windowed_attention::cpu`, causal W = 256, d = 64, one head) at n =
//!   1024..16384: time per token must stay flat (O(n W)); at n = 8192 against dense masked
//!   attention through mgm-tensor (scores, masked_fill, softmax, times V: O(n^2)).
#![allow(missing_docs)]
#![allow(clippy::print_stdout)] // a bench reports on stdout

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, criterion_group};
use mgm_benches::{Row, interleaved, report};
use mgm_kernels::layer_norm_gelu::{self, Gelu, Params};
use mgm_kernels::windowed_attention::{self, Mask, Shape};
use mgm_tensor::{DType, Device, Tensor};

// ---- fused LayerNorm + GELU ----

const LN_ROWS: usize = 8192;
const LN_COLS: usize = 1024;
const EPS: f32 = 1e-5;

fn ln_inputs() -> (Tensor, Tensor, Tensor) {
    let randn = |seed, shape: &[usize], mean, std| {
        Tensor::randn(seed, shape, mean, std, DType::F32, Device::Cpu).expect("randn")
    };
    (
        randn(1, &[LN_ROWS, LN_COLS], 0.5, 2.0),
        randn(2, &[LN_COLS], 1.0, 0.1),
        randn(3, &[LN_COLS], 0.0, 0.1),
    )
}

fn fused(x: &[f32], g: &[f32], b: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    let mut mean = vec![0f32; LN_ROWS];
    let mut rstd = vec![0f32; LN_ROWS];
    let p = Params {
        rows: LN_ROWS,
        cols: LN_COLS,
        eps: EPS,
        gelu: Gelu::Erf,
    };
    layer_norm_gelu::cpu(x, g, b, &mut y, &mut mean, &mut rstd, p).expect("fused layer_norm_gelu");
    y
}

fn two_pass(x: &Tensor, g: &Tensor, b: &Tensor) -> Tensor {
    x.layer_norm(Some(g), Some(b), EPS as f64)
        .and_then(|t| t.gelu())
        .expect("layer_norm then gelu")
}

fn ln_table() -> Vec<Row> {
    let (x, g, b) = ln_inputs();
    let v = |t: &Tensor| t.to_vec::<f32>().expect("f32");
    let (xs, gs, bs) = (v(&x), v(&g), v(&b));
    let t = interleaved(
        15,
        &mut [&mut || drop(black_box(fused(&xs, &gs, &bs))), &mut || {
            drop(black_box(two_pass(&x, &g, &b)))
        }],
    );
    // Bytes the fused kernel must move: x in, y out.
    let bytes = (2 * 4 * LN_ROWS * LN_COLS) as f64;
    vec![Row::from_timings(
        &format!("layer_norm+gelu(erf) [{LN_ROWS},{LN_COLS}]"),
        "GB/s",
        bytes,
        1e-9,
        t[0],
        t[1],
        "mgm-tensor layer_norm then gelu",
    )]
}

// ---- windowed attention ----

const D: usize = 64;
const W: usize = 256;
const NS: [usize; 5] = [1024, 2048, 4096, 8192, 16384];
const DENSE_N: usize = 8192;

fn qkv(n: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let g = |seed| {
        Tensor::randn(seed, &[n * D], 0.0, 1.0, DType::F32, Device::Cpu)
            .and_then(|t| t.to_vec::<f32>())
            .expect("randn")
    };
    (g(11), g(12), g(13))
}

fn windowed(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], n: usize) {
    let shape = Shape {
        batch: 1,
        heads: 1,
        n,
        d: D,
    };
    windowed_attention::cpu(q, k, v, out, shape, Mask::Causal { w: W })
        .expect("windowed attention");
}

/// Dense masked attention as a mgm-tensor user writes it: scores, band mask, softmax, times V.
struct Dense {
    q: Tensor,
    kt: Tensor,
    v: Tensor,
    outside: Tensor,
}

impl Dense {
    fn new(q: &[f32], k: &[f32], v: &[f32], n: usize) -> Dense {
        let t = |x: &[f32]| Tensor::from_vec(x.to_vec(), &[n, D]).expect("tensor");
        // 1 where key j is outside query i's causal window [i - W + 1, i].
        let outside: Vec<u8> = (0..n * n)
            .map(|ij| {
                let (i, j) = (ij / n, ij % n);
                u8::from(j > i || i - j >= W)
            })
            .collect();
        Dense {
            q: t(q),
            kt: t(k).transpose(0, 1).expect("transpose"),
            v: t(v),
            outside: Tensor::from_vec(outside, &[n, n]).expect("mask"),
        }
    }

    fn run(&self) -> Tensor {
        self.q
            .matmul(&self.kt)
            .and_then(|s| s.mul_scalar(1.0 / (D as f64).sqrt()))
            .and_then(|s| s.masked_fill(&self.outside, f64::NEG_INFINITY))
            .and_then(|s| s.softmax(-1))
            .and_then(|p| p.matmul(&self.v))
            .expect("dense attention")
    }
}

fn attention_table() -> (Vec<Row>, f64) {
    let mut rows = Vec::new();
    let mut per_token = Vec::new();
    for n in NS {
        let (q, k, v) = qkv(n);
        let mut out = vec![0f32; n * D];
        let rounds = (16384 / n).clamp(3, 15);
        let t = interleaved(rounds, &mut [&mut || windowed(&q, &k, &v, &mut out, n)]);
        per_token.push((n, t[0].best / n as f64));
    }
    let lo = per_token.iter().map(|p| p.1).fold(f64::MAX, f64::min);
    let hi = per_token.iter().map(|p| p.1).fold(0.0, f64::max);
    for &(n, t) in &per_token {
        // The flatness check: each n against the fastest per-token time over all n.
        rows.push(Row::new(
            &format!("windowed attention n={n} W={W} d={D}, per token"),
            "ktokens/s",
            1e-3 / t,
            1e-3 / lo,
            "best n",
        ));
    }
    let (q, k, v) = qkv(DENSE_N);
    let mut out = vec![0f32; DENSE_N * D];
    let dense = Dense::new(&q, &k, &v, DENSE_N);
    let t = interleaved(
        3,
        &mut [&mut || windowed(&q, &k, &v, &mut out, DENSE_N), &mut || {
            drop(black_box(dense.run()))
        }],
    );
    rows.push(Row::from_timings(
        &format!("attention n={DENSE_N} W={W} d={D}"),
        "ktokens/s",
        DENSE_N as f64,
        1e-3,
        t[0],
        t[1],
        "dense masked mgm-tensor",
    ));
    (rows, hi / lo)
}

fn table() {
    let mut rows = ln_table();
    let (attn, flatness) = attention_table();
    rows.extend(attn);
    report(
        "kernels",
        &format!(
            "mgm-kernels fast CPU vs unfused/dense mgm-tensor, {} rayon threads, interleaved \
             rounds, best of each side",
            rayon::current_num_threads()
        ),
        &rows,
    );
    println!(
        "windowed attention: per-token time max/min over n = {NS:?}: {flatness:.2} (target <= 1.3)"
    );
}

fn bench(c: &mut Criterion) {
    let (x, g, b) = ln_inputs();
    let v = |t: &Tensor| t.to_vec::<f32>().expect("f32");
    let (xs, gs, bs) = (v(&x), v(&g), v(&b));
    let mut grp = c.benchmark_group(format!("layer_norm_gelu_{LN_ROWS}x{LN_COLS}"));
    grp.sampling_mode(SamplingMode::Flat);
    grp.sample_size(10);
    grp.warm_up_time(Duration::from_millis(500));
    grp.measurement_time(Duration::from_secs(2));
    grp.bench_function("fused", |bch| bch.iter(|| black_box(fused(&xs, &gs, &bs))));
    grp.bench_function("two_pass_tensor", |bch| {
        bch.iter(|| black_box(two_pass(&x, &g, &b)))
    });
    grp.finish();
    let mut grp = c.benchmark_group(format!("windowed_attention_w{W}_d{D}"));
    grp.sampling_mode(SamplingMode::Flat);
    grp.sample_size(10);
    grp.warm_up_time(Duration::from_millis(500));
    grp.measurement_time(Duration::from_secs(2));
    for n in [1024, 8192] {
        let (q, k, v) = qkv(n);
        let mut out = vec![0f32; n * D];
        grp.bench_function(format!("n{n}"), |bch| {
            bch.iter(|| windowed(&q, &k, &v, &mut out, n))
        });
    }
    grp.finish();
}

criterion_group!(benches, bench);

fn main() {
    mgm_benches::table_then_criterion(table, benches);
}
