//! The ConvNeXt tower against the fixtures of tests/reference/gen_vision.py: transformers'
//! `ConvNextModel` (convnext_hf, convnext_hf_deep) and timm's ConvNeXt under OpenCLIP names
//! (convnext_timm, convnext_timm_nonorm). Every output within 1e-4 in f32 and 1e-2 relative
//! (Frobenius) in bf16; MGM's feature pyramid against an f64 plain-loop bilinear resize of the
//! fixtures' stage outputs; both weight spellings with their prefixes; errors that name the
//! tensor, the file and the key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mgm_tensor::nn::VarStore;
use mgm_tensor::{DType, Device, Tensor};
use mgm_vision::convnext::{
    ConvNextConfig, ConvNextModel, ConvNextNaming, ConvNextOutput, feature_pyramid_from_stages,
};

const CASES: [&str; 4] = [
    "convnext_hf",
    "convnext_hf_deep",
    "convnext_timm",
    "convnext_timm_nonorm",
];

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(case)
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    mgm_tensor::safetensors::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn pixel_values(case: &str) -> Tensor {
    load(&fixture(case).join("inputs.safetensors"))
        .remove("pixel_values")
        .expect("inputs hold pixel_values")
}

fn expected(case: &str) -> HashMap<String, Tensor> {
    load(&fixture(case).join("expected.safetensors"))
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().to_vec::<f64>().unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape());
    f64s(a)
        .iter()
        .zip(f64s(b))
        .map(|(x, y)| {
            let d = (x - y).abs();
            if d.is_nan() { f64::INFINITY } else { d }
        })
        .fold(0.0, f64::max)
}

fn rel_frobenius(a: &Tensor, r: &Tensor) -> f64 {
    let (a, r) = (f64s(a), f64s(r));
    let num: f64 = a.iter().zip(&r).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = r.iter().map(|y| y * y).sum();
    let e = (num / den).sqrt();
    if e.is_nan() { f64::INFINITY } else { e }
}

/// The model's outputs by the fixture's names (no `pooler_output` when the model has none).
fn outputs(out: &ConvNextOutput) -> HashMap<String, Tensor> {
    let mut m = HashMap::new();
    m.insert(
        "last_hidden_state".to_string(),
        out.last_hidden_state.clone(),
    );
    if let Some(p) = &out.pooler_output {
        m.insert("pooler_output".to_string(), p.clone());
    }
    for (i, h) in out.hidden_states.iter().enumerate() {
        m.insert(format!("hidden_states.{i}"), h.clone());
    }
    m
}

/// Checks that the outputs are exactly the expected names and runs `check` on each pair.
fn compare(
    case: &str,
    got: &HashMap<String, Tensor>,
    want: &HashMap<String, Tensor>,
    check: impl Fn(&str, &Tensor, &Tensor),
) {
    let mut g: Vec<_> = got.keys().collect();
    let mut w: Vec<_> = want.keys().collect();
    g.sort();
    w.sort();
    assert_eq!(g, w, "{case}: output names");
    for (name, e) in want {
        let o = &got[name];
        assert_eq!(o.shape(), e.shape(), "{case}: {name} shape");
        check(name, o, e);
    }
}

#[test]
fn convnext_fixtures_match_reference_in_f32() {
    for case in CASES {
        let model = ConvNextModel::load_dir(fixture(case), DType::F32).unwrap();
        let out = model.forward(&pixel_values(case)).unwrap();
        assert_eq!(out.hidden_states.len(), model.config().num_stages() + 1);
        let worst = std::cell::Cell::new(0f64);
        compare(case, &outputs(&out), &expected(case), |name, o, e| {
            assert_eq!(o.dtype(), DType::F32, "{case}: {name}");
            let d = max_abs_diff(o, e);
            worst.set(worst.get().max(d));
            assert!(d <= 1e-4, "{case}: {name} max abs diff {d:.3e}");
        });
        eprintln!("{case} f32: worst max abs diff {:.3e}", worst.get());
    }
}

