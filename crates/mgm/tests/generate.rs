//! `mgm generate`, `mgm quantize` and `mgm forward --quant` as a user runs them, against the
//! transformers fixtures: greedy ids equal to `generate(do_sample=False)`, quantized logits
//! within the bounds of transformers' f32 logits, and one-line errors for bad input.

mod common;

use std::path::Path;
use std::process::Output;

use common::{assert_one_error_line, fixture, mgm};

use mgm_tensor::{DType, Tensor};

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "mgm failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn i64s(t: &Tensor) -> Vec<i64> {
    t.to_dtype(DType::I64).unwrap().to_vec::<i64>().unwrap()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().to_vec::<f64>().unwrap()
}

/// (prompt ids, the 32 greedy ids transformers generated after it).
fn greedy_reference(case: &str) -> (Vec<i64>, Vec<i64>) {
    let g = mgm_tensor::safetensors::load(fixture(case).join("generate.safetensors")).unwrap();
    let prompt = i64s(&g["prompt_ids"]);
    let out = i64s(&g["output_ids"]);
    (prompt.clone(), out[prompt.len()..].to_vec())
}

fn generate_ids(model: &Path, prompt: &[i64], extra: &[&str]) -> Vec<i64> {
    let ids = prompt
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--input-ids",
        &ids,
        "--max-new-tokens",
        "32",
        "--print-ids",
    ];
    args.extend_from_slice(extra);
    ok(mgm(&args))
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect()
}

#[test]
fn greedy_generate_prints_the_ids_transformers_generates() {
    for case in ["llm_llama", "llm_gemma", "llm_mixtral", "llm_llama_trained"] {
        let (prompt, want) = greedy_reference(case);
        assert_eq!(generate_ids(&fixture(case), &prompt, &[]), want, "{case}");
    }
}

fn rel_frobenius(got: &[f64], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den).sqrt()
}

/// Relative error of `mgm forward`'s logits on `model` against transformers' f32 logits.
fn forward_error(model: &Path, extra: &[&str]) -> f64 {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let case = fixture("llm_llama_trained");
    let inputs = case.join("inputs.safetensors");
    let mut args = vec![
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    ok(mgm(&args));
    let got = mgm_tensor::safetensors::load(&out).unwrap();
    let want = mgm_tensor::safetensors::load(case.join("expected.safetensors")).unwrap();
    rel_frobenius(&f64s(&got["logits"]), &f64s(&want["logits"]))
}

#[test]
fn quantized_models_stay_close_to_transformers_at_load_and_after_a_save() {
    let trained = fixture("llm_llama_trained");
    let f32_err = forward_error(&trained, &[]);
    assert!(f32_err < 1e-5, "f32: {f32_err:.3e}");
    let tmp = tempfile::tempdir().unwrap();
    for (quant, bound) in [("q8", 1e-2), ("q4", 5e-2)] {
        let at_load = forward_error(&trained, &["--quant", quant]);
        assert!(at_load < bound && at_load > 1e-4, "{quant}: {at_load:.3e}");
        let dir = tmp.path().join(quant);
        let report = ok(mgm(&[
            "quantize",
            "--model",
            trained.to_str().unwrap(),
            "--quant",
            quant,
            "--output",
            dir.to_str().unwrap(),
        ]));
        assert!(report.contains(quant), "{report}");
        let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
        assert!(config.contains("mgm_quantization"), "{config}");
        // the saved copy holds the same numbers as quantizing at load
        assert_eq!(forward_error(&dir, &[]), at_load, "{quant}");
        assert!(dir.join("generation_config.json").exists());
    }
    // q8's logit error is far below the trained model's greedy margins: the same 32 tokens
    let (prompt, want) = greedy_reference("llm_llama_trained");
    let q8 = tmp.path().join("q8");
    assert_eq!(generate_ids(&q8, &prompt, &[]), want);
    assert_eq!(generate_ids(&trained, &prompt, &["--quant", "q8"]), want);
}

#[test]
fn bad_quant_requests_are_errors() {
    let trained = fixture("llm_llama_trained");
    let t = trained.to_str().unwrap();
    // clap's own message for a bad value (it adds a usage hint below it)
    let out = mgm(&[
        "generate",
        "--model",
        t,
        "--input-ids",
        "65",
        "--quant",
        "q3",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected q8 or q4"));

    let clip = fixture("clip_quick_gelu");
    assert_one_error_line(
        &mgm(&[
            "forward",
            "--model",
            clip.to_str().unwrap(),
            "--quant",
            "q8",
        ]),
        &["--quant q8", "causal LMs", "config.json"],
    );

    let tmp = tempfile::tempdir().unwrap();
    let q8 = tmp.path().join("q8");
    let q8s = q8.to_str().unwrap();
    ok(mgm(&[
        "quantize", "--model", t, "--quant", "q8", "--output", q8s,
    ]));
    assert_one_error_line(
        &mgm(&["quantize", "--model", q8s, "--quant", "q4", "--output", q8s]),
        &["--output", "model directory"],
    );
    let q4 = tmp.path().join("q4");
    assert_one_error_line(
        &mgm(&[
            "quantize",
            "--model",
            q8s,
            "--quant",
            "q4",
            "--output",
            q4.to_str().unwrap(),
        ]),
        &["quantized to q8", "q4"],
    );
    assert_one_error_line(
        &mgm(&[
            "generate",
            "--model",
            q8s,
            "--input-ids",
            "65",
            "--quant",
            "q4",
        ]),
        &["quantized to q8"],
    );
    // no tokenizer in the fixture: --prompt needs one
    assert_one_error_line(
        &mgm(&["generate", "--model", t, "--prompt", "The cat"]),
        &["tokenizer.json"],
    );
}
