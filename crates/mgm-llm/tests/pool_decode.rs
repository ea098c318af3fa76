//! With mgm-umm's caching allocator installed as the global allocator, every buffer the model
//! and mgm-tensor allocate goes through it, and steady-state decoding (a second request of the
//! same shape: prefill, then 20 tokens) is served from the cache without asking the system for
//! memory once. It runs on one worker thread: with several, how many blocks of a class are
//! live at once depends on scheduling, so a steady state exists only in distribution. (One
//! test in this binary, so no other test allocates meanwhile.)

use mgm_llm::{CausalLm, DecoderConfig, Positions};
use mgm_tensor::Tensor;
use mgm_umm::pool::CachingAlloc;

#[global_allocator]
static ALLOC: CachingAlloc = CachingAlloc::new();

#[test]
fn a_steady_state_decode_loop_allocates_nothing_new() {
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    one.install(steady_state);
}

fn steady_state() {
    let cfg = DecoderConfig::from_json_str(
        r#"{"model_type": "llama", "vocab_size": 512, "hidden_size": 256,
            "intermediate_size": 640, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 128}"#,
        "test",
    )
    .unwrap();
    let model = CausalLm::random(&cfg, 3).unwrap();
    let request = || {
        let prompt: Vec<i64> = (0..40).map(|i| (i * 37 % 500) as i64).collect();
        let mut cache = model.new_cache(1, 64).unwrap();
        let mut logits = model
            .step(
                &Tensor::from_vec(prompt, &[1, 40]).unwrap(),
                &Positions::contiguous(1, 40, 0),
                &mut cache,
            )
            .unwrap();
        let mut out = Vec::new();
        for i in 0..20 {
            let v = logits.to_vec::<f32>().unwrap();
            let last = &v[v.len() - 512..];
            let next = (0..512)
                .max_by(|&a, &b| last[a].total_cmp(&last[b]))
                .unwrap() as i64;
            out.push(next);
            let x = Tensor::from_vec(vec![next], &[1, 1]).unwrap();
            logits = model
                .step(&x, &Positions::contiguous(1, 1, 40 + i), &mut cache)
                .unwrap();
        }
        out
    };
    // the first requests meet every buffer size once (those proportional to the length grow
    // into new size classes as it decodes, and each worker thread's scratch space is made on
    // its first use); later requests of the same shapes are steady state
    let first = request();
    for _ in 0..2 {
        assert_eq!(request(), first);
    }
    let warm = ALLOC.stats();
    for _ in 0..3 {
        assert_eq!(request(), first);
    }
    let s = ALLOC.stats();
    assert_eq!(
        s.misses, warm.misses,
        "steady-state requests allocated from the system: {warm:?} -> {s:?}"
    );
    // and they did allocate, from the cache: prefill and 20 steps of buffers each
    assert!(s.hits >= warm.hits + 600, "{warm:?} -> {s:?}");
    assert_eq!(s.reserved, warm.reserved, "the cache grew");
}
