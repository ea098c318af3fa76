//! mgm-umm against the system allocator and against contiguous KV caches.
//!
//! - Pool: one decode step's worth of tensor-sized buffers (the activations of a TinyLlama-sized
//!   layer at batch 1: [2048], [5632] twice, [32000] logits, [128, 2048] for a prefill chunk),
//!   each allocated, its first element and a page of it written, and freed, through
//!   `CachingPool` against `vec![0.0; n]` + drop, in interleaved rounds; allocations per second.
//! - Paged KV: KV bytes held by 8 sequences of 16, 40, 64, 100, 128, 256, 384 and 512 tokens
//!   (TinyLlama's 22 layers x 4 KV heads x 64 x (K + V) x f32 per token) in blocks of 16 tokens,
//!   against one contiguous `[8, 512]` cache (B x max length), the layout mgm-llm's KvCache uses
//!   today. (tokens/s of batched decode on paged blocks comes when mgm-llm decodes on them.)
#![allow(missing_docs)]
#![allow(clippy::print_stdout)] // a bench reports on stdout

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group};
use mgm_benches::{Row, interleaved, report};
use mgm_umm::paged::PagedKv;
use mgm_umm::pool::CachingPool;

const SIZES: [usize; 5] = [2048, 5632, 5632, 32000, 128 * 2048];
const STEPS: usize = 200;

fn touch(b: &mut [f32]) {
    // what an op does first: write its output (one element per page)
    for v in b.iter_mut().step_by(1024) {
        *v = 1.0;
    }
}

fn with_pool(pool: &CachingPool) {
    for _ in 0..STEPS {
        for &n in &SIZES {
            let mut b = pool.alloc(n);
            touch(b.as_mut_slice());
            black_box(b.as_slice()[0]);
            pool.free(b);
        }
    }
}

fn with_system() {
    for _ in 0..STEPS {
        for &n in &SIZES {
            let mut b = vec![0f32; n];
            touch(&mut b);
            black_box(b[0]);
            drop(b);
        }
    }
}

fn table() {
    let pool = CachingPool::new();
    let t = interleaved(15, &mut [&mut || with_pool(&pool), &mut || with_system()]);
    let allocs = (STEPS * SIZES.len()) as f64;
    let mut rows = vec![Row::from_timings(
        "alloc+free decode-step buffers",
        "M allocs/s",
        allocs,
        1e-6,
        t[0],
        t[1],
        "system allocator",
    )];
    let s = pool.stats();
    // paged against contiguous KV bytes
    let lens = [16usize, 40, 64, 100, 128, 256, 384, 512];
    let per_token = 22 * 4 * 64 * 2 * 4; // layers x KV heads x head dim x (K, V) x f32
    let mut kv = PagedKv::new(1024, 16).expect("1024 blocks of 16");
    for &l in &lens {
        let id = kv.add_sequence();
        for _ in 0..l {
            kv.append(id).expect("enough blocks");
        }
    }
    let paged = (kv.used_blocks() * 16 * per_token) as f64;
    let contiguous = (lens.len() * 512 * per_token) as f64;
    // a rate of sequences held per GB, so higher is better like every other row
    rows.push(Row::new(
        "KV for 8 sequences of 16..512 tokens",
        "batches/GB",
        1e9 / paged,
        1e9 / contiguous,
        "contiguous B x max",
    ));
    report(
        "umm",
        &format!(
            "CachingPool vs vec! + drop over {} buffers per step, interleaved rounds, best of \
             each (pool: {} hits, {} misses, {:.1} MB reserved); paged KV {:.1} MB vs \
             contiguous {:.1} MB",
            SIZES.len(),
            s.hits,
            s.misses,
            s.reserved as f64 / 1e6,
            paged / 1e6,
            contiguous / 1e6
        ),
        &rows,
    );
}

fn bench(c: &mut Criterion) {
    let pool = CachingPool::new();
    let mut g = c.benchmark_group("umm_alloc");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(2));
    g.bench_function("pool", |b| b.iter(|| with_pool(&pool)));
    g.bench_function("system", |b| b.iter(with_system));
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    mgm_benches::table_then_criterion(table, benches);
}
