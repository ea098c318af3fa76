//! Causal LMs (LLaMA, Mistral, Gemma, Mixtral) against transformers fixtures
//! (`tests/reference/gen_llm.py`): the full-sequence forward, prefill plus step-by-step decode
//! with the KV cache, a left-padded batch, and greedy generation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mgm_llm::{CausalLm, GenerateOptions, Positions, SeqId, generate};
use mgm_tensor::{DType, Tensor};

use crate::{Comparison, Report};

/// Max abs diff allowed on logits (issue: <= 1e-4 vs transformers in f32).
pub const F32_TOL: f64 = 1e-4;

/// The LLM fixture directories (`llm_*`), sorted.
pub fn cases(fixtures: &Path) -> Vec<PathBuf> {
    crate::model_dirs(fixtures, &["llm_"])
}

type Tensors = HashMap<String, Tensor>;

fn load(dir: &Path, file: &str) -> mgm_llm::Result<Tensors> {
    Ok(mgm_tensor::safetensors::load(dir.join(file))?)
}

fn get<'a>(t: &'a Tensors, name: &str, file: &str) -> mgm_llm::Result<&'a Tensor> {
    t.get(name)
        .ok_or_else(|| mgm_llm::Error::input("fixture", format!("{file} has no {name:?}")))
}

fn f64s(t: &Tensor) -> mgm_llm::Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.contiguous()?.to_vec::<f64>()?)
}

/// Max abs diff over the entries where `keep` is true (all when `None`).
fn max_abs(name: String, got: &[f64], want: &[f64], keep: Option<&[bool]>, tol: f64) -> Comparison {
    let Some(keep) = keep.filter(|_| got.len() == want.len()) else {
        return Comparison::max_abs(name, got, want, tol);
    };
    let pick = |v: &[f64]| -> Vec<f64> {
        v.iter()
            .zip(keep)
            .filter(|(_, k)| **k)
            .map(|(x, _)| *x)
            .collect()
    };
    Comparison::max_abs(name, &pick(got), &pick(want), tol)
}

/// Token equality as a comparison row (error = number of mismatching tokens).
fn same_tokens(name: String, got: &[i64], want: &[i64]) -> Comparison {
    let wrong = if got.len() != want.len() {
        got.len().max(want.len())
    } else {
        got.iter().zip(want).filter(|(a, b)| a != b).count()
    };
    Comparison {
        name,
        numel: want.len(),
        max_error: wrong as f64,
        tolerance: 0.0,
    }
}

