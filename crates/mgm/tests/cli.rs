//! `mgm forward` as a user runs it: outputs that match the fixture, and bad input that exits
//! non-zero with one `error:` line on stderr and writes nothing.

mod common;

use std::path::Path;
use std::process::Output;

use common::{assert_one_error_line, fixture, mgm};

use mgm_tensor::{DType, Device, Tensor};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

#[test]
fn forward_writes_transformers_outputs() {
    let dir = fixture("clip_quick_gelu");
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("out.safetensors");
    let out = mgm(&[
        "forward",
        "--model",
        dir.to_str().unwrap(),
        "--inputs",
        dir.join("inputs.safetensors").to_str().unwrap(),
        "--output",
        out_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = mgm_tensor::safetensors::load(&out_path).unwrap();
    let want = mgm_tensor::safetensors::load(dir.join("expected.safetensors")).unwrap();
    let mut names: Vec<_> = want.keys().collect();
    names.sort();
    let mut got_names: Vec<_> = got.keys().collect();
    got_names.sort();
    assert_eq!(names, got_names, "output names must be transformers'");
    for name in names {
        let (a, b) = (
            got[name].to_vec::<f32>().unwrap(),
            want[name].to_vec::<f32>().unwrap(),
        );
        assert_eq!(got[name].shape(), want[name].shape(), "{name}");
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d <= 1e-4, "{name}: max abs diff {d}");
    }
}

/// Runs `mgm forward` on `case` with one input tensor `name` of `shape`/`dtype` (zeros) and an
/// output path; returns the process output and whether the output file exists afterwards.
fn forward_with_input(case: &str, name: &str, shape: &[usize], dtype: DType) -> (Output, bool) {
    let dir = fixture(case);
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in.safetensors");
    let t = Tensor::zeros(shape, dtype, Device::Cpu).unwrap();
    mgm_tensor::safetensors::save(&inputs, [(name, &t)]).unwrap();
    let out_path = tmp.path().join("out.safetensors");
    let out = mgm(&[
        "forward",
        "--model",
        dir.to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
        "--output",
        out_path.to_str().unwrap(),
    ]);
    let written = out_path.exists();
    (out, written)
}

#[test]
fn missing_input_tensor_is_one_error_line_and_no_output() {
    let (out, written) =
        forward_with_input("clip_quick_gelu", "images", &[1, 3, 30, 30], DType::F32);
    assert_one_error_line(&out, &["pixel_values", "missing"]);
    assert!(!written, "nothing may be written on error");
}

#[test]
fn wrong_rank_input_is_an_error() {
    let (out, written) =
        forward_with_input("convnext_hf", "pixel_values", &[3, 32, 32], DType::F32);
    assert_one_error_line(&out, &["pixel_values", "[3, 32, 32]"]);
    assert!(!written);
}

#[test]
fn image_size_the_model_cannot_take_is_an_error() {
    // clip_quick_gelu has image_size 30 with patch 6; 31 px is neither the trained size nor a
    // multiple of the patch.
    let (out, written) = forward_with_input(
        "clip_quick_gelu",
        "pixel_values",
        &[1, 3, 31, 31],
        DType::F32,
    );
    assert_one_error_line(&out, &["31"]);
    assert!(!written);
}

#[test]
fn wrong_dtype_input_is_an_error() {
    let (out, written) =
        forward_with_input("convnext_hf", "pixel_values", &[1, 3, 32, 32], DType::F16);
    assert_one_error_line(&out, &["pixel_values", "f32"]);
    assert!(!written);
}

#[test]
fn unknown_architecture_lists_the_supported_ones() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        r#"{"architectures": ["WhisperModel"]}"#,
    )
    .unwrap();
    let out = mgm(&["forward", "--model", tmp.path().to_str().unwrap()]);
    assert_one_error_line(&out, &["WhisperModel", "CLIPVisionModel", "ConvNextModel"]);
}

