//! `mgm generate --image` on the committed tiny LLaVA (examples/tiny-llava, the README's former main
//! command): the greedy ids transformers' `generate` gives for the same PNG and prompt, and
//! one-line errors for an unreadable image, a marker/image count mismatch, an image over the
//! pixel limit and an image given to a text-only model.

mod common;

use std::path::PathBuf;

use common::{assert_one_error_line, fixture, mgm};
use mgm_tensor::DType;

/// `mgm generate ARGS --print-ids`, which must succeed: the printed ids.
fn generated_ids(args: &[&str]) -> Vec<i64> {
    let mut all = vec!["generate"];
    all.extend_from_slice(args);
    all.push("--print-ids");
    let out = mgm(&all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect()
}

fn example(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(rel)
}

#[test]
fn llava_generate_prints_the_ids_transformers_generates_from_a_png() {
    let model = example("tiny-llava");
    let image = example("images/shapes.png");
    let g = mgm_tensor::safetensors::load(model.join("generate.safetensors")).unwrap();
    let prompt = g["input_ids"].shape()[1];
    let want: Vec<i64> = g["output_ids"]
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec()
        .unwrap();
    let got = generated_ids(&[
        "--model",
        model.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        "<image>\nWhat colour is the square?",
        "--max-new-tokens",
        "8",
    ]);
    assert_eq!(got, want[prompt..]);
    // without a marker the image goes in front, as MGM's CLI does: the same prompt
    let again = generated_ids(&[
        "--model",
        model.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        "What colour is the square?",
        "--max-new-tokens",
        "8",
    ]);
    assert_eq!(again, got);
}

#[test]
fn bad_images_and_prompts_are_one_error_line() {
    let model = example("tiny-llava");
    let m = model.to_str().unwrap();
    let image = example("images/shapes.png");
    let img = image.to_str().unwrap();
    let not_an_image = model.join("config.json");
    assert_one_error_line(
        &mgm(&[
            "generate",
            "--model",
            m,
            "--image",
            not_an_image.to_str().unwrap(),
            "--prompt",
            "hi",
        ]),
        &["config.json"],
    );
    assert_one_error_line(
        &mgm(&[
            "generate",
            "--model",
            m,
            "--image",
            "/nonexistent/x.png",
            "--prompt",
            "hi",
        ]),
        &["/nonexistent/x.png"],
    );
    assert_one_error_line(
        &mgm(&[
            "generate",
            "--model",
            m,
            "--image",
            img,
            "--prompt",
            "<image> and <image>",
        ]),
        &["2 <image> marker(s) for 1 image(s)"],
    );
    assert_one_error_line(
        &mgm(&[
            "generate",
            "--model",
            m,
            "--image",
            img,
            "--prompt",
            "hi",
            "--max-image-pixels",
            "1000",
        ]),
        &["shapes.png", "64 x 48", "limit of 1000"],
    );
    let lm = fixture("llm_llama_trained");
    assert_one_error_line(
        &mgm(&[
            "generate",
            "--model",
            lm.to_str().unwrap(),
            "--image",
            img,
            "--input-ids",
            "5",
        ]),
        &["--image needs a vision-language model", "LlamaForCausalLM"],
    );
}

/// The committed tiny MGM (examples/tiny-mgm) against the independent PyTorch MGM of
/// gen_mgm.py: the PNG padded to a square and preprocessed at image_size_aux, the low-res view
/// derived, -200 spliced, the vicuna_v1 template; greedy ids identical.
#[test]
fn mgm_generate_prints_the_reference_ids_from_a_png() {
    let model = example("tiny-mgm");
    let image = example("images/shapes.png");
    let g = mgm_tensor::safetensors::load(model.join("generate.safetensors")).unwrap();
    let want: Vec<i64> = g["output_ids"]
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec()
        .unwrap();
    let m = model.to_str().unwrap();
    let img = image.to_str().unwrap();
    let got = generated_ids(&[
        "--model",
        m,
        "--image",
        img,
        "--prompt",
        "What colour is the square?",
        "--template",
        "vicuna_v1",
        "--max-new-tokens",
        "8",
    ]);
    assert_eq!(got, want);
    assert_one_error_line(
        &mgm(&[
            "generate",
            "--model",
            m,
            "--image",
            img,
            "--prompt",
            "hi",
            "--template",
            "chatml",
        ]),
        &["--template", "chatml", "vicuna_v1, gemma, llama_3"],
    );
    assert_one_error_line(
        &mgm(&[
            "generate",
            "--model",
            m,
            "--image",
            img,
            "--image",
            img,
            "--prompt",
            "<image> only one",
        ]),
        &["1 <image> marker(s) for 2 image(s)"],
    );
}