#[test]
fn convnext_fixtures_match_reference_in_bf16() {
    for case in CASES {
        let model = ConvNextModel::load_dir(fixture(case), DType::BF16).unwrap();
        assert_eq!(model.dtype(), DType::BF16);
        let out = model.forward(&pixel_values(case)).unwrap();
        let worst = std::cell::Cell::new(0f64);
        compare(case, &outputs(&out), &expected(case), |name, o, e| {
            assert_eq!(o.dtype(), DType::BF16, "{case}: {name}");
            let r = rel_frobenius(o, e);
            worst.set(worst.get().max(r));
            assert!(r <= 1e-2, "{case}: {name} relative error {r:.3e}");
        });
        eprintln!("{case} bf16: worst relative error {:.3e}", worst.get());
    }
}

#[test]
fn naming_is_detected_per_fixture() {
    let naming = |case| {
        ConvNextModel::load_dir(fixture(case), DType::F32)
            .unwrap()
            .naming()
            .clone()
    };
    let hf = ConvNextNaming::HuggingFace {
        prefix: String::new(),
    };
    let timm = ConvNextNaming::Timm {
        prefix: "visual.trunk.".to_string(),
    };
    assert_eq!(naming("convnext_hf"), hf);
    assert_eq!(naming("convnext_hf_deep"), hf);
    assert_eq!(naming("convnext_timm"), timm);
    assert_eq!(naming("convnext_timm_nonorm"), timm);
}

/// The fixture's tensors with `strip` removed from and `add` put before every name.
fn renamed(case: &str, strip: &str, add: &str) -> VarStore {
    let t = load(&fixture(case).join("model.safetensors"))
        .into_iter()
        .map(|(k, v)| {
            let base = k.strip_prefix(strip).expect("every name has the prefix");
            (format!("{add}{base}"), v)
        })
        .collect();
    VarStore::from_tensors(t).unwrap()
}

#[test]
fn every_prefix_spelling_loads_the_same_network() {
    let spellings = [
        ("convnext_hf", "", "convnext.", "HuggingFace"),
        ("convnext_timm", "visual.trunk.", "trunk.", "Timm"),
        ("convnext_timm", "visual.trunk.", "", "Timm"),
    ];
    for (case, strip, add, kind) in spellings {
        let config = ConvNextConfig::from_file(fixture(case).join("config.json")).unwrap();
        let vs = renamed(case, strip, add);
        let model = ConvNextModel::load(&vs, &config, DType::F32).unwrap();
        assert!(format!("{:?}", model.naming()).starts_with(kind));
        let out = model.forward(&pixel_values(case)).unwrap();
        compare(case, &outputs(&out), &expected(case), |name, o, e| {
            let d = max_abs_diff(o, e);
            assert!(d <= 1e-4, "{case} as {add:?}: {name} max abs diff {d:.3e}");
        });
    }
    // a handle pp'd to the tower's root reads the unprefixed names under it
    let vs = renamed("convnext_timm", "visual.trunk.", "model.vision_tower_aux.");
    let config = ConvNextConfig::from_file(fixture("convnext_timm").join("config.json")).unwrap();
    let model = ConvNextModel::load(&vs.pp("model.vision_tower_aux"), &config, DType::F32).unwrap();
    let out = model.forward(&pixel_values("convnext_timm")).unwrap();
    let d = max_abs_diff(
        &out.last_hidden_state,
        &expected("convnext_timm")["last_hidden_state"],
    );
    assert!(d <= 1e-4, "pp'd store: {d:.3e}");
}

#[test]
fn config_from_weights_matches_config_json() {
    for case in CASES {
        let json = ConvNextConfig::from_file(fixture(case).join("config.json")).unwrap();
        let vs = VarStore::from_safetensors(&[fixture(case).join("model.safetensors")]).unwrap();
        let inferred = ConvNextConfig::from_weights(&vs).unwrap();
        assert_eq!(inferred.hidden_sizes, json.hidden_sizes, "{case}");
        assert_eq!(inferred.depths, json.depths, "{case}");
        assert_eq!(inferred.patch_size, json.patch_size, "{case}");
        assert_eq!(inferred.num_channels, json.num_channels, "{case}");
        assert!(
            inferred.layer_scale_init_value > 0.0,
            "{case}: blocks have gamma"
        );
    }
}

/// PyTorch's bilinear source taps for `align_corners=False` (output size given), in f64:
/// `src = max((dst + 0.5) * in / out - 0.5, 0)`, taps `floor(src)` and the next (clamped).
fn taps(input: usize, output: usize, dst: usize) -> (usize, usize, f64) {
    let src = ((dst as f64 + 0.5) * input as f64 / output as f64 - 0.5).max(0.0);
    let i0 = (src.floor() as usize).min(input - 1);
    let i1 = (i0 + 1).min(input - 1);
    (i0, i1, src - i0 as f64)
}