#[test]
fn missing_truncated_weights_and_missing_config_key_name_the_file_or_key() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    copy_dir(&fixture("clip_gelu"), &model);
    let inputs = model.join("inputs.safetensors");
    let args = |m: &Path| {
        vec![
            "forward".to_string(),
            "--model".into(),
            m.display().to_string(),
            "--inputs".into(),
            inputs.display().to_string(),
        ]
    };
    let run = |m: &Path| {
        let a = args(m);
        mgm(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // Truncated weights.
    let w = model.join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    assert_one_error_line(&run(&model), &["model.safetensors"]);
    // Missing weights.
    std::fs::remove_file(&w).unwrap();
    assert_one_error_line(&run(&model), &["model.safetensors"]);
    // Config without a required key.
    std::fs::write(&w, &bytes).unwrap();
    let cfg = model.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&cfg, v.to_string()).unwrap();
    assert_one_error_line(&run(&model), &["hidden_size", "config.json"]);
}

#[test]
fn forward_runs_mgm_with_and_without_the_low_res_input() {
    let dir = fixture("mgm_llama");
    let tmp = tempfile::tempdir().unwrap();
    let expected = mgm_tensor::safetensors::load(dir.join("expected_1.safetensors")).unwrap();
    let inputs = mgm_tensor::safetensors::load(dir.join("inputs_1.safetensors")).unwrap();
    // without pixel_values the low-res input is derived from pixel_values_aux
    let only_aux = tmp.path().join("aux.safetensors");
    mgm_tensor::safetensors::save(
        &only_aux,
        ["input_ids", "pixel_values_aux"]
            .iter()
            .map(|&k| (k, &inputs[k])),
    )
    .unwrap();
    for (inp, key) in [
        (dir.join("inputs_1.safetensors"), "logits"),
        (only_aux.clone(), "logits_derived"),
    ] {
        let out = tmp.path().join("out.safetensors");
        let o = mgm(&[
            "forward",
            "--model",
            dir.to_str().unwrap(),
            "--inputs",
            inp.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got = mgm_tensor::safetensors::load(&out).unwrap()["logits"]
            .to_vec_f64()
            .unwrap();
        let want = expected[key].to_vec_f64().unwrap();
        assert_eq!(got.len(), want.len());
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        assert!(worst <= 1e-4, "{key}: max |diff| {worst}");
    }
    let ids_only = tmp.path().join("ids.safetensors");
    mgm_tensor::safetensors::save(&ids_only, [("input_ids", &inputs["input_ids"])]).unwrap();
    assert_one_error_line(
        &mgm(&[
            "forward",
            "--model",
            dir.to_str().unwrap(),
            "--inputs",
            ids_only.to_str().unwrap(),
        ]),
        &["pixel_values_aux", "missing"],
    );
    assert_one_error_line(
        &mgm(&[
            "forward",
            "--model",
            dir.to_str().unwrap(),
            "--inputs",
            only_aux.to_str().unwrap(),
            "--vision-tower-aux",
            "/nonexistent/convnext",
        ]),
        &["mm_vision_tower_aux", "/nonexistent/convnext"],
    );
}

#[test]
fn convert_writes_the_pickles_tensors_and_refuses_foreign_globals() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("state.safetensors");
    let o = mgm(&[
        "convert",
        "--input",
        fixture("torch_pickle").join("state.bin").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = mgm_tensor::safetensors::load(&out).unwrap();
    let want =
        mgm_tensor::safetensors::load(fixture("torch_pickle").join("state.safetensors")).unwrap();
    assert_eq!(got.len(), want.len());
    for (k, w) in &want {
        assert_eq!(got[k].to_vec_f64().unwrap(), w.to_vec_f64().unwrap(), "{k}");
    }
    let not_zip = fixture("torch_pickle").join("state.safetensors");
    assert_one_error_line(
        &mgm(&[
            "convert",
            "--input",
            not_zip.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]),
        &["state.safetensors", "not a torch.save zip archive"],
    );
}
