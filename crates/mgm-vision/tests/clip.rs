//! The CLIP vision tower against transformers fixtures (tests/fixtures/clip_*, written by
//! tests/reference/gen_vision.py): every output within 1e-4 in f32 and 1e-2 relative in bf16,
//! both weight spellings, position-embedding interpolation, select_layer features, and errors
//! that name the file or the key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mgm_tensor::{DType, Tensor};
use mgm_vision::{ClipForwardOptions, ClipVisionConfig, ClipVisionModel, ClipVisionOutput};

const CASES: [&str; 3] = ["clip_quick_gelu", "clip_gelu", "clip_noprefix"];

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(case)
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    mgm_tensor::safetensors::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().to_vec::<f64>().unwrap()
}

/// Every expected tensor by name, from the model's outputs.
fn outputs(out: &ClipVisionOutput) -> HashMap<String, Tensor> {
    let mut m = HashMap::new();
    m.insert(
        "last_hidden_state".to_string(),
        out.last_hidden_state.clone(),
    );
    m.insert("pooler_output".to_string(), out.pooler_output.clone());
    for (i, h) in out.hidden_states.iter().enumerate() {
        m.insert(format!("hidden_states.{i}"), h.clone());
    }
    m
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape());
    f64s(a)
        .iter()
        .zip(f64s(b))
        .map(|(x, y)| {
            if x.is_nan() {
                f64::INFINITY
            } else {
                (x - y).abs()
            }
        })
        .fold(0.0, f64::max)
}

fn rel_frobenius(a: &Tensor, r: &Tensor) -> f64 {
    let (a, r) = (f64s(a), f64s(r));
    let num: f64 = a.iter().zip(&r).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = r.iter().map(|y| y * y).sum();
    if num.is_nan() {
        return f64::INFINITY;
    }
    (num / den).sqrt()
}

/// Checks every expected tensor; `check` gets (name, got, expected).
fn compare(
    case: &str,
    got: &HashMap<String, Tensor>,
    expected: &HashMap<String, Tensor>,
    check: impl Fn(&str, &Tensor, &Tensor),
) {
    assert_eq!(
        got.len(),
        expected.len(),
        "{case}: outputs {:?} vs expected {:?}",
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (name, want) in expected {
        let have = got
            .get(name)
            .unwrap_or_else(|| panic!("{case}: no output {name}"));
        assert_eq!(have.shape(), want.shape(), "{case}: {name} shape");
        check(name, have, want);
    }
}

#[test]
fn clip_fixtures_match_transformers_in_f32() {
    for case in CASES {
        let dir = fixture(case);
        let model = ClipVisionModel::load_dir(&dir, DType::F32).unwrap();
        let x = &load(&dir.join("inputs.safetensors"))["pixel_values"];
        let out = model.forward(x).unwrap();
        let expected = load(&dir.join("expected.safetensors"));
        compare(case, &outputs(&out), &expected, |name, have, want| {
            let d = max_abs_diff(have, want);
            assert!(d <= 1e-4, "{case}: {name} max abs diff {d:.3e} > 1e-4");
        });
    }
}

#[test]
fn clip_fixtures_match_transformers_in_bf16() {
    for case in CASES {
        let dir = fixture(case);
        let model = ClipVisionModel::load_dir(&dir, DType::BF16).unwrap();
        assert_eq!(model.dtype(), DType::BF16);
        let x = &load(&dir.join("inputs.safetensors"))["pixel_values"];
        let out = model.forward(x).unwrap();
        assert_eq!(out.last_hidden_state.dtype(), DType::BF16);
        let expected = load(&dir.join("expected.safetensors"));
        compare(case, &outputs(&out), &expected, |name, have, want| {
            let e = rel_frobenius(have, want);
            assert!(
                e <= 1e-2,
                "{case}: {name} bf16 relative error {e:.3e} > 1e-2"
            );
        });
    }
}

#[test]
fn clip_interpolated_position_encoding_matches_transformers() {
    let dir = fixture("clip_gelu");
    let model = ClipVisionModel::load_dir(&dir, DType::F32).unwrap();
    let x = &load(&dir.join("inputs_interp.safetensors"))["pixel_values"];
    // without interpolation a non-training size is refused, as in transformers
    let err = model.forward(x).unwrap_err().to_string();
    assert!(err.contains("doesn't match model (32*32)"), "{err}");
    let opts = ClipForwardOptions {
        interpolate_pos_encoding: true,
        output_hidden_states: true,
    };
    let out = model.forward_with(x, opts).unwrap();
    let expected = load(&dir.join("expected_interp.safetensors"));
    compare(
        "clip_gelu interp",
        &outputs(&out),
        &expected,
        |name, have, want| {
            let d = max_abs_diff(have, want);
            assert!(d <= 1e-4, "interp: {name} max abs diff {d:.3e}");
        },
    );
}

#[test]
fn clip_feature_selects_penultimate_patch_tokens() {
    let dir = fixture("clip_gelu");
    let model = ClipVisionModel::load_dir(&dir, DType::F32).unwrap();
    let x = &load(&dir.join("inputs.safetensors"))["pixel_values"];
    let expected = load(&dir.join("expected.safetensors"));
    let layers = model.config().num_hidden_layers;
    // -2 is hidden_states[L - 1]; patch tokens drop the class token
    let want = &expected[&format!("hidden_states.{}", layers - 1)];
    let n = want.shape()[1];
    let patches = model.feature(x, -2, false).unwrap();
    assert_eq!(patches.shape(), &[1, n - 1, 24]);
    let d = max_abs_diff(&patches, &want.narrow(1, 1, n - 1).unwrap());
    assert!(d <= 1e-4, "feature(-2, patch) max abs diff {d:.3e}");
    let with_cls = model.feature(x, 1, true).unwrap();
    let d = max_abs_diff(&with_cls, &expected["hidden_states.1"]);
    assert!(d <= 1e-4, "feature(1, cls) max abs diff {d:.3e}");
    let err = model.feature(x, -5, false).unwrap_err().to_string();
    assert!(
        err.contains("select_layer -5 is out of range for 4"),
        "{err}"
    );
}

/// A copy of a fixture directory to damage.
fn copy_fixture(case: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(case).join(f), tmp.path().join(f)).unwrap();
    }
    tmp
}