/// Every check of one fixture directory.
pub fn check(dir: &Path) -> mgm_llm::Result<Report> {
    let case = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("?")
        .to_string();
    let model = CausalLm::from_dir(dir)?;
    let vocab = model.config().vocab_size;
    let mut report = Report::default();

    // full-sequence forward
    let inputs = load(dir, "inputs.safetensors")?;
    let expected = load(dir, "expected.safetensors")?;
    let ids = get(&inputs, "input_ids", "inputs.safetensors")?;
    let want = f64s(get(&expected, "logits", "expected.safetensors")?)?;
    let got = f64s(&model.forward(ids, None)?)?;
    report.rows.push(max_abs(
        format!("{case} forward logits"),
        &got,
        &want,
        None,
        F32_TOL,
    ));

    // prefill half, then one token per step with the cache. With the dynamic rope type the
    // cached keys keep the rotation of the call that made them, so (as in transformers) the
    // cached result differs from a full recompute: that case is covered by the generate step
    // logits below instead.
    let dynamic = matches!(
        model.config().rope_scaling,
        mgm_llm::RopeScaling::Dynamic { .. }
    );
    let (b, t) = (ids.shape()[0], ids.shape()[1]);
    let half = t / 2;
    let mut cache = model.new_cache(b, t)?;
    let mut steps = vec![model.step(
        &ids.narrow(1, 0, half)?,
        &Positions::contiguous(b, half, 0),
        &mut cache,
    )?];
    for i in half..t {
        steps.push(model.step(
            &ids.narrow(1, i, 1)?,
            &Positions::contiguous(b, 1, i),
            &mut cache,
        )?);
    }
    if !dynamic {
        let got = f64s(&Tensor::cat(&steps, 1)?)?;
        report.rows.push(max_abs(
            format!("{case} prefill + decode logits"),
            &got,
            &want,
            None,
            F32_TOL,
        ));
    }

    if !dynamic {
        report.rows.extend(check_paged(&model, &case, ids, &want)?);
    }

    // left-padded batch: only real tokens' logits are meaningful
    let inputs = load(dir, "inputs_padded.safetensors")?;
    let expected = load(dir, "expected_padded.safetensors")?;
    let ids = get(&inputs, "input_ids", "inputs_padded.safetensors")?;
    let mask = get(&inputs, "attention_mask", "inputs_padded.safetensors")?.to_vec::<i64>()?;
    let (b, t) = (ids.shape()[0], ids.shape()[1]);
    let pos = Positions::from_mask(&mask, b, t);
    let pos_file = get(&inputs, "position_ids", "inputs_padded.safetensors")?.to_vec::<i64>()?;
    let ours: Vec<i64> = pos.ids.iter().map(|&p| p as i64).collect();
    report.rows.push(same_tokens(
        format!("{case} padded position ids"),
        &ours,
        &pos_file,
    ));
    let want = f64s(get(&expected, "logits", "expected_padded.safetensors")?)?;
    let keep: Vec<bool> = pos
        .valid
        .iter()
        .flat_map(|&v| std::iter::repeat_n(v, vocab))
        .collect();
    let got = f64s(&model.forward(ids, Some(&pos))?)?;
    report.rows.push(max_abs(
        format!("{case} padded forward logits"),
        &got,
        &want,
        Some(&keep),
        F32_TOL,
    ));
    let mut cache = model.new_cache(b, t)?;
    let got = f64s(&model.step(ids, &pos, &mut cache)?)?;
    report.rows.push(max_abs(
        format!("{case} padded prefill logits"),
        &got,
        &want,
        Some(&keep),
        F32_TOL,
    ));
    if !dynamic {
        // the padded rows' real tokens as sequences of different lengths, in one paged call:
        // each sequence's last logits against its row's last real position
        let idv = ids.to_vec::<i64>()?;
        let mut cache = model.new_paged_cache(b * t.div_ceil(4), 4)?;
        let rows: Vec<Vec<i64>> = (0..b)
            .map(|r| {
                (0..t)
                    .filter(|&j| mask[r * t + j] != 0)
                    .map(|j| idv[r * t + j])
                    .collect()
            })
            .collect();
        let inputs: Vec<(SeqId, &[i64])> = rows
            .iter()
            .map(|r| (cache.add_sequence(), r.as_slice()))
            .collect();
        let got = f64s(&model.step_paged(&inputs, &mut cache)?)?;
        let last: Vec<f64> = (0..b)
            .flat_map(|r| {
                let j = (0..t).rev().find(|&j| mask[r * t + j] != 0).unwrap_or(0);
                want[(r * t + j) * vocab..][..vocab].to_vec()
            })
            .collect();
        report.rows.push(max_abs(
            format!("{case} paged ragged prompts"),
            &got,
            &last,
            None,
            F32_TOL,
        ));
    }

    // greedy generation of 32 tokens, single and left-padded batch
    let gens = load(dir, "generate.safetensors")?;
    let prompt = get(&gens, "prompt_ids", "generate.safetensors")?.to_vec::<i64>()?;
    let out = get(&gens, "output_ids", "generate.safetensors")?.to_vec::<i64>()?;
    let new = out.len() - prompt.len();
    let opts = GenerateOptions {
        min_new_tokens: new,
        ..GenerateOptions::greedy(&model, new)
    };
    let p: Vec<u32> = prompt.iter().map(|&x| x as u32).collect();
    let got = generate(&model, std::slice::from_ref(&p), opts.clone())?;
    let got: Vec<i64> = prompt
        .iter()
        .copied()
        .chain(got[0].iter().map(|&x| i64::from(x)))
        .collect();
    report
        .rows
        .push(same_tokens(format!("{case} greedy 32 tokens"), &got, &out));
    if let Some(scores) = gens.get("output_logits") {
        // each step's logits along transformers' own greedy path, decoded with the cache one
        // token at a time as generate does (this is what the dynamic rope type depends on)
        let pl = prompt.len();
        let mut cache = model.new_cache(1, out.len())?;
        let all = Tensor::from_vec(out.clone(), &[1, out.len()])?;
        let mut steps = vec![
            model
                .step(
                    &all.narrow(1, 0, pl)?,
                    &Positions::contiguous(1, pl, 0),
                    &mut cache,
                )?
                .narrow(1, pl - 1, 1)?,
        ];
        for i in pl..out.len() - 1 {
            steps.push(model.step(
                &all.narrow(1, i, 1)?,
                &Positions::contiguous(1, 1, i),
                &mut cache,
            )?);
        }
        let got = f64s(&Tensor::cat(&steps, 1)?)?;
        report.rows.push(max_abs(
            format!("{case} generate step logits (cached)"),
            &got,
            &f64s(scores)?,
            None,
            F32_TOL,
        ));
    }
    let bp = get(&gens, "batch_prompt_ids", "generate.safetensors")?;
    let bm = get(&gens, "batch_attention_mask", "generate.safetensors")?.to_vec::<i64>()?;
    let bo = get(&gens, "batch_output_ids", "generate.safetensors")?.to_vec::<i64>()?;
    let (b, t) = (bp.shape()[0], bp.shape()[1]);
    let bpv = bp.to_vec::<i64>()?;
    let prompts: Vec<Vec<u32>> = (0..b)
        .map(|r| {
            (0..t)
                .filter(|&j| bm[r * t + j] != 0)
                .map(|j| bpv[r * t + j] as u32)
                .collect()
        })
        .collect();
    let total = bo.len() / b;
    let got = generate(&model, &prompts, opts)?;
    let mut rows = Vec::new();
    for r in 0..b {
        rows.extend_from_slice(&bpv[r * t..(r + 1) * t]);
        rows.extend(got[r].iter().map(|&x| i64::from(x)));
        rows.resize((r + 1) * total, -1);
    }
    report
        .rows
        .push(same_tokens(format!("{case} batched greedy"), &rows, &bo));
    Ok(report)
}

