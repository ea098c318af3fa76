//! Row softmax, LayerNorm (weight and bias, eps 1e-5) and RMSNorm (weight, eps 1e-6) over the
//! last dim of an f32 [4096, 4096] tensor, in GB/s of bytes read + written (4 bytes per element
//! in, 4 out; the [4096] weight and bias are negligible), against a plain parallel memory copy
//! of the same size measured in the same run.
//!
//! The peer is `copy_from_slice` into a preallocated buffer, split into one chunk per rayon
//! thread as our ops are parallel: the floor for any op that reads and writes every element
//! once. Our ops also allocate their 64 MiB output on every call, and a fresh allocation that
//! large is a new mmap whose pages fault in on first write (about 20 ms of page faults on this
//! VM, more than the copy itself), so a second peer row, `memcpy+alloc`, copies into a freshly
//! allocated `vec![0.0; n]` exactly as our ops allocate: its ratio is the kernel's own
//! efficiency, the first row's the cost a caller sees against the bandwidth floor.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput, criterion_group};
use mgm_benches::{Row, interleaved, report};
use mgm_tensor::{DType, Device, Tensor};
use rayon::prelude::*;

const ROWS: usize = 4096;
const COLS: usize = 4096;
/// Bytes read + written by one pass: 4 bytes in and 4 bytes out per element.
const BYTES: u64 = 2 * 4 * (ROWS * COLS) as u64;

/// `dst.copy_from_slice(src)`, split into one contiguous chunk per rayon thread.
fn par_copy(dst: &mut [f32], src: &[f32]) {
    let chunk = src.len().div_ceil(rayon::current_num_threads()).max(1);
    dst.par_chunks_mut(chunk)
        .zip(src.par_chunks(chunk))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// [`par_copy`] into a new buffer, allocated the way our ops allocate their output.
fn par_copy_alloc(src: &[f32]) -> Vec<f32> {
    let mut dst = vec![0f32; src.len()];
    par_copy(&mut dst, src);
    dst
}

type Op = fn(&Tensor, &Tensor, &Tensor) -> Tensor;

fn ops() -> [(&'static str, Op); 3] {
    [
        ("softmax", |x, _, _| x.softmax(-1).expect("softmax")),
        ("layer_norm", |x, w, b| {
            x.layer_norm(Some(w), Some(b), 1e-5).expect("layer_norm")
        }),
        ("rms_norm", |x, w, _| {
            x.rms_norm(Some(w), 1e-6).expect("rms_norm")
        }),
    ]
}

/// The input (std 2, so softmax rows are not flat), a weight near 1 and a small bias.
fn inputs() -> (Tensor, Tensor, Tensor) {
    let randn = |seed, shape: &[usize], mean, std| {
        Tensor::randn(seed, shape, mean, std, DType::F32, Device::Cpu).expect("randn")
    };
    (
        randn(3, &[ROWS, COLS], 0.0, 2.0),
        randn(4, &[COLS], 1.0, 0.1),
        randn(5, &[COLS], 0.0, 0.1),
    )
}

fn table() {
    let (x, w, b) = inputs();
    let src = x.to_vec::<f32>().expect("f32 tensor");
    let mut dst = vec![0f32; src.len()];
    let mut rows = Vec::new();
    for (name, op) in ops() {
        let t = interleaved(
            15,
            &mut [
                &mut || drop(black_box(op(&x, &w, &b))),
                &mut || par_copy(&mut dst, &src),
                &mut || drop(black_box(par_copy_alloc(&src))),
            ],
        );
        let case = format!("{name} [{ROWS},{COLS}]");
        for (peer, peer_name) in [(t[1], "memcpy"), (t[2], "memcpy+alloc")] {
            rows.push(Row::from_timings(
                &case,
                "GB/s",
                BYTES as f64,
                1e-9,
                t[0],
                peer,
                peer_name,
            ));
        }
    }
    report(
        "norm",
        &format!(
            "ours vs a parallel copy_from_slice ({} rayon chunks) into a preallocated buffer \
             (memcpy) and into a fresh one (memcpy+alloc), interleaved rounds, best of each side",
            rayon::current_num_threads()
        ),
        &rows,
    );
}

fn bench(c: &mut Criterion) {
    let (x, w, b) = inputs();
    let src = x.to_vec::<f32>().expect("f32 tensor");
    let mut dst = vec![0f32; src.len()];
    let mut g = c.benchmark_group(format!("rows_f32_{ROWS}x{COLS}"));
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    g.throughput(Throughput::Bytes(BYTES));
    for (name, op) in ops() {
        g.bench_function(name, |bch| bch.iter(|| black_box(op(&x, &w, &b))));
    }
    g.bench_function("memcpy", |bch| bch.iter(|| par_copy(&mut dst, &src)));
    g.bench_function("memcpy_alloc", |bch| {
        bch.iter(|| black_box(par_copy_alloc(&src)))
    });
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    mgm_benches::table_then_criterion(table, benches);
}
