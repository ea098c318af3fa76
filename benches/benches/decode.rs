//! LLM decode and prefill at TinyLlama-1.1B's dimensions (22 layers, hidden 2048, GQA 32/4,
//! vocab 32000; random weights) against llama.cpp and PyTorch eager on the same CPU, measured
//! in the same run: f32, q8 and q4 against llama.cpp's F32, Q8_0 and Q4_0 files of the same
//! weights, and f32 against transformers. Every side is its own process serving timed runs
//! over stdin (so peak RSS is each one's own), and the rounds alternate between them.
//!
//! One measurement: prefill of a fixed 128-token prompt from an empty cache (the last
//! position's logits only, as llama.cpp and `logits_to_keep=1`), then 32 greedy decode steps.
//! Setup (once, see benches/peers/decode_peers.py): `decode_model.py` writes
//! target/decode-model, llama-cpp-python goes in target/decode-venv, torch is the reference
//! venv's. mgm's quantized models are `mgm quantize`d copies (target/decode-model/mgm-q8,
//! mgm-q4; written by this bench when absent). mgm loads every model with
//! `Residency::Resident` (read once into huge pages, like llama.cpp's `--no-mmap`; llama.cpp
//! keeps its default mmap, and repacks Q4_0 into its own buffer).
//!
//! The table holds each side's best round; after it, per dtype, every round's rates side by
//! side and the median of the per-round ratios, which moves less on a host whose memory
//! bandwidth drifts between rounds (medians of each side also go to the JSON report).
//!
//! The bandwidth floor printed with each dtype is the bytes a decoded token reads (every
//! weight except the embedding table, of which one row) over the machine's read bandwidth
//! measured here (all threads summing their own large buffers).
#![allow(missing_docs)]
#![allow(clippy::print_stdout)] // a bench reports on stdout

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mgm_benches::{PythonPeer, Row, argmax, benchmarking, peak_rss_mb, report, workspace_root};
use mgm_llm::{CausalLm, Positions, QuantFormat};
use mgm_tensor::Tensor;
use mgm_tensor::safetensors::Residency;
use rayon::prelude::*;

const PROMPT: usize = 128;
const NEW: usize = 32;
/// Rounds per side: memory bandwidth on a shared machine drifts by 1.5x within seconds, and
/// the best of more rounds is steadier.
const ROUNDS: usize = 5;
const VOCAB: u64 = 32000;
/// Idle before each timed run: the other processes' worker threads stop spinning.
const SETTLE: Duration = Duration::from_millis(500);

/// The prompt ids of decode_peers.py (a 64-bit LCG).
fn prompt_ids(n: usize) -> Vec<i64> {
    mgm_benches::lcg_ids(n, 259, VOCAB)
}

/// One prefill + greedy decode: (prefill tok/s, decode tok/s, tokens).
fn measure(model: &CausalLm) -> (f64, f64, Vec<i64>) {
    let ids = prompt_ids(PROMPT);
    let mut cache = model.new_cache(1, PROMPT + NEW + 1).expect("cache");
    let t0 = Instant::now();
    let logits = model
        .step_keep(
            &Tensor::from_vec(ids, &[1, PROMPT]).expect("ids"),
            &Positions::contiguous(1, PROMPT, 0),
            &mut cache,
            1,
        )
        .expect("prefill");
    let mut tok = argmax(&logits.to_vec::<f32>().expect("logits"));
    let prefill = PROMPT as f64 / t0.elapsed().as_secs_f64();
    let mut toks = vec![tok];
    let t1 = Instant::now();
    for s in 0..NEW {
        let l = model
            .step(
                &Tensor::from_vec(vec![tok], &[1, 1]).expect("id"),
                &Positions::contiguous(1, 1, PROMPT + s),
                &mut cache,
            )
            .expect("decode step");
        tok = argmax(&l.to_vec::<f32>().expect("logits"));
        toks.push(tok);
    }
    (prefill, NEW as f64 / t1.elapsed().as_secs_f64(), toks)
}