/// MGM's pyramid by plain loops: each `[B, C, H, W]` stage bilinearly resized to the first
/// stage's grid, concatenated on channels, as `[B, sum C, H0, W0]` values.
fn pyramid_reference(stages: &[Tensor]) -> (Vec<usize>, Vec<f64>) {
    let s0 = stages[0].shape();
    let (b, h0, w0) = (s0[0], s0[2], s0[3]);
    let total: usize = stages.iter().map(|t| t.shape()[1]).sum();
    let mut out = vec![0f64; b * total * h0 * w0];
    let mut off = 0;
    for t in stages {
        let (c, h, w) = (t.shape()[1], t.shape()[2], t.shape()[3]);
        let v = f64s(t);
        for bb in 0..b {
            for ch in 0..c {
                let plane = &v[(bb * c + ch) * h * w..][..h * w];
                for y in 0..h0 {
                    let (y0, y1, ly) = taps(h, h0, y);
                    for x in 0..w0 {
                        let (x0, x1, lx) = taps(w, w0, x);
                        let top = plane[y0 * w + x0] * (1.0 - lx) + plane[y0 * w + x1] * lx;
                        let bot = plane[y1 * w + x0] * (1.0 - lx) + plane[y1 * w + x1] * lx;
                        out[((bb * total + off + ch) * h0 + y) * w0 + x] =
                            top * (1.0 - ly) + bot * ly;
                    }
                }
            }
        }
        off += c;
    }
    (vec![b, total, h0, w0], out)
}

#[test]
fn feature_pyramid_matches_plain_loop_resize_of_fixture_stages() {
    for case in CASES {
        let want = expected(case);
        let stages: Vec<Tensor> = (1..=4)
            .map(|i| want[&format!("hidden_states.{i}")].clone())
            .collect();
        let (shape, reference) = pyramid_reference(&stages);
        let reference = Tensor::from_vec(reference, &shape).unwrap();
        // resize + concat alone, from the fixture's own stage outputs
        let got = feature_pyramid_from_stages(&stages).unwrap();
        assert_eq!(got.shape(), &shape[..], "{case}");
        let d = max_abs_diff(&got, &reference);
        assert!(
            d <= 1e-5,
            "{case}: pyramid of the fixture stages, max abs diff {d:.3e}"
        );
        // the whole path from pixels
        let model = ConvNextModel::load_dir(fixture(case), DType::F32).unwrap();
        let got = model.feature_pyramid(&pixel_values(case)).unwrap();
        let d = max_abs_diff(&got, &reference);
        assert!(
            d <= 1e-4,
            "{case}: pyramid from pixels, max abs diff {d:.3e}"
        );
        // channels-last storage: the permuted view is contiguous (what patch mining reads)
        assert!(got.permute(&[0, 2, 3, 1]).unwrap().is_contiguous());
        let sum: usize = model.config().hidden_sizes.iter().sum();
        assert_eq!(shape[1], sum);
    }
}

#[test]
fn feature_pyramid_in_bf16_is_bf16_and_close() {
    let case = "convnext_timm";
    let model = ConvNextModel::load_dir(fixture(case), DType::BF16).unwrap();
    let got = model.feature_pyramid(&pixel_values(case)).unwrap();
    assert_eq!(got.dtype(), DType::BF16);
    let want = expected(case);
    let stages: Vec<Tensor> = (1..=4)
        .map(|i| want[&format!("hidden_states.{i}")].clone())
        .collect();
    let (shape, reference) = pyramid_reference(&stages);
    let reference = Tensor::from_vec(reference, &shape).unwrap();
    let r = rel_frobenius(&got, &reference);
    assert!(r <= 1e-2, "bf16 pyramid relative error {r:.3e}");
}