/// The paged cache against the full forward `want` `[B, T, V]` of `ids`: each row a sequence
/// with its own prefill length (blocks of 4 tokens, so prompts straddle blocks), then every row
/// decoding one token per call together. Row 0 is also forked after its prefill and the fork
/// decodes other tokens: sharing a partly filled block, its first append must copy it, or its
/// keys overwrite row 0's (checked by row 0 against transformers); the fork itself is checked
/// against a fresh sequence given the same tokens (no sharing).
fn check_paged(
    model: &CausalLm,
    case: &str,
    ids: &Tensor,
    want: &[f64],
) -> mgm_llm::Result<Vec<Comparison>> {
    let (b, t) = (ids.shape()[0], ids.shape()[1]);
    let vocab = model.config().vocab_size;
    let all = ids.to_vec::<i64>()?;
    let bs = 4;
    let mut cache = model.new_paged_cache((b + 2) * t.div_ceil(bs), bs)?;
    let seqs: Vec<SeqId> = (0..b).map(|_| cache.add_sequence()).collect();
    // prefill lengths differ per row and are not multiples of the block size
    let pre: Vec<usize> = (0..b).map(|r| (t / 2 + 2 * r + 1).min(t - 1)).collect();
    let mut got = vec![0f64; b * t * vocab];
    let mut filled = vec![false; b * t * vocab];
    let mut fork_got = Vec::new();
    let mut put = |got: &mut Vec<f64>, r: usize, i: usize, logits: &[f64]| {
        got[(r * t + i) * vocab..][..vocab].copy_from_slice(logits);
        filled[(r * t + i) * vocab..][..vocab].fill(true);
    };
    let inputs: Vec<(SeqId, &[i64])> = (0..b)
        .map(|r| (seqs[r], &all[r * t..r * t + pre[r]]))
        .collect();
    let l = f64s(&model.step_paged(&inputs, &mut cache)?)?;
    for r in 0..b {
        put(&mut got, r, pre[r] - 1, &l[r * vocab..][..vocab]);
    }
    let fork = cache.fork(seqs[0])?;
    let fresh = cache.add_sequence();
    let _ = model.step_paged(&[(fresh, &all[..pre[0]])], &mut cache)?;
    let other: Vec<i64> = all[..t].iter().map(|&x| (x + 1) % vocab as i64).collect();
    let mut fresh_got = Vec::new();
    for step in 0.. {
        let mut inputs: Vec<(SeqId, &[i64])> = Vec::new();
        let mut rows = Vec::new();
        for r in 0..b {
            let i = pre[r] + step;
            if i < t {
                inputs.push((seqs[r], &all[r * t + i..r * t + i + 1]));
                rows.push((r, i));
            }
        }
        if inputs.is_empty() {
            break;
        }
        let forked = rows.first().is_some_and(|&(r, _)| r == 0);
        let i0 = pre[0] + step;
        if forked {
            inputs.push((fork, &other[i0..i0 + 1]));
        }
        let l = f64s(&model.step_paged(&inputs, &mut cache)?)?;
        for (k, &(r, i)) in rows.iter().enumerate() {
            put(&mut got, r, i, &l[k * vocab..][..vocab]);
        }
        if forked {
            fork_got.extend_from_slice(&l[rows.len() * vocab..][..vocab]);
            let f = f64s(&model.step_paged(&[(fresh, &other[i0..i0 + 1])], &mut cache)?)?;
            fresh_got.extend(f);
        }
    }
    Ok(vec![
        max_abs(
            format!("{case} paged prefill + batched decode"),
            &got,
            want,
            Some(&filled),
            F32_TOL,
        ),
        max_abs(
            format!("{case} paged fork vs unshared"),
            &fork_got,
            &fresh_got,
            None,
            F32_TOL,
        ),
    ])
}

