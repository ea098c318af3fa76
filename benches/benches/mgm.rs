//! Mini-Gemini at MGM-2B's shapes against the PyTorch reference on the same CPU, measured in
//! the same run: CLIP ViT-L/14-336 + ConvNeXt-L at 768 px + Gemma-2B (random weights, one
//! image), time to first token and greedy decode tokens/s, mgm in f32 and with the decoder in
//! q8 against the PyTorch reference in f32 (benches/peers/mgm_torch.py: transformers' CLIP and
//! Gemma, timm's ConvNeXt, the mining of DESIGN.md section 1 vectorized).
//!
//! Setup (once): `cargo xtask reference` (target/reference-venv), then
//! `target/reference-venv/bin/python benches/peers/mgm_model.py target/mgm-bench-model`
//! (12 GB of f32 safetensors in MGM's layout, which both sides load: mgm memory-mapped, the
//! peer through one shared mapping of the same files, so the machine holds one copy).
//!
//! One measurement: from the normalized 768 px image tensor and the prompt ids to the first
//! generated token (the low-res view derived from the high-res one as MGM does, both towers,
//! mining, projector, splicing, prefill of the spliced prompt keeping only the last logits, the
//! argmax), then `NEW` greedy decode steps. The prompt is BOS, 8 ids, the image placeholder
//! (-200, 576 image tokens), 16 ids: 601 spliced tokens; the ids come from the 64-bit LCG
//! x0 = 0x2545F491, x' = x * 6364136223846793005 + 1442695040888963407, id = 256 + (x' >> 33)
//! mod (256000 - 256). The image is ((131 c + 31 y + 17 x) mod 255) / 127.5 - 1.
//!
//! Every side is its own process serving timed runs over stdin. Two phases, each alternating
//! `ROUNDS` rounds between mgm and the peer: mgm f32 with the peer, then mgm q8 with the peer
//! (two f32 processes of ours besides the peer would not fit a 24 GB machine).
#![allow(missing_docs)]
#![allow(clippy::print_stdout)] // a bench reports on stdout

use std::io::{BufRead, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mgm::minigemini::{Mgm, TowerDirs};
use mgm_benches::{PythonPeer, Row, argmax, benchmarking, peak_rss_mb, report, workspace_root};
use mgm_llm::{Positions, QuantFormat};
use mgm_tensor::{Tensor, no_grad};

const NEW: usize = 16;
const ROUNDS: usize = 3;
const VOCAB: u64 = 256000;
/// Idle before each timed run: the other process's worker threads stop spinning.
const SETTLE: Duration = Duration::from_millis(500);

/// BOS, 8 ids, the image placeholder, 16 ids (the peer's `prompt_ids`).
fn prompt_ids() -> Vec<i64> {
    let ids = mgm_benches::lcg_ids(24, 256, VOCAB);
    let mut out = vec![2];
    out.extend_from_slice(&ids[..8]);
    out.push(mgm::minigemini::IMAGE_TOKEN_INDEX);
    out.extend_from_slice(&ids[8..]);
    out
}

/// The normalized high-res input `[1, 3, size, size]` (the peer's `image`).
fn image(size: usize) -> Tensor {
    let mut v = Vec::with_capacity(3 * size * size);
    for c in 0..3 {
        for y in 0..size {
            for x in 0..size {
                v.push(((131 * c + 31 * y + 17 * x) % 255) as f32 / 127.5 - 1.0);
            }
        }
    }
    Tensor::from_vec(v, &[1, 3, size, size]).expect("image")
}

/// One time-to-first-token plus greedy decode, as the peer's answer.
fn measure(m: &Mgm) -> serde_json::Value {
    let ids = prompt_ids();
    let ids = Tensor::from_vec(ids.clone(), &[1, ids.len()]).expect("ids");
    let aux = image(m.config().image_size_aux);
    let lm = m.language_model();
    let t0 = Instant::now();
    let toks = no_grad(|| m.image_tokens(&aux, None)).expect("image tokens");
    let x = m.embed(&ids, Some(&toks)).expect("splice");
    let t = x.shape()[1];
    let mut cache = lm.new_cache(1, t + NEW + 1).expect("cache");
    let logits = lm
        .step_embeds_keep(&x, &Positions::contiguous(1, t, 0), &mut cache, 1)
        .expect("prefill");
    let mut tok = argmax(&logits.to_vec::<f32>().expect("logits"));
    let ttft = t0.elapsed().as_secs_f64();
    let mut out = vec![tok];
    let t1 = Instant::now();
    for s in 0..NEW {
        let l = lm
            .step(
                &Tensor::from_vec(vec![tok], &[1, 1]).expect("id"),
                &Positions::contiguous(1, 1, t + s),
                &mut cache,
            )
            .expect("decode step");
        tok = argmax(&l.to_vec::<f32>().expect("logits"));
        out.push(tok);
    }
    let decode = NEW as f64 / t1.elapsed().as_secs_f64();
    serde_json::json!({
        "ttft_ms": ttft * 1e3, "decode_tok_s": decode, "peak_rss_mb": peak_rss_mb(),
        "tokens": &out[..8], "spliced_tokens": t,
    })
}

/// The child process: serves measurements of the model in `dir` (the peer's protocol).
fn serve(dir: &Path, quant: Option<QuantFormat>) {
    let model = Mgm::from_dir(dir, &TowerDirs::default(), quant).expect("load the bench model");
    let mut ready = measure(&model); // warm-up: faults the mapped weights in
    ready["ready"] = true.into();
    ready["weight_bytes"] = model.language_model().weight_bytes().into();
    let out = std::io::stdout();
    writeln!(out.lock(), "{ready}").expect("stdout");
    for line in std::io::stdin().lock().lines() {
        if line.expect("stdin").trim() != "run" {
            break;
        }
        writeln!(out.lock(), "{}", measure(&model)).expect("stdout");
    }
}

fn ours(dir: &Path, quant: &str) -> PythonPeer {
    let mut cmd = Command::new(std::env::current_exe().expect("this bench"));
    cmd.env("MGM_BENCH_CHILD", dir)
        .env("MGM_BENCH_QUANT", quant);
    PythonPeer::serve(cmd, "the mgm child")
}

/// Best (highest) value of `key` over the answers; `lower` takes the lowest instead.
fn best(answers: &[serde_json::Value], key: &str, lower: bool) -> f64 {
    let vals = answers.iter().filter_map(|v| v[key].as_f64());
    if lower {
        vals.fold(f64::INFINITY, f64::min)
    } else {
        vals.fold(0.0, f64::max)
    }
}

/// Alternates `ROUNDS` timed runs of the two sides; each side's answers.
fn rounds(
    a: &mut PythonPeer,
    b: &mut PythonPeer,
) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        std::thread::sleep(SETTLE);
        x.push(a.request());
        std::thread::sleep(SETTLE);
        y.push(b.request());
    }
    (x, y)
}

