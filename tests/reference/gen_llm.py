"""Reference fixtures for mgm-llm: tiny random decoder LMs (LLaMA, Gemma, Mixtral, Mistral) and a BPE tokenizer.

Every case is a directory under tests/fixtures/. The model cases are transformers models built from a
config with 2 layers and random weights (see `randomize`: matrices std 1/sqrt(fan_in), Gemma's
o_proj/down_proj 4/sqrt(fan_in), embeddings std 0.5 or 0.5/sqrt(hidden) when tied, norm weights
1 + 0.2 N(0, 1), Gemma's 0.2 N(0, 1) as its norm multiplies by 1 + w; so logits are O(1), greedy
decoding has clear margins and varied tokens, and a missing norm weight or a wrong scale shows),
saved with `save_pretrained` (config.json, generation_config.json, model.safetensors or shards) and
loaded back with `from_pretrained` before any expected value is computed. All runs are float32 on the
CPU, eval mode, torch.inference_mode, the default (sdpa) attention. Every model case holds:

- inputs.safetensors: `input_ids` int64 [2, T] (random ids >= 4, so no special token appears).
- expected.safetensors: `logits` float32 [2, T, V] from `model(input_ids)`, plus `hidden_states.0`
  .. `hidden_states.L` from `output_hidden_states=True` (entry 0: the token embeddings, for Gemma
  already multiplied by sqrt(hidden); entry i for 0 < i < L: the output of decoder layer i-1; entry
  L: the final norm's output, i.e. the last decoder layer's raw output is not among them); Mixtral
  also `router_logits.N` float32 [2*T, E] (layer N's router logits before the softmax, rows in
  batch-major order).
- inputs_padded.safetensors: `input_ids` [2, T] with row 0 a full sequence and row 1 a shorter
  one (T - 4 tokens) left-padded with the pad id (config.pad_token_id, or 0 where it is null),
  `attention_mask` int64 [2, T] (0 on pads) and `position_ids` int64 [2, T] as transformers 5.23's
  generate computes them: attention_mask.cumsum(-1) - 1 with pad slots set to 0
  (GenerationMixin._prepare_position_ids_for_generation; transformers 4.x set them to 1).
  expected_padded.safetensors: `logits` [2, T, V] from `model(input_ids, attention_mask=...,
  position_ids=...)`. Row 1's logits at pad positions are defined too: sdpa gives a query whose
  keys are all masked an attention output of 0 (see the notes). The generator asserts that row
  1's non-pad logits equal those of the unpadded sequence run alone (max |diff| <= 1e-5), except
  for llm_llama_dynamic, where they must differ: dynamic RoPE rescales from the batch's largest
  position, so padding changes the frequencies a row sees.
- generate.safetensors: `prompt_ids` [1, P] and `output_ids` [1, P + 32] from greedy
  `model.generate(prompt_ids, do_sample=False, max_new_tokens=32, min_new_tokens=32)`, and
  `output_logits` float32 [1, 32, V], the raw logits each step was chosen from; `batch_prompt_ids`
  [2, P] (row 1 left-padded by 2), `batch_attention_mask` [2, P], `batch_position_ids` [2, P] (the
  prefill position ids generate passed to the model, captured with a hook) and `batch_output_ids`
  [2, P + 32] from the same greedy generate with the mask. min_new_tokens keeps EOS from stopping
  a row early by setting EOS's logit to -inf; prompts are drawn from seeds tried in a fixed order
  until one passes these checks: the unmasked argmax was never EOS (so `output_ids` are the plain
  argmax chain and an engine need not implement min_new_tokens); at every step the best logit
  beats the second by >= 2e-3 (a 1e-4 logit error cannot flip a token); each row gets at least 4
  distinct new tokens; for Mixtral every token's router keeps a gap >= 1e-3 between its k-th and
  (k+1)-th logit (asserted for the forward inputs too), so no near tie picks the experts. The
  generator then asserts that decoding with the KV cache gives the tokens of a full recompute
  without cache, that the batch's row 0 decodes exactly `output_ids` and that its padded row 1
  decodes what its unpadded prompt gives alone (for llm_llama_dynamic the first and the last do
  not hold, see below, and are asserted not to; row 0 holds there too, as it has the batch's
  largest position).

The cases:

- llm_llama: LlamaForCausalLM, GQA (4 query heads, 2 KV heads, head_dim 16), untied lm_head,
  rope_type llama3 (factor 8, low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings
  32, max_position_embeddings 64): of the 8 frequencies one stays, one is smoothed, six are divided by 8.
- llm_llama_v4config: LlamaForCausalLM, MQA (1 KV head), tied embeddings, linear RoPE factor 2, saved
  in 2 shards (model-0000N-of-00002.safetensors + model.safetensors.index.json). Its config.json is
  rewritten into the transformers 4.x spelling: `rope_theta` and `rope_scaling: {"type": "linear",
  "factor": 2.0}` at the top level instead of `rope_parameters`, `torch_dtype` instead of `dtype`, no
  `head_dim` (4.x configs before 4.45 had none: hidden_size / num_attention_heads applies),
  `transformers_version` 4.46.3 (hand-written, as a 4.x save would say; nothing reads it); the
  generator asserts transformers 5.23 loads the rewritten directory to identical logits. With tied
  embeddings save_pretrained writes no `lm_head.weight` (asserted: not in any shard nor the index).
- llm_llama_dynamic: LlamaForCausalLM, rope_type dynamic (factor 2), max_position_embeddings 8, T = 12,
  so the NTK base rescaling kicks in. transformers recomputes the frequencies inside the forward
  call from that call's largest position id, keeps them while later calls stay above the original
  length, and resets when a call stays below it; in generate the cached keys keep the rotation they
  were computed with. The generator pins this state machine with asserts; generate.safetensors holds
  what transformers' cached generate produces.
- llm_gemma: GemmaForCausalLM, head_dim 16 with hidden 32 and 4 heads (so q_proj is [64, 32]), 1 KV
  head, gelu_pytorch_tanh, tied embeddings, embeddings scaled by sqrt(hidden), RMSNorm * (1 + w).
- llm_mixtral: MixtralForCausalLM, 4 experts, top-2. transformers 5.23 holds the experts fused in
  memory (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]), but
  save_pretrained (save_original_format=True, the default) writes the classic per-expert names
  `model.layers.N.block_sparse_moe.experts.E.{w1,w2,w3}.weight` and
  `model.layers.N.block_sparse_moe.gate.weight` of the Hub checkpoints; the generator checks that
  w1/w3 are the two halves of gate_up_proj and w2 is down_proj, and that a save with
  save_original_format=False (the fused names, not committed) loads back to the same logits.
- llm_mistral: MistralForCausalLM, sliding_window 4 (a query at i sees keys i-3..i), T = 12.
- llm_llama_trained: the realistic-scale model of the quantization tests. A LlamaForCausalLM
  (vocab 256 = bytes, hidden 64, 4 layers, GQA 4/2 heads of 16, intermediate 128) from transformers'
  own init (normal(0, 0.02), not `randomize`), trained here (`train`: AdamW, weight decay 0.1 on the
  matrices, 400 steps of 32 x 64 bytes, warmup then cosine, deterministic algorithms, ~30 s on 2
  cores) on a seeded English-like corpus (`corpus_text`: a small grammar with Zipf word
  frequencies), until the loss falls from ~5.2 to ~0.37 nats/byte (asserted: to below half). Its
  inputs are byte windows of held-out text starting at a sentence, not random ids (random ids are
  off the training distribution, where a trained model's logits mean nothing). The generator prints
  the losses, a greedy sample and the logits error of a fake quantization of every Linear in q8 /
  q4 (mgm-kernels' group-32 formats, `fake_quant`): ~2.5e-3 / ~3.6e-2.
- tokenizer_bpe: a byte-level BPE (vocab 400) trained here with the tokenizers package on a fixed
  corpus, LLaMA-3-style pre-tokenizer regex, special tokens <unk> <s> </s> <pad> (ids 0-3), a
  TemplateProcessing post-processor that prepends <s>; tokenizer.json, tokenizer_config.json (special
  tokens and a Zephyr/Llama-2-style chat_template) and expected.json: for each test string the
  `encode` ids with and without special tokens and both `decode`s (skip_special_tokens False/True) as
  transformers' AutoTokenizer gives them, and for each conversation `apply_chat_template` with
  tokenize=False and tokenize=True (add_generation_prompt as listed), or the error text a
  conversation raises; `chat_template` holds the template text.

Run through `cargo xtask reference`, which installs the pinned versions from requirements.txt;
`gen_llm.py CASE...` regenerates only the named cases. Deterministic: rerunning rewrites identical
files.
"""

