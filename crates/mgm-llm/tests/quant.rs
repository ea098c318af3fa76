//! Weight-only quantization. The realistic model is `llm_llama_trained`, a small LLaMA that
//! gen_llm.py trains on an English-like byte corpus, so its weights have the scale and
//! structure of a trained checkpoint (random N(0, 0.02) weights are not: their logits are
//! near-uniform noise whose relative error says little). On held-out text, q8 logits must be
//! within 1e-2 and q4 within 5e-2 relative Frobenius error of the f32 model's, on the full
//! forward (many rows per product) and on KV-cached decode (one row per product). The
//! quantized layers are really the ones used (format reported, weight bytes shrunk, logits
//! differ from f32), and a saved quantized model loads back to identical logits. The random
//! transformers fixtures (every layer as large as the residual) get a bounded error too.

use std::path::PathBuf;

use mgm_kernels::quant::QuantFormat;
use mgm_llm::{CausalLm, Positions};
use mgm_tensor::Tensor;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn rel_frobenius(a: &[f32], b: &[f32]) -> f64 {
    let (num, den) = a.iter().zip(b).fold((0f64, 0f64), |(n, d), (&x, &y)| {
        (
            n + (f64::from(x) - f64::from(y)).powi(2),
            d + f64::from(y).powi(2),
        )
    });
    (num / den).sqrt()
}

/// Held-out text windows the generator wrote for the trained model.
fn held_out_text() -> Tensor {
    let path = fixture("llm_llama_trained").join("inputs.safetensors");
    mgm_tensor::safetensors::load(path)
        .unwrap()
        .remove("input_ids")
        .unwrap()
}

fn ids(vocab: i64) -> Tensor {
    let v: Vec<i64> = (0..2 * 10).map(|i| (i * 37 + 5) % vocab).collect();
    Tensor::from_vec(v, &[2, 10]).unwrap()
}

/// Logits of a prefill of 4 tokens then single-token decode steps to the end of `ids`.
fn decoded(model: &CausalLm, ids: &Tensor) -> Vec<f32> {
    let (b, t) = (ids.shape()[0], ids.shape()[1]);
    let mut cache = model.new_cache(b, t).unwrap();
    let mut out = vec![
        model
            .step(
                &ids.narrow(1, 0, 4).unwrap(),
                &Positions::contiguous(b, 4, 0),
                &mut cache,
            )
            .unwrap(),
    ];
    for i in 4..t {
        out.push(
            model
                .step(
                    &ids.narrow(1, i, 1).unwrap(),
                    &Positions::contiguous(b, 1, i),
                    &mut cache,
                )
                .unwrap(),
        );
    }
    Tensor::cat(&out, 1).unwrap().to_vec::<f32>().unwrap()
}

/// `(forward, decode)` relative errors of `format` against the f32 model.
fn errors(f32_model: &CausalLm, format: QuantFormat, x: &Tensor) -> (f64, f64, CausalLm) {
    let want = f32_model.forward(x, None).unwrap().to_vec::<f32>().unwrap();
    let want_dec = decoded(f32_model, x);
    let q = f32_model.quantize(format).unwrap();
    let got = q.forward(x, None).unwrap().to_vec::<f32>().unwrap();
    (
        rel_frobenius(&got, &want),
        rel_frobenius(&decoded(&q, x), &want_dec),
        q,
    )
}

#[test]
fn quantized_logits_stay_within_bounds_of_f32_and_use_the_quantized_layers() {
    let model = CausalLm::from_dir(fixture("llm_llama_trained")).unwrap();
    assert_eq!(model.quantization(), None);
    let x = held_out_text();
    // the embedding table stays f32 (a lookup, not a matmul), so the shrink is below 4x / 8x
    for (format, bound, shrink_min) in [(QuantFormat::Q8, 1e-2, 2.8), (QuantFormat::Q4, 5e-2, 4.0)]
    {
        let (fwd, dec, q) = errors(&model, format, &x);
        assert_eq!(q.quantization(), Some(format));
        let shrink = model.weight_bytes() as f64 / q.weight_bytes() as f64;
        eprintln!("{format:?}: forward {fwd:.3e}, decode {dec:.3e}, weights {shrink:.2}x smaller");
        assert!(
            shrink > shrink_min,
            "{format:?}: weights only {shrink:.2}x smaller"
        );
        assert!(
            fwd < bound && fwd > 1e-5,
            "{format:?} forward: relative error {fwd:.3e}"
        );
        assert!(
            dec < bound && dec > 1e-5,
            "{format:?} decode: relative error {dec:.3e}"
        );
    }
}

#[test]
fn fixture_models_quantize_with_bounded_error() {
    // every layer as large as the residual: errors compound over the layers, so these bounds
    // are looser than the realistic model's; they catch a broken kernel (errors of order 1)
    for case in ["llm_llama", "llm_gemma", "llm_mixtral", "llm_mistral"] {
        let model = CausalLm::from_dir(fixture(case)).unwrap();
        let x = ids(128);
        for (format, bound) in [(QuantFormat::Q8, 5e-2), (QuantFormat::Q4, 5e-1)] {
            let (fwd, dec, q) = errors(&model, format, &x);
            assert_eq!(q.quantization(), Some(format), "{case}");
            assert!(
                fwd < bound && dec < bound,
                "{case} {format:?}: {fwd:.3e} / {dec:.3e}"
            );
        }
    }
}

#[test]
fn saved_quantized_model_loads_back_identically() {
    let dir = tempfile::tempdir().unwrap();
    let model = CausalLm::from_dir(fixture("llm_gemma")).unwrap();
    for format in [QuantFormat::Q8, QuantFormat::Q4] {
        let q = model.quantize(format).unwrap();
        let path = dir.path().join(format.name());
        q.save(&path).unwrap();
        let back = CausalLm::from_dir(&path).unwrap();
        assert_eq!(back.quantization(), Some(format));
        assert_eq!(back.weight_bytes(), q.weight_bytes());
        let x = ids(128);
        assert_eq!(
            back.forward(&x, None).unwrap().to_vec::<f32>().unwrap(),
            q.forward(&x, None).unwrap().to_vec::<f32>().unwrap()
        );
        assert_eq!(decoded(&back, &x), decoded(&q, &x));
    }
}