fn main() {
    if let Some(dir) = std::env::var_os("MGM_BENCH_CHILD") {
        let quant = std::env::var("MGM_BENCH_QUANT").unwrap_or_default();
        let q = (quant != "f32").then(|| QuantFormat::parse(&quant).expect("q8 or q4"));
        return serve(Path::new(&dir), q);
    }
    if !benchmarking() {
        return;
    }
    let root = workspace_root();
    let dir = root.join("target/mgm-bench-model");
    let py = root.join("target/reference-venv/bin/python");
    for need in [dir.join("config.json"), py.clone()] {
        if !need.exists() {
            eprintln!(
                "bench mgm: {} is missing; run `cargo xtask reference`, then \
                 `target/reference-venv/bin/python benches/peers/mgm_model.py \
                 target/mgm-bench-model`",
                need.display()
            );
            return;
        }
    }
    let threads = rayon::current_num_threads();
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut torch_version = String::new();
    for quant in ["f32", "q8"] {
        let mut mgm = ours(&dir, quant);
        let mut cmd = Command::new(&py);
        cmd.arg(root.join("benches/peers/mgm_torch.py"))
            .arg("--model")
            .arg(&dir)
            .args(["--threads", &threads.to_string()])
            .args(["--new-tokens", &NEW.to_string()]);
        let mut torch = PythonPeer::serve(cmd, "benches/peers/mgm_torch.py");
        torch_version = format!(
            "torch {}, transformers {}",
            torch.info["torch"].as_str().unwrap_or("?"),
            torch.info["transformers"].as_str().unwrap_or("?")
        );
        let (m, t) = rounds(&mut mgm, &mut torch);
        let (m_ttft, t_ttft) = (best(&m, "ttft_ms", true), best(&t, "ttft_ms", true));
        let spliced = m[0]["spliced_tokens"].as_u64().unwrap_or(0);
        rows.push(Row::new(
            &format!(
                "time to first token {quant} ({spliced} tokens; mgm {:.2} s, torch {:.2} s)",
                m_ttft / 1e3,
                t_ttft / 1e3
            ),
            "1/min",
            60e3 / m_ttft,
            60e3 / t_ttft,
            "torch f32 eager",
        ));
        rows.push(Row::new(
            &format!("decode {quant}"),
            "tok/s",
            best(&m, "decode_tok_s", false),
            best(&t, "decode_tok_s", false),
            "torch f32 eager",
        ));
        let tokens = |a: &[serde_json::Value]| a.last().map(|v| v["tokens"].to_string());
        notes.push(format!(
            "{quant}: decoder weights {:.0} MB; peak RSS mgm {:.0} MB, torch {:.0} MB (mapped \
             file pages count in both); first tokens mgm {}, torch {}",
            mgm.info["weight_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6,
            best(&m, "peak_rss_mb", false),
            best(&t, "peak_rss_mb", false),
            tokens(&m).unwrap_or_default(),
            tokens(&t).unwrap_or_default(),
        ));
    }
    report(
        "mgm",
        &format!(
            "MGM-2B shapes (CLIP ViT-L/14-336 + ConvNeXt-L 768 px + Gemma-2B), random weights, \
             one image, {threads} threads each, best of {ROUNDS} rounds alternating the \
             processes; the peer is the PyTorch reference ({torch_version}) in f32"
        ),
        &rows,
    );
    for n in notes {
        println!("{n}");
    }
}
