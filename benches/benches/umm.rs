//! mgm-umm against the system allocator and against contiguous KV caches.
//!
//! - Pool: one step's worth of tensor-sized buffers (the activations of a TinyLlama-sized
//!   layer at batch 1: [2048], [5632] twice, [32000] logits, [128, 2048] for a prefill chunk,
//!   and a 512-token prefill's [512, 32000] logits, 65 MB: above glibc's largest mmap
//!   threshold, so the system allocator maps and faults in fresh pages for it every time),
//!   each allocated (zeroed as `vec![0.0; n]` is, and uninitialised as `torch.empty` is), a
//!   byte per page written, and freed, through `CachingAlloc` against the system allocator, in
//!   interleaved rounds; allocations per second.
//! - Paged KV: KV bytes held by 8 sequences of 16, 40, 64, 100, 128, 256, 384 and 512 tokens
//!   (TinyLlama's 22 layers x 4 KV heads x 64 x (K + V) x f32 per token) in blocks of 16 tokens,
//!   against one contiguous `[8, 512]` cache (B x max length, mgm-llm's left-padded `KvCache`
//!   layout).
//! - Batched decode: a random LLaMA (hidden 512, 4 layers, 8 heads / 4 KV heads) decoding 32
//!   tokens for each of those 8 prompts, on a paged cache (`CausalLm::step_paged`) against the
//!   left-padded contiguous `KvCache`; decode tokens/s and the KV bytes each holds at the end.
//!   Both must pick the same greedy tokens.
#![allow(missing_docs)]
#![allow(clippy::print_stdout)] // a bench reports on stdout

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group};
use mgm_benches::{Row, interleaved, report};
use mgm_llm::{CausalLm, DecoderConfig, Positions};
use mgm_tensor::Tensor;
use mgm_umm::paged::PagedKv;
use mgm_umm::pool::CachingAlloc;
use std::alloc::{GlobalAlloc, Layout, System};

const SIZES: [usize; 6] = [2048, 5632, 5632, 32000, 128 * 2048, 512 * 32000];
const STEPS: usize = 20;

fn touch(p: *mut u8, bytes: usize) {
    // what an op does first: write its output (one element per page)
    for off in (0..bytes).step_by(4096) {
        // SAFETY: `p` points to `bytes` writable bytes
        unsafe { p.add(off).write(1) };
    }
}

/// One step's buffers, each allocated (zeroed, as `vec![0.0; n]` is, or uninitialised,
/// as `Vec::with_capacity` and `torch.empty` are), touched and freed.
fn with(a: &dyn GlobalAlloc, zeroed: bool) {
    for _ in 0..STEPS {
        for &n in &SIZES {
            let layout = Layout::array::<f32>(n).expect("a small array");
            // SAFETY: a nonzero layout, freed with the same layout below
            unsafe {
                let p = if zeroed {
                    a.alloc_zeroed(layout)
                } else {
                    a.alloc(layout)
                };
                assert!(!p.is_null(), "out of memory");
                touch(p, layout.size());
                black_box(p.read());
                a.dealloc(p, layout);
            }
        }
    }
}

fn table() {
    let pool = CachingAlloc::new();
    let allocs = (STEPS * SIZES.len()) as f64;
    let mut rows = Vec::new();
    for (zeroed, case) in [
        (true, "alloc+free step buffers, zeroed"),
        (false, "alloc+free step buffers, uninitialised"),
    ] {
        let t = interleaved(
            15,
            &mut [&mut || with(&pool, zeroed), &mut || with(&System, zeroed)],
        );
        rows.push(Row::from_timings(
            case,
            "k allocs/s",
            allocs,
            1e-3,
            t[0],
            t[1],
            "system allocator",
        ));
    }
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
    let model = random_llama();
    let (mut best_p, mut best_c) = (Decode::default(), Decode::default());
    for _ in 0..3 {
        let p = decode_paged(&model, &lens);
        let c = decode_contiguous(&model, &lens);
        assert_eq!(
            p.tokens, c.tokens,
            "paged and contiguous decode picked different tokens"
        );
        if p.tok_s > best_p.tok_s {
            best_p = p;
        }
        if c.tok_s > best_c.tok_s {
            best_c = c;
        }
    }
    rows.push(Row::new(
        "batched decode, 8 seqs of 16..512 (+32)",
        "tok/s",
        best_p.tok_s,
        best_c.tok_s,
        "contiguous left-padded",
    ));
    rows.push(Row::new(
        "KV after that decode",
        "batches/GB",
        1e9 / best_p.kv_bytes as f64,
        1e9 / best_c.kv_bytes as f64,
        "contiguous left-padded",
    ));
    report(
        "umm",
        &format!(
            "CachingAlloc vs the system allocator (allocated, touched, freed) over {} buffers per step, interleaved rounds, best of \
             each (pool: {} hits, {} misses, {:.1} MB reserved); paged KV {:.1} MB vs \
             contiguous {:.1} MB; batched decode best of 3 alternating runs, KV {:.1} MB paged \
             vs {:.1} MB contiguous",
            SIZES.len(),
            s.hits,
            s.misses,
            s.reserved as f64 / 1e6,
            paged / 1e6,
            contiguous / 1e6,
            best_p.kv_bytes as f64 / 1e6,
            best_c.kv_bytes as f64 / 1e6
        ),
        &rows,
    );
}