/// A copy of a fixture directory in a temp dir, with `edit` applied to the weights and
/// `config` (when given) as config.json.
fn edited_fixture(
    case: &str,
    edit: impl FnOnce(&mut HashMap<String, Tensor>),
    config: Option<String>,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut weights = load(&fixture(case).join("model.safetensors"));
    edit(&mut weights);
    mgm_tensor::safetensors::save(
        dir.path().join("model.safetensors"),
        weights.iter().map(|(k, v)| (k.as_str(), v)),
    )
    .unwrap();
    let text = config
        .unwrap_or_else(|| std::fs::read_to_string(fixture(case).join("config.json")).unwrap());
    std::fs::write(dir.path().join("config.json"), text).unwrap();
    dir
}

#[test]
fn missing_weight_is_an_error_naming_the_tensor_and_file() {
    for (case, name) in [
        ("convnext_hf", "encoder.stages.2.layers.1.pwconv2.weight"),
        ("convnext_hf", "layernorm.weight"),
        (
            "convnext_hf_deep",
            "encoder.stages.1.downsampling_layer.0.bias",
        ),
        (
            "convnext_timm",
            "visual.trunk.stages.3.blocks.0.conv_dw.weight",
        ),
        ("convnext_timm", "visual.trunk.stem.1.weight"),
    ] {
        let dir = edited_fixture(
            case,
            |w| {
                w.remove(name).expect("the fixture has the tensor");
            },
            None,
        );
        let err = ConvNextModel::load_dir(dir.path(), DType::F32)
            .expect_err("a weight is missing")
            .to_string();
        assert!(
            err.contains(name),
            "{case}: error does not name {name}: {err}"
        );
        assert!(
            err.contains("model.safetensors"),
            "{case}: error does not name the file: {err}"
        );
    }
}

#[test]
fn truncated_checkpoint_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("convnext_hf").join("model.safetensors")).unwrap();
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::copy(
        fixture("convnext_hf").join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let err = ConvNextModel::load_dir(dir.path(), DType::F32)
        .expect_err("the file is cut in half")
        .to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
}

#[test]
fn weight_of_the_wrong_shape_is_an_error_naming_it() {
    let name = "encoder.stages.1.layers.0.dwconv.weight";
    let dir = edited_fixture(
        "convnext_hf",
        |w| {
            let t = Tensor::zeros(&[16, 1, 5, 5], DType::F32, Device::Cpu).unwrap();
            w.insert(name.to_string(), t);
        },
        None,
    );
    let err = ConvNextModel::load_dir(dir.path(), DType::F32)
        .expect_err("a 5x5 depthwise kernel")
        .to_string();
    assert!(err.contains(name), "{err}");
}

#[test]
fn config_missing_a_required_key_is_an_error_naming_key_and_file() {
    let text = std::fs::read_to_string(fixture("convnext_hf").join("config.json")).unwrap();
    for key in ["depths", "hidden_sizes"] {
        let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json.as_object_mut().unwrap().remove(key);
        let dir = edited_fixture("convnext_hf", |_| {}, Some(json.to_string()));
        let err = ConvNextModel::load_dir(dir.path(), DType::F32)
            .expect_err("a required key is missing")
            .to_string();
        assert!(err.contains(key), "error does not name {key}: {err}");
        assert!(
            err.contains("config.json"),
            "error does not name the file: {err}"
        );
    }
}