import json
import math
import os
import shutil
import sys
import tempfile
import time

import jinja2
import tokenizers
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

PINNED = {
    "torch": (torch.__version__, "2.15.0"),
    "transformers": (transformers.__version__, "5.23.0"),
    "tokenizers": (tokenizers.__version__, "0.23.3"),
    "jinja2": (jinja2.__version__, "3.1.6"),
}

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
# one key: safetensors writes a metadata map in no fixed order, and identical reruns need identical bytes
META = {"generator": f"gen_llm.py, torch {PINNED['torch'][1]}, transformers {PINNED['transformers'][1]}"}

T = 12  # tokens per row of inputs / inputs_padded
N_PAD = 4  # left pads of inputs_padded row 1
P = 6  # prompt length for generate
BATCH_PAD = 2  # left pads of the batched prompt's row 1
NEW = 32  # generated tokens
MIN_MARGIN = 2e-3  # required gap between the best and second-best logit at every greedy step
MIN_DISTINCT = 4  # and at least this many distinct tokens among each row's new tokens
ROUTER_GAP = 1e-3  # MoE: gap between the k-th and (k+1)-th router logit of every token
FIRST_ID = 4  # random ids start here: 0..3 are the special ids of every config below


def check_versions():
    for name, (have, want) in PINNED.items():
        if have.split("+")[0] != want:
            sys.exit(f"{name} {want} is pinned, found {have}")


def fresh_dir(name):
    path = os.path.normpath(os.path.join(FIXTURES, name))
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


def save(tensors, path):
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, path, metadata=META)


def dir_kb(path):
    return round(sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 1024, 1)


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def randomize(model, seed, gemma_norm=False, out_gain=1.0):
    """Replaces every parameter with seeded random values that keep activations O(1).

    Matrices (Linear weights, the router, the fused expert tensors [E, out, in]) get std
    1/sqrt(fan_in) (the last dim), times `out_gain` for the residual branches' output projections
    (o_proj, down_proj); norm weights 1 + 0.2 N(0, 1), or 0.2 N(0, 1) for Gemma, whose RMSNorm
    multiplies by 1 + w; embeddings std 0.5, or 0.5/sqrt(hidden) when tied: otherwise the token's own
    embedding dominates the residual stream and a tied head predicts the last token again and again,
    which makes a poor greedy-decoding test. Tied weights are one parameter and drawn once.
    """
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    emb_std = 0.5 / math.sqrt(cfg.hidden_size) if cfg.tie_word_embeddings else 0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                assert "norm" in name, f"no init rule for 1-D parameter {name}"
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (0.0 if gemma_norm else 1.0))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * emb_std)
            else:
                gain = out_gain if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")) else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * (gain / math.sqrt(p.shape[-1])))


def pad_id_of(config):
    return config.pad_token_id if config.pad_token_id is not None else 0