/// Bytes a decoded token reads: all weights but the (untied) embedding table, one row of it.
fn bytes_per_token(m: &CausalLm) -> usize {
    let c = m.config();
    m.weight_bytes() - c.vocab_size * c.hidden_size * 4 + c.hidden_size * 4
}

/// The child process: serves measurements of the model in `dir` (the peers' protocol).
fn serve(dir: &Path) {
    // read into huge pages (Residency::Resident), like llama.cpp's --no-mmap
    let model = CausalLm::from_dir_with(dir, Residency::Resident).expect("load the bench model");
    measure(&model); // warm-up: faults the mapped weights in
    let out = std::io::stdout();
    let ready = serde_json::json!({
        "ready": true, "weight_bytes": model.weight_bytes(),
        "bytes_per_token": bytes_per_token(&model),
        "quantization": model.quantization().map(QuantFormat::name),
        "peak_rss_mb": peak_rss_mb(),
    });
    writeln!(out.lock(), "{ready}").expect("stdout");
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        if line.trim() != "run" {
            break;
        }
        let (p, d, toks) = measure(&model);
        let v = serde_json::json!({
            "prefill_tok_s": p, "decode_tok_s": d, "peak_rss_mb": peak_rss_mb(),
            "tokens": &toks[..8.min(toks.len())],
        });
        writeln!(out.lock(), "{v}").expect("stdout");
    }
}

/// Read bandwidth: all threads summing 256 MB per thread in 512 KB tasks, bytes read per
/// second (best of 5). A decode step only reads its weights, and on some machines
/// reading runs far faster than copying (a 2-core Zen 5 VM: 60-70 GB/s read against 39 GB/s
/// copy, read + write), so copy bandwidth would put the floor too low. The buffers are
/// advised as huge pages, as mgm's resident weights are (on 4 KB pages the same loop read
/// 15-20% slower there).
fn read_bandwidth() -> f64 {
    let threads = rayon::current_num_threads();
    let per = 256 << 20;
    let maps: Vec<memmap2::MmapMut> = (0..threads)
        .map(|i| {
            let mut m = memmap2::MmapOptions::new()
                .len(per)
                .map_anon()
                .expect("anonymous buffer");
            #[cfg(target_os = "linux")]
            let _ = m.advise(memmap2::Advice::HugePage);
            m.fill(i as u8 + 1);
            m
        })
        .collect();
    // SAFETY: each map is `per` bytes, page-aligned (so u64-aligned), initialized above.
    let src: Vec<&[u64]> = maps
        .iter()
        .map(|m| unsafe { std::slice::from_raw_parts(m.as_ptr().cast::<u64>(), per / 8) })
        .collect();
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        // 512 KB tasks of eight independent sums (vector adds, several streams in flight)
        let s: u64 = src
            .par_iter()
            .flat_map(|v| v.par_chunks(1 << 16))
            .map(|c| {
                c.chunks_exact(8)
                    .fold([0u64; 8], |mut a, v| {
                        for (x, y) in a.iter_mut().zip(v) {
                            *x = x.wrapping_add(*y);
                        }
                        a
                    })
                    .iter()
                    .fold(0u64, |a, &b| a.wrapping_add(b))
            })
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(s);
        best = best.max((per * threads) as f64 / t.elapsed().as_secs_f64());
    }
    best
}

/// One side's rounds: the best (the table) and the median of each rate, every round's rates
/// in order, and the last round's first tokens.
struct Best {
    prefill: f64,
    decode: f64,
    prefill_median: f64,
    decode_median: f64,
    prefill_rounds: Vec<f64>,
    decode_rounds: Vec<f64>,
    rss_mb: f64,
    tokens: Vec<i64>,
}