#[test]
fn bad_config_values_are_errors_naming_the_key() {
    let base = r#""hidden_sizes": [8, 16], "depths": [1, 1]"#;
    for (extra, key) in [
        (r#", "hidden_act": "mish""#, "hidden_act"),
        (r#", "patch_size": 0"#, "patch_size"),
    ] {
        let err = ConvNextConfig::from_json_str(&format!("{{{base}{extra}}}"), "cfg.json")
            .expect_err("bad value")
            .to_string();
        assert!(err.contains(key) && err.contains("cfg.json"), "{err}");
    }
    let err = ConvNextConfig::from_json_str(r#"{"hidden_sizes": [8, 16], "depths": [1]}"#, "c")
        .expect_err("lengths differ")
        .to_string();
    assert!(err.contains("depths"), "{err}");
    let c = ConvNextConfig::from_json_str(&format!("{{{base}}}"), "c").unwrap();
    assert_eq!(
        (c.num_channels, c.patch_size, c.hidden_act.as_str()),
        (3, 4, "gelu")
    );
    assert_eq!(c.layer_norm_eps, 1e-12);
}

#[test]
fn forward_rejects_inputs_it_cannot_take() {
    let model = ConvNextModel::load_dir(fixture("convnext_hf"), DType::F32).unwrap();
    let bad = [
        Tensor::zeros(&[3, 32, 32], DType::F32, Device::Cpu).unwrap(),
        Tensor::zeros(&[1, 4, 32, 32], DType::F32, Device::Cpu).unwrap(),
        Tensor::zeros(&[1, 3, 3, 32], DType::F32, Device::Cpu).unwrap(),
        // the stem gives 2x2, stage 2 would downsample 1x1
        Tensor::zeros(&[1, 3, 8, 8], DType::F32, Device::Cpu).unwrap(),
        Tensor::zeros(&[1, 3, 32, 32], DType::I64, Device::Cpu).unwrap(),
    ];
    for x in bad {
        let err = model.forward(&x).expect_err("bad input").to_string();
        assert!(err.contains("ConvNextModel::forward"), "{err}");
    }
}

#[test]
fn odd_image_sizes_floor_like_pytorch() {
    // 37 px: stem 9, then 4, 2, 1 (convolutions floor); the result is finite and shaped so
    let model = ConvNextModel::load_dir(fixture("convnext_hf"), DType::F32).unwrap();
    let x = Tensor::randn(7, &[1, 3, 37, 37], 0.0, 1.0, DType::F32, Device::Cpu).unwrap();
    let out = model.forward(&x).unwrap();
    let sides: Vec<usize> = out.hidden_states.iter().map(|h| h.shape()[2]).collect();
    assert_eq!(sides, [9, 9, 4, 2, 1]);
    assert!(f64s(&out.last_hidden_state).iter().all(|v| v.is_finite()));
}

#[test]
fn batch_rows_match_single_image_runs() {
    // convnext_hf's inputs hold two images: each row of the batched run equals its own run
    let case = "convnext_hf";
    let model = ConvNextModel::load_dir(fixture(case), DType::F32).unwrap();
    let px = pixel_values(case);
    let both = model.forward(&px).unwrap();
    for i in 0..px.shape()[0] {
        let one = model.forward(&px.narrow(0, i, 1).unwrap()).unwrap();
        for (a, b) in both.hidden_states.iter().zip(&one.hidden_states) {
            let d = max_abs_diff(&a.narrow(0, i, 1).unwrap(), b);
            // only gemm's blocking differs (band sizes depend on the batch)
            assert!(d <= 1e-5, "image {i}: {d:.3e}");
        }
    }
}

#[test]
fn empty_batch_gives_empty_outputs() {
    let model = ConvNextModel::load_dir(fixture("convnext_timm"), DType::F32).unwrap();
    let x = Tensor::zeros(&[0, 3, 64, 64], DType::F32, Device::Cpu).unwrap();
    let out = model.forward(&x).unwrap();
    assert_eq!(out.last_hidden_state.shape(), &[0, 32, 2, 2]);
    assert_eq!(out.pooler_output.unwrap().shape(), &[0, 32]);
    let pyramid = model.feature_pyramid(&x).unwrap();
    assert_eq!(pyramid.shape(), &[0, 80, 16, 16]);
}

#[test]
fn trainable_store_builds_a_random_model_with_transformers_names() {
    // benchmarks build ConvNeXt-L this way; here a small one
    let config = ConvNextConfig::from_json_str(
        r#"{"hidden_sizes": [16, 32, 48, 64], "depths": [1, 1, 2, 1]}"#,
        "inline",
    )
    .unwrap();
    let vs = VarStore::new_trainable(5);
    let model = ConvNextModel::load(&vs, &config, DType::F32).unwrap();
    assert_eq!(
        model.naming(),
        &ConvNextNaming::HuggingFace {
            prefix: String::new()
        }
    );
    let names: Vec<String> = vs.all_vars().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"encoder.stages.2.layers.1.pwconv2.weight".to_string()));
    assert!(names.contains(&"layernorm.weight".to_string()));
    let x = Tensor::randn(1, &[2, 3, 64, 64], 0.0, 1.0, DType::F32, Device::Cpu).unwrap();
    let out = model.forward(&x).unwrap();
    assert_eq!(out.last_hidden_state.shape(), &[2, 64, 2, 2]);
    assert!(
        f64s(&out.pooler_output.unwrap())
            .iter()
            .all(|v| v.is_finite())
    );
}

/// OpenCLIP's pickle download loads (through the restricted unpickler) to the same network as
/// the safetensors copy of the same weights: identical multi-stage features.
#[test]
fn openclip_pickle_tower_matches_its_safetensors_copy() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let bin = ConvNextModel::load_dir(root.join("convnext_openclip_bin"), DType::F32).unwrap();
    let st = ConvNextModel::load_dir(root.join("mgm_llama/convnext"), DType::F32).unwrap();
    assert_eq!(bin.config(), st.config());
    let x = Tensor::randn(3, &[1, 3, 32, 32], 0.0, 1.0, DType::F32, Device::Cpu).unwrap();
    let (a, b) = (
        bin.feature_pyramid(&x).unwrap(),
        st.feature_pyramid(&x).unwrap(),
    );
    assert_eq!(a.shape(), &[1, 80, 8, 8]);
    assert_eq!(a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
}

/// The autograd tower on the fixtures' weights: every stage output within 1e-4 of the
/// reference, and a gradient that reaches the stem (checked against a finite difference).
#[test]
fn trainable_convnext_matches_reference_and_backpropagates() {
    use mgm_vision::convnext::TrainableConvNext;
    for case in CASES {
        let dir = fixture(case);
        let vs = VarStore::from_safetensors(&[dir.join("model.safetensors")])
            .unwrap()
            .with_dtype(DType::F32);
        let cfg = ConvNextConfig::from_file(dir.join("config.json")).unwrap();
        let tower = TrainableConvNext::load(&vs, &cfg).unwrap();
        let want = expected(case);
        let outs = tower.stage_outputs(&pixel_values(case)).unwrap();
        for (i, o) in outs.iter().enumerate() {
            let e = &want[&format!("hidden_states.{}", i + 1)];
            let d = max_abs_diff(o, e);
            assert!(d <= 1e-4, "{case}: stage {i} max abs diff {d:.3e}");
        }
    }
    // d/dx of sum(pyramid * c) at one pixel, against a central difference in f64 terms
    let dir = fixture("convnext_hf");
    let vs = VarStore::from_safetensors(&[dir.join("model.safetensors")])
        .unwrap()
        .with_dtype(DType::F32)
        .trainable(0);
    let cfg = ConvNextConfig::from_file(dir.join("config.json")).unwrap();
    let tower = TrainableConvNext::load(&vs, &cfg).unwrap();
    let x = pixel_values("convnext_hf");
    let c = Tensor::randn(5, &[2, 80, 8, 8], 0.0, 1.0, DType::F32, Device::Cpu).unwrap();
    let f = |x: &Tensor| -> f64 {
        let p = mgm_tensor::no_grad(|| tower.feature_pyramid(x)).unwrap();
        p.mul(&c)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar_f64()
            .unwrap()
    };
    let stem = vs
        .all_vars()
        .into_iter()
        .find(|(n, _)| n.ends_with("patch_embeddings.weight"))
        .unwrap()
        .1;
    let loss = tower
        .feature_pyramid(&x)
        .unwrap()
        .mul(&c)
        .unwrap()
        .sum_all()
        .unwrap();
    loss.backward().unwrap();
    let g = stem
        .grad()
        .expect("the stem gets a gradient")
        .to_vec::<f32>()
        .unwrap();
    assert!(g.iter().any(|v| *v != 0.0));
    let mut xv = x.to_vec::<f32>().unwrap();
    let i = 3 * 32 + 5;
    let h = 1e-2f32;
    xv[i] += h;
    let up = f(&Tensor::from_vec(xv.clone(), x.shape()).unwrap());
    xv[i] -= 2.0 * h;
    let down = f(&Tensor::from_vec(xv, x.shape()).unwrap());
    let numeric = (up - down) / (2.0 * f64::from(h));
    let xg = {
        let xt = mgm_tensor::Var::from_tensor(&x).unwrap();
        let l = tower
            .feature_pyramid(&xt.as_tensor())
            .unwrap()
            .mul(&c)
            .unwrap()
            .sum_all()
            .unwrap();
        l.backward().unwrap();
        f64::from(xt.grad().unwrap().to_vec::<f32>().unwrap()[i])
    };
    assert!(
        (xg - numeric).abs() <= 2e-2 * (1.0 + numeric.abs()),
        "input gradient {xg} vs finite difference {numeric}"
    );
}
