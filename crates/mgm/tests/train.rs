//! `mgm::train` on a tiny config: the loss falls within a few seconds of training, and a run
//! stopped half-way (inside the tower-pretraining stage and inside stage 3) and resumed from
//! its checkpoint gives the same losses as one that was not.

use std::path::Path;

use mgm::train::{RunDirs, StepInfo, TrainConfig, train};

const CONFIG: &str = r#"
seed = 3
image_size = 32
batch_size = 8
eval_questions = 0
betas = [0.9, 0.98]
weight_decay = 0.01
clip_norm = 2.0
checkpoint_every = 4
group_order = ["vision", "fusion", "head", "text"]

[model.text]
architectures = ["LlamaForCausalLM"]
vocab_size = 324
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 1
num_attention_heads = 2
num_key_value_heads = 2
head_dim = 16
max_position_embeddings = 64
tie_word_embeddings = true
bos_token_id = 256
eos_token_id = 257
pad_token_id = 258

[model.clip]
hidden_size = 16
intermediate_size = 32
num_hidden_layers = 2
num_attention_heads = 2
image_size = 16
patch_size = 8
hidden_act = "quick_gelu"

[model.convnext]
patch_size = 4
hidden_sizes = [8, 16]
depths = [1, 1]
hidden_act = "gelu"
layer_scale_init_value = 1e-6

[groups.vision]
patterns = ["model.vision_tower.*", "model.vision_tower_aux.*"]
[groups.fusion]
patterns = ["model.mm_projector.*", "model.vlm_uni_*"]
[groups.head]
patterns = ["scene_head.*"]
[groups.text]
patterns = ["*"]

[[stage]]
name = "towers"
steps = 4
objective = "scene"
lr = { vision = 5e-3, fusion = 5e-3, head = 5e-3 }
[[stage]]
name = "fusion"
steps = 3
lr = { fusion = 5e-3 }
[[stage]]
name = "decoder"
steps = 7
captions = 0.5
lr = { fusion = 5e-3, text = 5e-3 }
[[stage]]
name = "all"
steps = 10
captions = 0.5
lr = { vision = 3e-3, fusion = 5e-3, text = 5e-3 }
"#;

fn config(dir: &Path) -> TrainConfig {
    let p = dir.join("tiny.toml");
    std::fs::write(&p, CONFIG).unwrap();
    TrainConfig::from_file(&p).unwrap()
}

fn losses(out: &Path, stop_after: Option<u64>, resume: bool, cfg: &TrainConfig) -> Vec<f64> {
    let mut v = Vec::new();
    let dirs = RunDirs {
        out: out.to_path_buf(),
    };
    train(cfg, &dirs, resume, stop_after, |s: &StepInfo| {
        v.push(s.loss)
    })
    .unwrap();
    v
}

#[test]
fn the_loss_falls_and_a_resumed_run_matches_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let straight = losses(&tmp.path().join("a"), None, false, &cfg);
    assert_eq!(straight.len(), 24);
    assert!(
        straight[3] < straight[0],
        "the scene loss falls over the 4 tower steps: {straight:?}"
    );
    // the decoder's loss, from the first fusion steps to the end of stage 3
    let first: f64 = straight[4..7].iter().sum::<f64>() / 3.0;
    let last: f64 = straight[21..].iter().sum::<f64>() / 3.0;
    assert!(
        last < 0.75 * first,
        "the loss falls over 20 steps: {first:.3} -> {last:.3} ({straight:?})"
    );
    // a checkpoint is a model directory: the scene head is kept beside model.safetensors
    let ckpt = tmp.path().join("a/checkpoints/step-4");
    assert!(ckpt.join("train_only.safetensors").exists());
    mgm::minigemini::Mgm::from_dir(&ckpt, &Default::default(), None)
        .expect("a checkpoint loads as a model");
    assert!(tmp.path().join("a/model/model.safetensors").exists());
    // the final model loads for inference
    mgm::minigemini::Mgm::from_dir(&tmp.path().join("a/model"), &Default::default(), None)
        .expect("the trained model loads");

    // the loss curve: one polyline per stage, named in the legend
    let svg = tmp.path().join("loss.svg");
    mgm::plot::loss_curve(&tmp.path().join("a/metrics.jsonl"), &svg).unwrap();
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.starts_with("<svg") && text.matches("<polyline").count() >= 4,
        "{text:.300}"
    );
    for stage in ["towers", "fusion", "decoder", "all"] {
        assert!(
            text.contains(&format!("\n{stage}\n</text>")),
            "legend names {stage}"
        );
    }
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"step\": 1}\n").unwrap();
    let e = mgm::plot::loss_curve(&bad, &svg).unwrap_err().to_string();
    assert!(e.contains("line 1: needs step, loss and stage"), "{e}");

    // stop at step 2 (inside the scene stage: its head must come back too), at 9 (inside
    // stage 2) and at 16 (inside stage 3), resuming each time
    let out = tmp.path().join("b");
    let mut resumed = losses(&out, Some(2), false, &cfg);
    resumed.extend(losses(&out, Some(7), true, &cfg));
    resumed.extend(losses(&out, Some(7), true, &cfg));
    resumed.extend(losses(&out, None, true, &cfg));
    assert_eq!(
        resumed, straight,
        "2 + 7 + 7 + 8 steps with three resumes against 24 straight"
    );
}
