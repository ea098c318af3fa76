//! The vision towers at real sizes against PyTorch eager on the same CPU, measured in the same
//! run: CLIP ViT-L/14-336 (24 layers, width 1024, 577 tokens; MGM's low-resolution tower) and
//! ConvNeXt-L at 768 px (MGM's high-resolution tower), random weights, one image, f32, the same
//! thread count on both sides. The PyTorch side is `benches/peers/vision_torch.py`, run with the
//! reference venv (`cargo xtask reference` creates target/reference-venv).
#![allow(missing_docs)]
#![allow(clippy::print_stdout)] // a bench reports on stdout

use std::collections::HashMap;

use mgm_benches::{PythonPeer, Row, benchmarking, interleaved_with_peer, report};
use mgm_kernels::gemm::Backend;
use mgm_tensor::nn::VarStore;
use mgm_tensor::{DType, Device, Tensor, no_grad};
use mgm_vision::clip::{Activation, ClipVisionConfig, ClipVisionModel};
use mgm_vision::convnext::{ConvNextConfig, ConvNextModel};

const ROUNDS: usize = 5;

/// The PyTorch peer for `model`, serving timed forward passes.
fn torch_peer(model: &str, threads: usize) -> PythonPeer {
    PythonPeer::spawn(
        "benches/peers/vision_torch.py",
        &[
            "--model",
            model,
            "--threads",
            &threads.to_string(),
            "--warmup",
            "1",
        ],
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

/// One row: our forward pass against the peer's, alternating, in images per minute.
fn measure(case: &str, peer_model: &str, ours: &mut dyn FnMut(), threads: usize) -> (Row, String) {
    let mut peer = torch_peer(peer_model, threads);
    let version = peer.info["torch"].as_str().unwrap_or("?").to_string();
    let (t, p) = interleaved_with_peer(ROUNDS, ours, &mut peer);
    let mut row = Row::from_timings(case, "images/min", 1.0, 60.0, t, p, "torch eager");
    row.case = format!(
        "{case} (mgm {:.0} ms, torch {:.0} ms; medians {:.0} / {:.0})",
        t.best * 1e3,
        p.best * 1e3,
        t.median * 1e3,
        p.median * 1e3
    );
    (row, version)
}

fn main() {
    if !benchmarking() {
        return;
    }
    let threads = rayon::current_num_threads();
    let clip = clip_l336();
    let x = image(336);
    let (clip_row, torch_version) = measure(
        "clip vit-l/14-336 1 image",
        "clip",
        &mut || {
            no_grad(|| clip.forward(&x).expect("clip"));
        },
        threads,
    );
    drop(clip);
    let convnext = convnext_l();
    let x = image(768);
    let (convnext_row, _) = measure(
        "convnext-l 768px 1 image",
        "convnext",
        &mut || {
            no_grad(|| convnext.forward(&x).expect("convnext"));
        },
        threads,
    );
    report(
        "vision",
        &format!(
            "mgm-vision vs PyTorch {torch_version} eager CPU, {threads} threads each, random \
             weights, f32 (mgm's GEMM backend: {:?}), best of {ROUNDS} rounds alternating mgm \
             and torch after a warm-up",
            Backend::best()
        ),
        &[clip_row, convnext_row],
    );
}
