//! The vision towers at real sizes against PyTorch eager on the same CPU, measured in the same
//! run: CLIP ViT-L/14-336 (24 layers, width 1024, 577 tokens; MGM's low-resolution tower) and
//! ConvNeXt-L at 768 px (MGM's high-resolution tower), random weights, one image, f32, the same
//! thread count on both sides. The PyTorch side is `benches/peers/vision_torch.py`, run with the
//! reference venv (`cargo xtask reference` creates target/reference-venv).
#![allow(missing_docs)]
#![allow(clippy::print_stdout)] // a bench reports on stdout

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use mgm_benches::{Row, benchmarking, interleaved, report};
use mgm_tensor::nn::VarStore;
use mgm_tensor::{DType, Device, Tensor, no_grad};
use mgm_vision::clip::{Activation, ClipVisionConfig, ClipVisionModel};
use mgm_vision::convnext::{ConvNextConfig, ConvNextModel};

const ROUNDS: usize = 3;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ is one level below the root")
        .to_path_buf()
}

/// PyTorch's best ms per image for `model`, from the peer script.
fn torch_ms(model: &str, threads: usize) -> (f64, String) {
    let py = root().join("target/reference-venv/bin/python");
    assert!(
        py.exists(),
        "the PyTorch peer needs {} (run `cargo xtask reference` once)",
        py.display()
    );
    let out = Command::new(&py)
        .arg(root().join("benches/peers/vision_torch.py"))
        .args(["--model", model, "--threads", &threads.to_string()])
        .args(["--iters", &ROUNDS.to_string(), "--warmup", "1"])
        .output()
        .expect("run the PyTorch peer");
    assert!(
        out.status.success(),
        "PyTorch peer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.lines().last().unwrap_or_default())
        .expect("the peer prints one JSON line");
    (
        v["ms_best"].as_f64().expect("ms_best"),
        v["torch"].as_str().unwrap_or("?").to_string(),
    )
}

fn clip_l336() -> ClipVisionModel {
    let cfg = ClipVisionConfig {
        hidden_size: 1024,
        intermediate_size: 4096,
        num_hidden_layers: 24,
        num_attention_heads: 16,
        num_channels: 3,
        image_size: 336,
        patch_size: 14,
        hidden_act: Activation::QuickGelu,
        layer_norm_eps: 1e-5,
    };
    // Random weights come from a trainable store; the model is then loaded again from those
    // values as a frozen checkpoint, the way a user loads real weights (frozen projections take
    // the inference path: transposed once, bias folded into the gemm).
    let random = VarStore::new_trainable(1);
    ClipVisionModel::load(&random, &cfg).expect("random CLIP ViT-L/14-336");
    let frozen: HashMap<String, Tensor> = random
        .all_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().detach()))
        .collect();
    let vs = VarStore::from_tensors(frozen).expect("frozen store");
    ClipVisionModel::load(&vs, &cfg).expect("CLIP ViT-L/14-336 from random weights")
}

fn convnext_l() -> ConvNextModel {
    let cfg = ConvNextConfig {
        num_channels: 3,
        patch_size: 4,
        hidden_sizes: vec![192, 384, 768, 1536],
        depths: vec![3, 3, 27, 3],
        layer_norm_eps: 1e-6,
        hidden_act: "gelu".into(),
        layer_scale_init_value: 1e-6,
    };
    ConvNextModel::load(&VarStore::new_trainable(2), &cfg, DType::F32).expect("random ConvNeXt-L")
}

fn image(size: usize) -> Tensor {
    Tensor::randn(7, &[1, 3, size, size], 0.0, 1.0, DType::F32, Device::Cpu).expect("randn")
}

fn main() {
    if !benchmarking() {
        return;
    }
    let threads = rayon::current_num_threads();
    let mut rows = Vec::new();
    let torch_version;
    {
        let model = clip_l336();
        let x = image(336);
        let t = interleaved(
            ROUNDS,
            &mut [&mut || no_grad(|| model.forward(&x).expect("clip"))],
        );
        let (ms, v) = torch_ms("clip", threads);
        torch_version = v;
        rows.push(Row::new(
            &format!(
                "clip vit-l/14-336 1 image (mgm {:.0} ms, torch {ms:.0} ms)",
                t[0].best * 1e3
            ),
            "images/min",
            60.0 / t[0].best,
            60e3 / ms,
            "torch eager",
        ));
    }
    {
        let model = convnext_l();
        let x = image(768);
        let t = interleaved(
            ROUNDS,
            &mut [&mut || no_grad(|| model.forward(&x).expect("convnext"))],
        );
        let (ms, _) = torch_ms("convnext", threads);
        rows.push(Row::new(
            &format!(
                "convnext-l 768px 1 image (mgm {:.0} ms, torch {ms:.0} ms)",
                t[0].best * 1e3
            ),
            "images/min",
            60.0 / t[0].best,
            60e3 / ms,
            "torch eager",
        ));
    }
    report(
        "vision",
        &format!(
            "mgm-vision vs PyTorch {torch_version} eager CPU, {threads} threads each, random \
             weights, f32, best of {ROUNDS} after a warm-up"
        ),
        &rows,
    );
}