#[test]
fn truncated_weights_error_names_the_file() {
    let tmp = copy_fixture("clip_quick_gelu");
    let weights = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = ClipVisionModel::load_dir(tmp.path(), DType::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&weights.display().to_string()), "{err}");
}

#[test]
fn config_missing_key_error_names_file_and_key() {
    let tmp = copy_fixture("clip_quick_gelu");
    let path = tmp.path().join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&path, json.to_string()).unwrap();
    let err = ClipVisionModel::load_dir(tmp.path(), DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&path.display().to_string()) && err.contains("\"hidden_size\""),
        "{err}"
    );
}

#[test]
fn unknown_hidden_act_is_an_error() {
    let text = r#"{"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "image_size": 8, "patch_size": 4, "hidden_act": "mish"}"#;
    let err = ClipVisionConfig::from_json_str(text, "cfg.json")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cfg.json") && err.contains("hidden_act") && err.contains("\"mish\""),
        "{err}"
    );
}

#[test]
fn clip_model_config_with_nested_vision_config_loads() {
    let flat: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("clip_gelu").join("config.json")).unwrap(),
    )
    .unwrap();
    let nested = serde_json::json!({
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "text_config": {"hidden_size": 512},
        "vision_config": flat,
    });
    let c = ClipVisionConfig::from_json_str(&nested.to_string(), "nested.json").unwrap();
    let direct = ClipVisionConfig::from_file(fixture("clip_gelu").join("config.json")).unwrap();
    assert_eq!(c, direct);
    let mut missing = nested.clone();
    missing["vision_config"]
        .as_object_mut()
        .unwrap()
        .remove("patch_size");
    let err = ClipVisionConfig::from_json_str(&missing.to_string(), "nested.json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("vision_config.patch_size"), "{err}");
}

#[test]
fn weights_without_clip_names_are_reported() {
    let config = ClipVisionConfig::from_file(fixture("clip_gelu").join("config.json")).unwrap();
    let mut t = HashMap::new();
    t.insert(
        "other.weight".to_string(),
        Tensor::from_vec(vec![0f32; 4], &[4]).unwrap(),
    );
    let vs = mgm_tensor::nn::VarStore::from_tensors(t).unwrap();
    let err = ClipVisionModel::load(&vs, &config).unwrap_err().to_string();
    assert!(
        err.contains("vision_model.embeddings.patch_embedding.weight")
            && err.contains("nor embeddings.patch_embedding.weight"),
        "{err}"
    );
}

#[test]
fn bad_pixel_values_are_rejected() {
    let model = ClipVisionModel::load_dir(fixture("clip_gelu"), DType::F32).unwrap();
    let x = Tensor::zeros(&[1, 1, 32, 32], DType::F32, mgm_tensor::Device::Cpu).unwrap();
    let err = model.forward(&x).unwrap_err().to_string();
    assert!(err.contains("pixel_values must be [B, 3, H, W]"), "{err}");
    let x = Tensor::zeros(&[1, 3, 32, 32], DType::U8, mgm_tensor::Device::Cpu).unwrap();
    let err = model.forward(&x).unwrap_err().to_string();
    assert!(err.contains("must be float"), "{err}");
}