const NEW_TOKENS: usize = 32;

/// A LLaMA with random weights, loaded for inference.
fn random_llama() -> CausalLm {
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 2048,
        "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64,
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": true
    });
    let cfg = DecoderConfig::from_json_str(&cfg.to_string(), "bench").expect("a LLaMA config");
    CausalLm::random(&cfg, 7).expect("random LLaMA")
}

#[derive(Default)]
struct Decode {
    tok_s: f64,
    kv_bytes: usize,
    tokens: Vec<Vec<i64>>,
}

fn prompts(lens: &[usize]) -> Vec<Vec<i64>> {
    lens.iter()
        .enumerate()
        .map(|(i, &l)| mgm_benches::lcg_ids(l, i as u64 + 1, 2048))
        .collect()
}

fn argmax_rows(logits: &Tensor) -> Vec<i64> {
    let v = logits.to_vec::<f32>().expect("f32 logits");
    let vocab = *logits.shape().last().expect("[.., V]");
    v.chunks_exact(vocab).map(mgm_benches::argmax).collect()
}

fn decode_paged(model: &CausalLm, lens: &[usize]) -> Decode {
    let prompts = prompts(lens);
    let blocks: usize = lens.iter().map(|l| (l + NEW_TOKENS).div_ceil(16)).sum();
    let mut cache = model.new_paged_cache(blocks, 16).expect("paged cache");
    let seqs: Vec<_> = prompts.iter().map(|_| cache.add_sequence()).collect();
    let inputs: Vec<_> = seqs
        .iter()
        .zip(&prompts)
        .map(|(&s, p)| (s, p.as_slice()))
        .collect();
    let mut next = argmax_rows(&model.step_paged(&inputs, &mut cache).expect("prefill"));
    let mut tokens = vec![Vec::new(); lens.len()];
    let t0 = std::time::Instant::now();
    for _ in 0..NEW_TOKENS {
        for (t, &n) in tokens.iter_mut().zip(&next) {
            t.push(n);
        }
        let step: Vec<[i64; 1]> = next.iter().map(|&n| [n]).collect();
        let inputs: Vec<_> = seqs.iter().zip(&step).map(|(&s, n)| (s, &n[..])).collect();
        next = argmax_rows(&model.step_paged(&inputs, &mut cache).expect("decode"));
    }
    Decode {
        tok_s: (lens.len() * NEW_TOKENS) as f64 / t0.elapsed().as_secs_f64(),
        kv_bytes: cache.used_bytes(),
        tokens,
    }
}

fn decode_contiguous(model: &CausalLm, lens: &[usize]) -> Decode {
    let prompts = prompts(lens);
    let (b, t) = (lens.len(), *lens.iter().max().expect("lengths"));
    let mut ids = vec![0i64; b * t];
    let mut mask = vec![0i64; b * t];
    for (r, p) in prompts.iter().enumerate() {
        ids[r * t + t - p.len()..(r + 1) * t].copy_from_slice(p);
        mask[r * t + t - p.len()..(r + 1) * t].fill(1);
    }
    let mut cache = model.new_cache(b, t + NEW_TOKENS).expect("cache");
    let logits = model
        .step_keep(
            &Tensor::from_vec(ids, &[b, t]).expect("ids"),
            &Positions::from_mask(&mask, b, t),
            &mut cache,
            1,
        )
        .expect("prefill");
    let mut next = argmax_rows(&logits);
    let mut tokens = vec![Vec::new(); b];
    let t0 = std::time::Instant::now();
    for i in 0..NEW_TOKENS {
        for (tk, &n) in tokens.iter_mut().zip(&next) {
            tk.push(n);
        }
        let pos = Positions {
            ids: lens.iter().map(|l| l + i).collect(),
            valid: vec![true; b],
        };
        let x = Tensor::from_vec(next.clone(), &[b, 1]).expect("ids");
        next = argmax_rows(&model.step(&x, &pos, &mut cache).expect("decode"));
    }
    Decode {
        tok_s: (b * NEW_TOKENS) as f64 / t0.elapsed().as_secs_f64(),
        kv_bytes: cache.bytes(),
        tokens,
    }
}

fn bench(c: &mut Criterion) {
    let pool = CachingAlloc::new();
    let mut g = c.benchmark_group("umm_alloc");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(2));
    g.bench_function("pool", |b| b.iter(|| with(&pool, true)));
    g.bench_function("system", |b| b.iter(|| with(&System, true)));
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    mgm_benches::table_then_criterion(table, benches);
}