fn best_of(answers: &[serde_json::Value]) -> Best {
    let rates = |k: &str| -> Vec<f64> {
        answers
            .iter()
            .map(|v| v[k].as_f64().unwrap_or(f64::NAN))
            .collect()
    };
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let (prefill_rounds, decode_rounds) = (rates("prefill_tok_s"), rates("decode_tok_s"));
    Best {
        prefill: best(&prefill_rounds),
        decode: best(&decode_rounds),
        prefill_median: median(&prefill_rounds),
        decode_median: median(&decode_rounds),
        rss_mb: best(&rates("peak_rss_mb")),
        tokens: answers
            .last()
            .and_then(|v| v["tokens"].as_array())
            .map(|a| a.iter().filter_map(|t| t.as_i64()).collect())
            .unwrap_or_default(),
        prefill_rounds,
        decode_rounds,
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The median over rounds of ours / theirs measured in the same round: the host's memory
/// bandwidth drifts by 1.5x within seconds, and the two sides of one round (seconds apart) see
/// nearly the same machine, so this ratio moves less than the ratio of the best rounds.
fn paired_ratio(ours: &[f64], theirs: &[f64]) -> f64 {
    median(
        &ours
            .iter()
            .zip(theirs)
            .map(|(a, b)| a / b)
            .collect::<Vec<_>>(),
    )
}

/// A table row from both sides' best rounds, their medians kept for the JSON report.
fn row(case: &str, ours: (f64, f64), peer: (f64, f64), peer_name: &str) -> Row {
    let mut r = Row::new(case, "tok/s", ours.0, peer.0, peer_name);
    r.ours_median = Some(ours.1);
    r.peer_median = Some(peer.1);
    r
}

fn ours(dir: &Path) -> PythonPeer {
    let mut cmd = Command::new(std::env::current_exe().expect("this bench"));
    cmd.env("MGM_DECODE_CHILD", dir);
    PythonPeer::serve(cmd, "the mgm decode child")
}

fn peer(python: &Path, engine: &str, model: &Path, threads: usize) -> PythonPeer {
    let mut cmd = Command::new(python);
    cmd.arg(workspace_root().join("benches/peers/decode_peers.py"))
        .args(["--engine", engine, "--model"])
        .arg(model)
        .args(["--threads", &threads.to_string()])
        .args(["--prompt-tokens", &PROMPT.to_string()])
        .args(["--new-tokens", &NEW.to_string()]);
    PythonPeer::serve(cmd, engine)
}

/// Alternates `ROUNDS` timed runs of every side; each side's answers.
fn rounds(sides: &mut [&mut PythonPeer]) -> Vec<Vec<serde_json::Value>> {
    let mut out = vec![Vec::new(); sides.len()];
    for _ in 0..ROUNDS {
        for (s, o) in sides.iter_mut().zip(&mut out) {
            std::thread::sleep(SETTLE);
            o.push(s.request());
        }
    }
    out
}

fn main() {
    if let Some(dir) = std::env::var_os("MGM_DECODE_CHILD") {
        return serve(Path::new(&dir));
    }
    if let (Some(fmt), Some(out)) = (
        std::env::var("MGM_DECODE_QUANTIZE").ok(),
        std::env::var_os("MGM_DECODE_OUT"),
    ) {
        let root = workspace_root().join("target/decode-model");
        let format = QuantFormat::parse(&fmt).expect("q8 or q4");
        let m = CausalLm::from_dir(root.join("hf")).expect("load hf");
        m.quantize(format)
            .expect("quantize")
            .save(&out)
            .expect("save");
        return;
    }
    if !benchmarking() {
        return;
    }
    let root = workspace_root();
    let model_dir = root.join("target/decode-model");
    let llama_py = root.join("target/decode-venv/bin/python");
    let torch_py = root.join("target/reference-venv/bin/python");
    let needed: Vec<PathBuf> = vec![
        model_dir.join("hf/config.json"),
        model_dir.join("model-f32.gguf"),
        model_dir.join("model-q8_0.gguf"),
        model_dir.join("model-q4_0.gguf"),
        llama_py.clone(),
        torch_py.clone(),
    ];
    if let Some(missing) = needed.iter().find(|p| !p.exists()) {
        eprintln!(
            "bench decode: {} is missing; set up the peers and the model as \
             benches/peers/decode_peers.py describes",
            missing.display()
        );
        return;
    }
    let threads = rayon::current_num_threads();
    let bw = read_bandwidth();
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for (name, gguf, llama_name) in [
        ("f32", "model-f32.gguf", "F32"),
        ("q8", "model-q8_0.gguf", "Q8_0"),
        ("q4", "model-q4_0.gguf", "Q4_0"),
    ] {
        let dir = if name == "f32" {
            model_dir.join("hf")
        } else {
            let d = model_dir.join(format!("mgm-{name}"));
            if !d.join("config.json").exists() {
                let status = Command::new(std::env::current_exe().expect("this bench"))
                    .env("MGM_DECODE_QUANTIZE", name)
                    .env("MGM_DECODE_OUT", &d)
                    .status()
                    .expect("run the quantize child");
                assert!(status.success(), "quantizing to {name} failed");
                let f = "generation_config.json";
                let _ = std::fs::copy(model_dir.join("hf").join(f), d.join(f));
            }
            d
        };
        let mut mgm = ours(&dir);
        let mut llama = peer(&llama_py, "llama_cpp", &model_dir.join(gguf), threads);
        let weight_bytes = mgm.info["weight_bytes"].as_f64().unwrap_or(f64::NAN);
        let per_token = mgm.info["bytes_per_token"].as_f64().unwrap_or(f64::NAN);
        let floor = bw / per_token;
        let (m, l, t) = if name == "f32" {
            let mut torch = peer(&torch_py, "torch", &model_dir.join("hf"), threads);
            let mut r = rounds(&mut [&mut mgm, &mut llama, &mut torch]);
            let t = best_of(&r.pop().expect("torch"));
            let l = best_of(&r.pop().expect("llama"));
            (best_of(&r.pop().expect("mgm")), l, Some(t))
        } else {
            let mut r = rounds(&mut [&mut mgm, &mut llama]);
            let l = best_of(&r.pop().expect("llama"));
            (best_of(&r.pop().expect("mgm")), l, None)
        };
        let peer_name = format!("llama.cpp {llama_name}");
        let (md, mp) = ((m.decode, m.decode_median), (m.prefill, m.prefill_median));
        rows.push(row(
            &format!("decode {name} (floor {floor:.2} tok/s)"),
            md,
            (l.decode, l.decode_median),
            &peer_name,
        ));
        rows.push(row(
            &format!("prefill {name} {PROMPT} tokens"),
            mp,
            (l.prefill, l.prefill_median),
            &peer_name,
        ));
        if let Some(t) = &t {
            rows.push(row(
                "decode f32",
                md,
                (t.decode, t.decode_median),
                "torch eager",
            ));
            rows.push(row(
                &format!("prefill f32 {PROMPT} tokens"),
                mp,
                (t.prefill, t.prefill_median),
                "torch eager",
            ));
        }
        let rounds_line = |what: &str, ours: &[f64], theirs: &[f64]| {
            format!(
                "{name} {what} per round (mgm / llama.cpp): {}; median of the round ratios {:.2}x",
                ours.iter()
                    .zip(theirs)
                    .map(|(a, b)| format!("{a:.1}/{b:.1}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                paired_ratio(ours, theirs)
            )
        };
        notes.push(rounds_line("decode", &m.decode_rounds, &l.decode_rounds));
        notes.push(rounds_line("prefill", &m.prefill_rounds, &l.prefill_rounds));
        notes.push(format!(
            "{name}: weights {:.0} MB ({:.0} MB read per token); peak RSS mgm {:.0} MB = {:.2}x \
             the weights, llama.cpp {:.0} MB; decode at {:.0}% of the floor (llama.cpp {:.0}%); \
             first tokens mgm {:?}, llama.cpp {:?}{}",
            weight_bytes / 1e6,
            per_token / 1e6,
            m.rss_mb,
            m.rss_mb * 1048576.0 / weight_bytes,
            l.rss_mb,
            100.0 * m.decode / floor,
            100.0 * l.decode / floor,
            m.tokens,
            l.tokens,
            t.as_ref()
                .map(|t| format!(", torch {:?}", t.tokens))
                .unwrap_or_default()
        ));
    }
    report(
        "decode",
        &format!(
            "TinyLlama-1.1B dims, random weights, batch 1, {threads} threads each, best of \
             {ROUNDS} rounds alternating the processes; read bandwidth {:.1} GB/s",
            bw / 1e9
        ),
        &rows,
    );
    for n in notes {
        println!("{n}");
    }
}