def generate_position_ids(mask):
    """transformers 5.23 GenerationMixin._prepare_position_ids_for_generation."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def router_gap(model, ids, **kw):
    """Smallest gap at the top-k boundary of any token's router logits (inf for dense models).

    A near tie there would let a 1e-6 difference pick another expert, so every fixture input keeps
    it >= ROUTER_GAP.
    """
    cfg = model.config
    if not hasattr(cfg, "num_experts_per_tok"):
        return math.inf
    k = cfg.num_experts_per_tok
    with torch.inference_mode():
        rl = model(ids, output_router_logits=True, use_cache=False, **kw).router_logits
    top = torch.stack(rl).double().topk(k + 1, dim=-1).values
    return (top[..., k - 1] - top[..., k]).min().item()


def margins(logits):
    top = logits.double().topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


class Case:
    """One model directory: the in-memory model it was saved from, and loaders of the saved copy."""

    def __init__(self, name, cls, config, seed, gemma_norm=False, out_gain=1.0, randomized=True):
        self.name, self.cls, self.seed = name, cls, seed
        torch.manual_seed(seed)
        self.model = cls(config).eval()  # transformers' own init (normal(0, initializer_range))
        if randomized:
            randomize(self.model, seed, gemma_norm, out_gain)
        self.dir = fresh_dir(name)

    def load(self):
        """A freshly loaded model: dynamic RoPE keeps state between calls, so every run starts clean."""
        return self.cls.from_pretrained(self.dir).eval()

    def vocab(self):
        return self.model.config.vocab_size

    def draw(self, g, shape):
        """Input ids for the forward and generate files: uniform random ids >= FIRST_ID."""
        return draw_ids(g, shape, self.vocab())


def draw_ids(g, shape, vocab):
    return torch.randint(FIRST_ID, vocab, shape, generator=g, dtype=torch.int64)


def write_forward(case, extra=None):
    """inputs/expected and inputs_padded/expected_padded. Returns a short summary string."""
    cfg = case.model.config
    pad = pad_id_of(cfg)
    g = torch.Generator().manual_seed(case.seed + 1)
    ids = case.draw(g, (2, T))
    with torch.inference_mode():
        o = case.load()(ids, output_hidden_states=True, output_router_logits=extra == "router")
        # the in-memory model computes the same
        assert max_diff(case.model(ids).logits, o.logits) == 0.0, f"{case.name}: reloaded model differs"
    expected = {"logits": o.logits}
    expected.update({f"hidden_states.{i}": h for i, h in enumerate(o.hidden_states)})
    assert len(o.hidden_states) == cfg.num_hidden_layers + 1
    if extra == "router":
        expected.update({f"router_logits.{i}": r for i, r in enumerate(o.router_logits)})
    check_hidden_states(case, ids, o.hidden_states)
    assert router_gap(case.load(), ids) >= ROUTER_GAP, f"{case.name}: near tie in routing"

    save({"input_ids": ids}, os.path.join(case.dir, "inputs.safetensors"))
    save(expected, os.path.join(case.dir, "expected.safetensors"))

    row0 = case.draw(g, (T,))
    row1 = case.draw(g, (T - N_PAD,))
    pids = torch.stack([row0, torch.cat([torch.full((N_PAD,), pad, dtype=torch.int64), row1])])
    mask = torch.ones(2, T, dtype=torch.int64)
    mask[1, :N_PAD] = 0
    pos = generate_position_ids(mask)
    with torch.inference_mode():
        lp = case.load()(pids, attention_mask=mask, position_ids=pos).logits
        alone = case.load()(row1[None]).logits
        alone0 = case.load()(row0[None]).logits
    assert torch.isfinite(lp).all(), f"{case.name}: padded logits not finite"
    gap = router_gap(case.load(), pids, attention_mask=mask, position_ids=pos)
    assert gap >= ROUTER_GAP, f"{case.name}: near tie in routing ({gap})"
    d1 = max_diff(lp[1, N_PAD:], alone[0])
    d0 = max_diff(lp[0], alone0[0])
    assert d0 <= 1e-5, f"{case.name}: row 0 differs from its run alone ({d0})"
    if case.name == "llm_llama_dynamic":
        # seq_len for the batch is 12 > 8 (rescaled), row 1 alone is 8 (original frequencies)
        assert d1 > 1e-3, f"{case.name}: expected dynamic RoPE to make padding matter, diff {d1}"
    else:
        assert d1 <= 1e-5, f"{case.name}: padded row 1 differs from its run alone ({d1})"
    save({"input_ids": pids, "attention_mask": mask, "position_ids": pos},
         os.path.join(case.dir, "inputs_padded.safetensors"))
    save({"logits": lp}, os.path.join(case.dir, "expected_padded.safetensors"))
    return f"padded row1 vs alone {d1:.1e}"


def check_hidden_states(case, ids, hs):
    """hidden_states[i] for 0 < i < L is decoder layer i-1's output; [L] is the final norm's output."""
    model = case.load()
    seen = []
    hooks = [layer.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
             for layer in model.model.layers]
    with torch.inference_mode():
        last = model.model(ids).last_hidden_state
    for h in hooks:
        h.remove()
    L = len(model.model.layers)
    for i in range(1, L):
        assert max_diff(seen[i - 1], hs[i]) == 0.0
    assert max_diff(last, hs[L]) == 0.0
    assert max_diff(model.model.norm(seen[L - 1]), hs[L]) == 0.0


def greedy(model, ids, mask=None, steps=NEW):
    """Greedy decoding by full recompute without a cache (the independent check of generate)."""
    seq, logits = ids, []
    for _ in range(steps):
        kw = {}
        if mask is not None:
            kw = dict(attention_mask=mask, position_ids=generate_position_ids(mask))
        step = model(seq, use_cache=False, **kw).logits[:, -1]
        logits.append(step)
        seq = torch.cat([seq, step.argmax(-1, keepdim=True)], dim=-1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
    return seq, torch.stack(logits, 1)


def run_generate(case, ids, mask=None):
    model = case.load()
    cfg = model.config
    captured = []

    def grab(module, args, kwargs):
        if not captured:
            captured.append(kwargs.get("position_ids"))

    hook = model.model.register_forward_pre_hook(grab, with_kwargs=True)
    kw = {} if mask is None else {"attention_mask": mask}
    with torch.inference_mode():
        out = model.generate(ids, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW,
                             pad_token_id=pad_id_of(cfg), eos_token_id=cfg.eos_token_id,
                             return_dict_in_generate=True, output_logits=True, **kw)
    hook.remove()
    logits = torch.stack(out.logits, 1)  # [B, NEW, V], before any logits processor
    new = out.sequences[:, ids.shape[1]:]
    assert new.shape[1] == NEW
    # whether min_new_tokens never had to act: the raw argmax was the chosen token at every step
    plain = torch.equal(logits.argmax(-1), new)
    return out.sequences, logits, captured[0], plain


def write_generate(case):
    cfg = case.model.config
    pad = pad_id_of(cfg)
    dynamic = case.name == "llm_llama_dynamic"
    for attempt in range(50):
        g = torch.Generator().manual_seed(case.seed + 100 + attempt)
        prompt = case.draw(g, (1, P))
        short = case.draw(g, (1, P - BATCH_PAD))
        bprompt = torch.cat([prompt, torch.cat([torch.full((1, BATCH_PAD), pad), short], 1)])
        bmask = torch.ones(2, P, dtype=torch.int64)
        bmask[1, :BATCH_PAD] = 0
        seq, logits, _, plain = run_generate(case, prompt)
        bseq, blogits, bpos, bplain = run_generate(case, bprompt, bmask)
        if not (plain and bplain):
            continue  # EOS was the argmax somewhere and min_new_tokens replaced it
        worst = min(margins(logits).min().item(), margins(blogits).min().item())
        variety = min(len(set(row[P:].tolist())) for row in torch.cat([seq, bseq]))
        if worst < MIN_MARGIN or variety < MIN_DISTINCT:
            continue
        full = torch.cat([bmask, torch.ones(2, NEW, dtype=torch.int64)], 1)
        gap = min(router_gap(case.load(), seq),
                  router_gap(case.load(), bseq, attention_mask=full, position_ids=generate_position_ids(full)))
        if gap >= ROUTER_GAP:
            break
    else:
        raise SystemExit(f"{case.name}: no prompt without EOS as argmax, with greedy margins >= {MIN_MARGIN}, "
                         f"{MIN_DISTINCT} distinct tokens and router gaps >= {ROUTER_GAP}")
    assert torch.equal(bpos, generate_position_ids(bmask)), f"{case.name}: generate's position ids differ"
    assert torch.equal(bseq[0], seq[0]), f"{case.name}: batching changed row 0's greedy tokens"
    # and the left-padded row 1 decodes as its prompt alone would (dynamic RoPE: the batch's frequencies)
    row1_alone = torch.equal(run_generate(case, short)[0][0], bseq[1, BATCH_PAD:])
    assert row1_alone != dynamic, f"{case.name}: padded row 1 vs alone: equal = {row1_alone}"
    with torch.inference_mode():
        ref, ref_logits = greedy(case.load(), prompt)
        bref, _ = greedy(case.load(), bprompt, bmask)
    same = torch.equal(ref, seq) and torch.equal(bref, bseq)
    cache_diff = max_diff(ref_logits, logits)
    if dynamic:
        # cached keys keep the frequencies of the step that computed them; a full recompute rotates
        # all keys with the current step's frequencies, so the logits must differ
        assert cache_diff > 1e-4, f"{case.name}: cached and recomputed dynamic RoPE agree ({cache_diff})"
    else:
        assert same and cache_diff <= 1e-4, f"{case.name}: cached generate differs from recompute ({cache_diff})"
    assert (seq[:, P:] != cfg.eos_token_id).all() and (bseq[:, P:] != cfg.eos_token_id).all()
    save({"prompt_ids": prompt, "output_ids": seq, "output_logits": logits,
          "batch_prompt_ids": bprompt, "batch_attention_mask": bmask, "batch_position_ids": bpos,
          "batch_output_ids": bseq},
         os.path.join(case.dir, "generate.safetensors"))
    return (f"generate: prompt seed +{100 + attempt}, min margin {worst:.1e}, >= {variety} distinct new tokens, "
            f"cache vs recompute logits {cache_diff:.1e} (tokens {'equal' if same else 'differ'}), "
            f"padded row 1 {'=' if row1_alone else '!='} alone")


def finish(case, extra=None):
    msg = [write_forward(case, extra), write_generate(case)]
    files = sorted(os.listdir(case.dir))
    print(f"{case.name}: {', '.join(msg)}; {len(files)} files, {dir_kb(case.dir)} KB")


def common(**kw):
    base = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, rms_norm_eps=1e-5)
    base.update(kw)
    return base


def llama_case():
    config = LlamaConfig(**common(
        hidden_size=64, intermediate_size=80, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
        attention_bias=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}))
    case = Case("llm_llama", LlamaForCausalLM, config, 1000)
    rope = case.model.model.rotary_emb
    plain = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16))
    ratio = (plain / rope.inv_freq).tolist()
    kept = sum(abs(r - 1) < 1e-6 for r in ratio)
    divided = sum(abs(r - 8) < 1e-5 for r in ratio)
    assert (kept, divided, len(ratio) - kept - divided) == (1, 6, 1), ratio
    case.model.save_pretrained(case.dir)
    finish(case)


def v4config_case():
    config = LlamaConfig(**common(
        num_key_value_heads=1, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}))
    case = Case("llm_llama_v4config", LlamaForCausalLM, config, 2000)
    assert case.model.lm_head.weight is case.model.model.embed_tokens.weight
    case.model.save_pretrained(case.dir, max_shard_size="45KB")
    index = json.load(open(os.path.join(case.dir, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2, shards
    names = set()
    for s in shards:
        with safe_open(os.path.join(case.dir, s), "pt") as f:
            names |= set(f.keys())
    assert names == set(index["weight_map"]) and "lm_head.weight" not in names, "tied lm_head was saved"

    path = os.path.join(case.dir, "config.json")
    cfg = json.load(open(path))
    rope = cfg.pop("rope_parameters")
    assert rope == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}, rope
    assert cfg.pop("head_dim") == cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["rope_scaling"] = {"type": "linear", "factor": rope["factor"]}
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["transformers_version"] = "4.46.3"  # what a 4.x save would say; transformers 5 ignores it
    with open(path, "w") as f:
        f.write(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")
    loaded = case.load()
    assert loaded.config.rope_parameters["rope_type"] == "linear" and loaded.config.rope_parameters["factor"] == 2.0
    x = torch.arange(FIRST_ID, FIRST_ID + 2 * T).view(2, T) % case.vocab()
    with torch.inference_mode():
        assert max_diff(loaded(x).logits, case.model(x).logits) == 0.0, "4.x config spelling loads differently"
    finish(case)


def dynamic_case():
    config = LlamaConfig(**common(
        num_key_value_heads=2, max_position_embeddings=8,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}))
    case = Case("llm_llama_dynamic", LlamaForCausalLM, config, 3000)
    case.model.save_pretrained(case.dir)
    check_dynamic_state(case)
    finish(case)


def check_dynamic_state(case):
    """Pins when transformers 5.23 recomputes dynamic-NTK frequencies (modeling_rope_utils.dynamic_rope_update)."""
    model = case.load()
    rope = model.model.rotary_emb
    cfg = model.config
    dim, base, factor, mpe = 8, 10000.0, 2.0, cfg.max_position_embeddings

    def expected(seq_len):
        if seq_len <= mpe:
            return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        b = torch.tensor(base) * ((factor * torch.tensor(seq_len) / mpe) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (b ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))

    def run(n):
        with torch.inference_mode():
            model(torch.full((1, n), FIRST_ID))
        return rope.inv_freq.clone()

    for n, want in [(6, 6), (12, 12), (10, 12), (14, 14), (8, 14), (7, 7), (9, 9)]:
        got = run(n)
        assert torch.equal(got, expected(want)), f"dynamic rope after a {n}-token call: not the {want} frequencies"


def gemma_case():
    config = GemmaConfig(**common(
        num_key_value_heads=1, head_dim=16, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
        rms_norm_eps=1e-6))
    # gain 4: with embed scale and tied head, weaker branches leave greedy decoding on one token
    case = Case("llm_gemma", GemmaForCausalLM, config, 4000, gemma_norm=True, out_gain=4.0)
    emb = case.model.model.embed_tokens
    assert emb.embed_scale.dtype == torch.float32 and emb.embed_scale.item() == torch.tensor(32 ** 0.5).item()
    case.model.save_pretrained(case.dir)
    finish(case)


def mixtral_config():
    return MixtralConfig(**common(
        num_key_value_heads=2, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))


def mixtral_case():
    case = Case("llm_mixtral", MixtralForCausalLM, mixtral_config(), 5000)
    case.model.save_pretrained(case.dir)
    saved = load_file(os.path.join(case.dir, "model.safetensors"))
    cfg = case.model.config
    n_i = cfg.intermediate_size
    for li, layer in enumerate(case.model.model.layers):
        gate_up = layer.mlp.experts.gate_up_proj
        down = layer.mlp.experts.down_proj
        pre = f"model.layers.{li}.block_sparse_moe."
        assert torch.equal(saved[pre + "gate.weight"], layer.mlp.gate.weight)
        for e in range(cfg.num_local_experts):
            assert torch.equal(saved[f"{pre}experts.{e}.w1.weight"], gate_up[e, :n_i])
            assert torch.equal(saved[f"{pre}experts.{e}.w3.weight"], gate_up[e, n_i:])
            assert torch.equal(saved[f"{pre}experts.{e}.w2.weight"], down[e])
    assert not any(".mlp." in k for k in saved), "per-expert names expected in the saved file"
    check_routing(case)
    finish(case, extra="router")

    # save_original_format=False writes the in-memory fused names; transformers loads those too.
    # Not a fixture (Hub checkpoints use the per-expert names), only checked here.
    with tempfile.TemporaryDirectory() as fused:
        case.model.save_pretrained(fused, save_original_format=False)
        names = set(load_file(os.path.join(fused, "model.safetensors")))
        assert "model.layers.0.mlp.experts.gate_up_proj" in names and not any("block_sparse_moe" in k for k in names)
        ids = load_file(os.path.join(case.dir, "inputs.safetensors"))["input_ids"]
        want = load_file(os.path.join(case.dir, "expected.safetensors"))["logits"]
        with torch.inference_mode():
            got = MixtralForCausalLM.from_pretrained(fused).eval()(ids).logits
        assert max_diff(got, want) == 0.0, "fused spelling loads differently"


def check_routing(case):
    """softmax (f32) over all experts, then top-k, then renormalise the k weights to sum 1."""
    moe = case.model.model.layers[0].mlp
    x = torch.randn(10, case.model.config.hidden_size, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        logits, weights, index = moe.gate(x)
        probs = torch.softmax(x @ moe.gate.weight.T, dim=-1)
        top, idx = probs.topk(2, dim=-1)
        assert torch.equal(idx, index) and max_diff(top / top.sum(-1, keepdim=True), weights) < 1e-7
        # which equals a softmax over the top-k logits alone
        alt = torch.softmax(logits.gather(-1, index), dim=-1)
        assert max_diff(alt, weights) < 1e-6


def mistral_case():
    config = MistralConfig(**common(num_key_value_heads=2, sliding_window=4,
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    case = Case("llm_mistral", MistralForCausalLM, config, 6000)
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    m = sdpa_mask(batch_size=1, q_length=6, kv_length=6, mask_function=sliding_window_causal_mask_function(4),
                  allow_is_causal_skip=False)[0, 0]
    want = torch.tensor([[0 <= i - j < 4 for j in range(6)] for i in range(6)])
    assert torch.equal(m, want), m
    case.model.save_pretrained(case.dir)
    # the window matters: the same model without a window gives other logits on T = 12 tokens
    ids = torch.arange(FIRST_ID, FIRST_ID + T)[None]
    full = case.load()
    full.config.sliding_window = None
    with torch.inference_mode():
        assert max_diff(full(ids).logits, case.load()(ids).logits) > 1e-3
    finish(case)


# ----------------------------------------------------------------------------------------------
# a trained LLaMA: realistic weight scale for the quantization tests

TRAIN_SEED = 7000
TRAIN_STEPS = 400
TRAIN_BATCH = 32
TRAIN_LEN = 64  # bytes per training window (each predicts the next 64)
TRAIN_LR = 3e-3
TRAIN_WARMUP = 20
TRAIN_WD = 0.1  # AdamW weight decay of the matrices (embeddings and lm_head included); none on norms

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
NOUNS = [("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("fox", "foxes"), ("child", "children"),
         ("box", "boxes"), ("apple", "apples"), ("tree", "trees"), ("horse", "horses"), ("mouse", "mice")]
ADJS = ["red", "small", "big", "old", "happy", "green", "quiet", "brown", "young", "tall"]
VERBS = [("sees", "see"), ("likes", "like"), ("finds", "find"), ("chases", "chase"), ("watches", "watch"),
         ("follows", "follow"), ("wants", "want"), ("carries", "carry")]
PLACES = ["in the garden", "at the park", "by the river", "under the tree", "on the hill", "near the house"]
NUMS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def zipf(rng, items):
    """A word with probability proportional to 1 / rank: unequal frequencies give greedy decoding clear margins."""
    return rng.choices(items, weights=[1.0 / (i + 1) for i in range(len(items))])[0]


def sentence(rng):
    """One sentence of a small English-like grammar (number agreement, counting, fixed phrases)."""
    kind = rng.randrange(6)
    n1, n2 = zipf(rng, NOUNS), zipf(rng, NOUNS)
    a1, a2 = zipf(rng, ADJS), zipf(rng, ADJS)
    v = zipf(rng, VERBS)
    if kind == 0:
        s = f"the {a1} {n1[0]} {v[0]} the {n2[0]}"
    elif kind == 1:
        k = rng.randrange(2, 10)
        s = f"{NUMS[k - 1]} {a1} {n1[1]} {v[1]} a {a2} {n2[0]} {zipf(rng, PLACES)}"
    elif kind == 2:
        k = rng.randrange(1, 10)
        s = f"{zipf(rng, NAMES)} has {NUMS[k - 1]} {n1[0] if k == 1 else n1[1]}"
    elif kind == 3:
        x, y = rng.sample(NAMES, 2)
        s = f"{x} and {y} {v[1]} the {a1} {n1[1]}"
    elif kind == 4:
        k = rng.randrange(3, 10)
        s = f"{zipf(rng, NAMES)} counts to {NUMS[k - 1]}: {' '.join(NUMS[:k])}"
    else:
        s = f"the {n1[0]} is {a1} and the {n2[1]} are {a2}"
    return s[0].upper() + s[1:] + "."


def corpus_text(seed, n_sentences):
    """Paragraphs of 3..6 sentences joined by spaces, one paragraph per line (ASCII: no id < 10 occurs)."""
    import random

    rng = random.Random(seed)
    lines, left = [], n_sentences
    while left > 0:
        k = min(left, rng.randrange(3, 7))
        lines.append(" ".join(sentence(rng) for _ in range(k)))
        left -= k
    return "\n".join(lines) + "\n"


class TrainedCase(Case):
    """Inputs are byte windows of held-out corpus text starting at a sentence start, not random ids."""

    def __init__(self, *args, text, **kw):
        super().__init__(*args, **kw)
        self.text = torch.tensor(list(text.encode("ascii")), dtype=torch.int64)
        starts = [0] + [i + 2 for i in range(len(text) - 2) if text[i] == "." and text[i + 1] in " \n"]
        self.starts = torch.tensor([s for s in starts if s + 2 * T <= len(text)])

    def draw(self, g, shape):
        rows, n = math.prod(shape[:-1]), shape[-1]
        at = self.starts[torch.randint(0, len(self.starts), (rows,), generator=g)]
        return self.text[at[:, None] + torch.arange(n)].view(shape)


def train(model, data, seed):
    """AdamW on random windows of `data`; linear warmup then cosine to 10% of the peak rate."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    rest = [p for n, p in model.named_parameters() if p.ndim != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": TRAIN_WD}, {"params": rest, "weight_decay": 0.0}],
                            lr=TRAIN_LR, betas=(0.9, 0.95), eps=1e-8)

    def lr_at(step):
        if step < TRAIN_WARMUP:
            return TRAIN_LR * (step + 1) / TRAIN_WARMUP
        t = (step - TRAIN_WARMUP) / (TRAIN_STEPS - TRAIN_WARMUP)
        return TRAIN_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    losses = []
    for step in range(TRAIN_STEPS):
        at = torch.randint(0, len(data) - TRAIN_LEN - 1, (TRAIN_BATCH,), generator=g)
        win = data[at[:, None] + torch.arange(TRAIN_LEN + 1)]
        logits = model(win[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), win[:, 1:].reshape(-1))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def held_out_loss(model, data):
    """Mean next-byte cross entropy over consecutive TRAIN_LEN windows of `data`."""
    n = (len(data) - 1) // TRAIN_LEN
    x = data[: n * TRAIN_LEN].view(n, TRAIN_LEN)
    y = data[1: n * TRAIN_LEN + 1].view(n, TRAIN_LEN)
    with torch.inference_mode():
        logits = model(x, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()


def round_away(x):
    return torch.sign(x) * torch.floor(x.abs() + 0.5)  # f32::round, as mgm-kernels' quantizer


def fake_quant(w, bits):
    """mgm-kernels' q8 / q4 (groups of 32 inputs, f16 scale), dequantized back to f32."""
    out, k = w.shape
    assert k % 32 == 0
    gw = w.view(out, k // 32, 32)
    if bits == 8:
        d = (gw.abs().amax(-1, keepdim=True) / 127.0).half().float()
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        q = round_away(gw * inv).clamp(-127, 127)
        return (q * d).view(out, k)
    idx = gw.abs().argmax(-1, keepdim=True)  # first of largest magnitude (the Rust fold keeps the first too)
    d = (gw.gather(-1, idx) / -8.0).half().float()
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = (round_away(gw * inv) + 8).clamp(0, 15)
    return ((q - 8) * d).view(out, k)


def quant_estimate(case, ids):
    """Relative Frobenius error of the logits with every Linear weight (lm_head included) fake-quantized."""
    with torch.inference_mode():
        ref = case.load()(ids).logits.double()
        errs = {}
        for bits in (8, 4):
            model = case.load()
            for m in model.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.copy_(fake_quant(m.weight, bits))
            got = model(ids).logits.double()
            errs[bits] = ((got - ref).norm() / ref.norm()).item()
    return errs


def trained_case():
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5,
        tie_word_embeddings=False, attention_bias=False, initializer_range=0.02,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    train_text = corpus_text(TRAIN_SEED, 6000)
    held_text = corpus_text(TRAIN_SEED + 1, 600)
    case = TrainedCase("llm_llama_trained", LlamaForCausalLM, config, TRAIN_SEED, randomized=False,
                       text=held_text)
    assert min(train_text.encode("ascii")) >= 10 and min(held_text.encode("ascii")) >= 10  # no special id
    data = torch.tensor(list(train_text.encode("ascii")), dtype=torch.int64)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        t0 = time.perf_counter()
        losses = train(case.model, data, TRAIN_SEED)
        seconds = time.perf_counter() - t0
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    held = held_out_loss(case.model, case.text)
    assert last < 0.5 * first, f"training did not learn: loss {first:.3f} -> {last:.3f}"
    print(f"llm_llama_trained: {len(train_text)} training bytes, {TRAIN_STEPS} steps of {TRAIN_BATCH} x "
          f"{TRAIN_LEN} in {seconds:.1f} s; loss (mean of 10 steps) {first:.3f} -> {last:.3f} nats/byte, "
          f"held-out {held:.3f}")
    case.model.save_pretrained(case.dir)
    finish(case)

    ids = load_file(os.path.join(case.dir, "inputs.safetensors"))["input_ids"]
    gen = load_file(os.path.join(case.dir, "generate.safetensors"))
    with torch.inference_mode():
        hs = case.load()(ids, output_hidden_states=True).hidden_states
    # how much each decoder layer changes the residual stream (hs[L] is after the final norm: left out)
    change = [((hs[i + 1] - hs[i]).norm() / hs[i].norm()).item() for i in range(len(hs) - 2)]
    longer = case.draw(torch.Generator().manual_seed(TRAIN_SEED + 2), (4, 64))
    err, err_long = quant_estimate(case, ids), quant_estimate(case, longer)
    print(f"llm_llama_trained: inputs {bytes(ids[0].tolist())!r}, {bytes(ids[1].tolist())!r}; greedy "
          f"{bytes(gen['prompt_ids'][0].tolist())!r} -> {bytes(gen['output_ids'][0, P:].tolist())!r}")
    print(f"llm_llama_trained: |layer change| / |residual| per layer {', '.join(f'{c:.2f}' for c in change)}; "
          f"weight-only fake quant, logits rel Frobenius error on inputs.safetensors: q8 {err[8]:.2e}, "
          f"q4 {err[4]:.2e} (4 x 64 held-out bytes: q8 {err_long[8]:.2e}, q4 {err_long[4]:.2e})")


# ----------------------------------------------------------------------------------------------
# tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away!",
    "Hello, world. Hello again, world: this is a small corpus for a small tokenizer.",
    "In 2024 we trained 3 models with 1,234,567 parameters each, at 0.5 dollars per hour.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5\n",
    "Le café est très bon, mais la crème brûlée est meilleure. Où est la bibliothèque?",
    "Die Größe der Straße ist überraschend. Schöne Grüße aus München!",
    "naïve résumé façade coöperate jalapeño El Niño São Paulo",
    "你好，世界。我们正在训练一个小的分词器。中文没有空格。",
    "日本語のテキストも少し入れます。ひらがなとカタカナ、漢字。",
    "한국어 문장도 있습니다.",
    "Emoji test: 😀 😃 🦀 🚀 👍🏽 ❤️ and a family 👨‍👩‍👧.",
    "Tabs\tand  double  spaces   and\nnewlines\n\nand trailing spaces   ",
    "User: What is the capital of France?\nAssistant: The capital of France is Paris.",
    "You are a helpful assistant. Answer briefly and politely.",
]

CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] | trim %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = '' %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "{%- if system_message %}\n"
    "    {{- '<|system|>\\n' + system_message + eos_token + '\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if message['role'] not in ['user', 'assistant'] %}\n"
    "        {{- raise_exception(\"Unknown role '\" + message['role'] + \"': only system (first), "
    "user and assistant are allowed\") }}\n"
    "    {%- endif %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {{- '<|' + message['role'] + '|>\\n' + message['content'].strip() + eos_token + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|assistant|>\\n' }}\n"
    "{%- endif %}\n"
)