/// The tokenizer fixture (`tokenizer_bpe`): encode (with and without special tokens), decode
/// (skipping specials or not), and the chat template's text, token ids and error messages, all
/// against transformers' `PreTrainedTokenizerFast`. Error = number of mismatches.
pub fn check_tokenizer(dir: &Path) -> mgm_llm::Result<Report> {
    use mgm_llm::{Message, Tokenizer};
    use serde_json::Value;
    let tok = Tokenizer::from_dir(dir)?;
    let path = dir.join("expected.json");
    let text = std::fs::read_to_string(&path).map_err(|source| mgm_llm::Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    let e: Value = serde_json::from_str(&text)
        .map_err(|err| mgm_llm::Error::input("fixture", format!("{}: {err}", path.display())))?;
    let ids = |v: &Value| -> Vec<i64> {
        v.as_array()
            .map(|a| a.iter().filter_map(Value::as_i64).collect())
            .unwrap_or_default()
    };
    let as_i64 = |v: Vec<u32>| v.into_iter().map(i64::from).collect::<Vec<_>>();
    let text_row = |name: String, got: &str, want: Option<&str>| Comparison {
        name,
        numel: 1,
        max_error: if Some(got) == want { 0.0 } else { 1.0 },
        tolerance: 0.0,
    };
    let mut r = Report::default();
    for (i, s) in e["strings"].as_array().into_iter().flatten().enumerate() {
        let t = s["text"].as_str().unwrap_or_default();
        let with = as_i64(tok.encode(t, true)?);
        let without = as_i64(tok.encode(t, false)?);
        r.rows.push(same_tokens(
            format!("tokenizer string {i} encode"),
            &with,
            &ids(&s["ids"]),
        ));
        r.rows.push(same_tokens(
            format!("tokenizer string {i} encode no specials"),
            &without,
            &ids(&s["ids_no_special"]),
        ));
        let w: Vec<u32> = ids(&s["ids"]).into_iter().map(|x| x as u32).collect();
        for (skip, key) in [(false, "decode"), (true, "decode_skip_special")] {
            r.rows.push(text_row(
                format!("tokenizer string {i} {key}"),
                &tok.decode(&w, skip)?,
                s[key].as_str(),
            ));
        }
    }
    for (i, c) in e["chat"].as_array().into_iter().flatten().enumerate() {
        let msgs: Vec<Message> = c["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                Message::new(
                    m["role"].as_str().unwrap_or_default(),
                    m["content"].as_str().unwrap_or_default(),
                )
            })
            .collect();
        let gen_prompt = c["add_generation_prompt"].as_bool().unwrap_or(false);
        let out = tok.apply_chat_template(&msgs, gen_prompt);
        match c["error"].as_str() {
            Some(want) => {
                let got = out.err().map(|e| e.to_string()).unwrap_or_default();
                r.rows.push(Comparison {
                    name: format!("chat {i} raises {want:?}"),
                    numel: 1,
                    max_error: if got.contains(want) { 0.0 } else { 1.0 },
                    tolerance: 0.0,
                });
            }
            None => {
                let got = out?;
                r.rows
                    .push(text_row(format!("chat {i} text"), &got, c["text"].as_str()));
                // the template already holds BOS: transformers tokenizes it without specials
                let got_ids = as_i64(tok.encode(&got, false)?);
                r.rows.push(same_tokens(
                    format!("chat {i} ids"),
                    &got_ids,
                    &ids(&c["ids"]),
                ));
            }
        }
    }
    Ok(r)
}
