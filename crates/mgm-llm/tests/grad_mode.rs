//! A trainable decoder follows the caller's `no_grad`, though its forward pass and decode steps
//! run on a rayon worker: tracked outside `no_grad`, untracked and cache-decodable inside.

use mgm_llm::{CausalLm, DecoderConfig, Positions};
use mgm_tensor::nn::VarStore;
use mgm_tensor::{Tensor, no_grad};

#[test]
fn a_trainable_model_follows_the_callers_no_grad() {
    let cfg = DecoderConfig::from_json_str(
        r#"{"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}"#,
        "test",
    )
    .unwrap();
    let model = CausalLm::load(&VarStore::new_trainable(7), &cfg).unwrap();
    let ids = Tensor::from_vec(vec![3i64, 9, 27, 17, 51], &[1, 5]).unwrap();

    let tracked = model.forward(&ids, None).unwrap();
    assert!(
        tracked.is_tracked(),
        "forward on a trainable model recorded no graph"
    );
    tracked.sum_all().unwrap().backward().unwrap();

    let full = no_grad(|| model.forward(&ids, None)).unwrap();
    assert!(!full.is_tracked(), "forward under no_grad recorded a graph");

    // under no_grad the KV cache accepts the trainable model; its last-position logits are
    // the full forward pass's
    let stepped = no_grad(|| {
        let mut cache = model.new_cache(1, 8)?;
        model.step(&ids, &Positions::contiguous(1, 5, 0), &mut cache)
    })
    .expect("a trainable model decodes under no_grad");
    let (a, b) = (full.to_vec_f64().unwrap(), stepped.to_vec_f64().unwrap());
    assert_eq!(a.len(), b.len());
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-4, "cached and full logits differ by {worst}");
}