TEST_STRINGS = [
    "Hello, world!",
    "The quick brown fox.",
    "   leading and trailing   ",
    "tabs\tand\t\tmany     spaces",
    "line one\nline two\n\n\nline five\r\nwindows",
    "café naïve résumé Ångström",
    "你好，世界。日本語のテキスト",
    "emoji 🦀🚀 👍🏽 ❤️ 👨‍👩‍👧 and a rare one: 🧬",
    "",
    "<s>literal specials</s> in <pad> text<unk>",
    "numbers 1234567 and 3.14159",
    "x",
]

CONVERSATIONS = [
    {"add_generation_prompt": True,
     "messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"add_generation_prompt": True,
     "messages": [{"role": "system", "content": "  You are a helpful assistant.\n"},
                  {"role": "user", "content": "Hi! "},
                  {"role": "assistant", "content": " Hello, how can I help?"},
                  {"role": "user", "content": "Tell me a joke about 🦀."}]},
    {"add_generation_prompt": False,
     "messages": [{"role": "user", "content": "Translate: café"},
                  {"role": "assistant", "content": "coffee"}]},
    {"add_generation_prompt": True,
     "messages": [{"role": "system", "content": "Réponds en français."},
                  {"role": "user", "content": "你好\n\nworld"}]},
    {"add_generation_prompt": True,
     "messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]},
    {"add_generation_prompt": False,
     "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
]

# LLaMA-3's pre-tokenizer split (tokenizer.json of Meta-Llama-3), then byte-level mapping without its own regex
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def train_tokenizer():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=1, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return tok


def tokenizer_case():
    out = fresh_dir("tokenizer_bpe")
    tok = train_tokenizer()
    text = tok.to_str(pretty=True)
    assert train_tokenizer().to_str(pretty=True) == text, "BPE training is not deterministic"
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2, 3]
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(text)
    tconf = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_max_length": 4096,
        "pad_token": "<pad>",
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(tconf, indent=2, ensure_ascii=False) + "\n")

    hf = AutoTokenizer.from_pretrained(out)
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.pad_token_id) == (1, 2, 0, 3)
    raw = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    strings = []
    for s in TEST_STRINGS:
        ids = hf.encode(s)
        plain = hf.encode(s, add_special_tokens=False)
        # transformers and the tokenizers library (what the Rust crate implements) agree
        assert ids == raw.encode(s).ids and plain == raw.encode(s, add_special_tokens=False).ids, s
        entry = {
            "text": s,
            "ids": ids,
            "ids_no_special": plain,
            "tokens": hf.convert_ids_to_tokens(ids),
            "decode": hf.decode(ids),
            "decode_skip_special": hf.decode(ids, skip_special_tokens=True),
            "decode_no_special": hf.decode(plain),
            "decode_no_special_skip_special": hf.decode(plain, skip_special_tokens=True),
        }
        assert entry["decode"] == raw.decode(ids, skip_special_tokens=False)
        assert entry["decode_skip_special"] == raw.decode(ids, skip_special_tokens=True)
        strings.append(entry)
    chats = []
    for conv in CONVERSATIONS:
        entry = {"messages": conv["messages"], "add_generation_prompt": conv["add_generation_prompt"]}
        try:
            rendered = hf.apply_chat_template(conv["messages"], tokenize=False,
                                              add_generation_prompt=conv["add_generation_prompt"])
        except jinja2.exceptions.TemplateError as e:
            entry["error"] = str(e)
        else:
            ids = hf.apply_chat_template(conv["messages"], tokenize=True,
                                         add_generation_prompt=conv["add_generation_prompt"])["input_ids"]
            # tokenize=True encodes the rendered text with add_special_tokens=False: the template's own
            # bos_token is the only BOS
            assert ids == hf.encode(rendered, add_special_tokens=False) and ids.count(1) == 1
            entry.update({"text": rendered, "ids": ids})
        chats.append(entry)
    assert sum("error" in c for c in chats) == 2
    expected = {
        "vocab_size": raw.get_vocab_size(),
        "special_tokens": {s: raw.token_to_id(s) for s in SPECIALS},
        "chat_template": CHAT_TEMPLATE,
        "strings": strings,
        "chat": chats,
    }
    with open(os.path.join(out, "expected.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
    n_tok = sum(len(s["ids"]) for s in strings)
    print(f"tokenizer_bpe: vocab {raw.get_vocab_size()}, {len(strings)} strings ({n_tok} ids), "
          f"{len(chats)} conversations ({sum('error' in c for c in chats)} raise), {dir_kb(out)} KB")


def main():
    check_versions()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    cases = {"llm_llama": llama_case, "llm_llama_v4config": v4config_case, "llm_llama_dynamic": dynamic_case,
             "llm_gemma": gemma_case, "llm_mixtral": mixtral_case, "llm_mistral": mistral_case,
             "llm_llama_trained": trained_case, "tokenizer_bpe": tokenizer_case}
    chosen = sys.argv[1:] or list(cases)  # case names to regenerate; none: all of them
    unknown = [c for c in chosen if c not in cases]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; known: {list(cases)}")
    for name in chosen:
        cases[name]()


if __name__ == "__main__":
    main()
