"""Reference fixtures for mgm-train: two AdamW steps of a tiny LLaMA in PyTorch, and lr schedules.

Case train_llama_step (tests/fixtures/train_llama_step/):

- the model: a transformers LlamaForCausalLM (2 layers, hidden 32, 4 heads, 2 KV heads, MLP 64,
  vocab 64, untied lm_head), random weights (matrices std 1/sqrt(fan_in), embeddings std 0.5,
  norm weights 1 + 0.2 N(0, 1)), saved with save_pretrained (config.json + model.safetensors);
- batch.safetensors: `input_ids` int64 [2, 10] and `labels` int64 [2, 10], the ids with -100 on
  the first three positions of each row (a prompt that is not trained on);
- the loss: F.cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=-100,
  label_smoothing=0.1), mean over the counted positions (the causal-LM shift);
- the optimizer: torch.optim.AdamW (foreach=False, the single-tensor path) with two groups: the
  embeddings `model.embed_tokens.weight` at lr 1e-3, weight decay 0, betas (0.9, 0.999), eps 1e-8,
  and everything else at lr 3e-3, weight decay 0.1 (large enough that a missing decay shows), betas (0.9, 0.98), eps 1e-6; gradients
  clipped with torch.nn.utils.clip_grad_norm_(max_norm=0.5) before each step (the tiny model's
  norm is above it, so clipping acts);
- two steps on the same batch. expected.safetensors: `loss.0`, `loss.1` (the loss before each
  step), `grad_norm.0`, `grad_norm.1` (the norm clip_grad_norm_ returns), `grad.NAME` (the
  unclipped gradients of step 0), `step1.NAME` and `step2.NAME` (every parameter after each step).

schedule.safetensors (in the same directory): `cosine` float64 [40], the factor of
transformers.get_cosine_schedule_with_warmup(num_warmup_steps=5, num_training_steps=30) at steps
0..39 (LambdaLR's lr_lambda); and one AdamW step (lr 1e-2, betas (0.9, 0.98), weight decay 0.01)
of a linear map y = x w^T on a batch of 8 samples with the mean squared error, to check gradient
accumulation over micro-batches against the big batch: `acc.w` [3, 4] before, `acc.x` [8, 4],
`acc.y` [8, 3], `acc.w_after` [3, 4]; `sgd.w_after2`: acc.w after two torch.optim.SGD steps (lr
0.05, Nesterov momentum 0.9, weight decay 0.01) on the same batch.

Run through `cargo xtask reference` (pinned versions of requirements.txt). Deterministic.
"""

import math
import os
import shutil
import sys

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

PINNED = {"torch": (torch.__version__, "2.15.0"), "transformers": (transformers.__version__, "5.23.0")}
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
META = {"generator": f"gen_train.py, torch {PINNED['torch'][1]}, transformers {PINNED['transformers'][1]}"}


def check_versions():
    for name, (have, want) in PINNED.items():
        if have.split("+")[0] != want:
            sys.exit(f"{name} {want} is pinned, found {have}")


def randomize(model, g):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))


def llama_step():
    out = os.path.normpath(os.path.join(FIXTURES, "train_llama_step"))
    if os.path.isdir(out):
        shutil.rmtree(out)
    g = torch.Generator().manual_seed(71)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(71)
    model = LlamaForCausalLM(cfg)
    randomize(model, g)
    model.save_pretrained(out)
    for f in ("generation_config.json",):
        p = os.path.join(out, f)
        if os.path.exists(p):
            os.remove(p)
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    model.train()  # no dropout in Llama: train and eval give the same values
    ids = torch.randint(3, 64, (2, 10), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    save_file({"input_ids": ids, "labels": labels}, os.path.join(out, "batch.safetensors"), metadata=META)
    embed = [p for n, p in model.named_parameters() if n == "model.embed_tokens.weight"]
    rest = [p for n, p in model.named_parameters() if n != "model.embed_tokens.weight"]
    opt = torch.optim.AdamW([
        {"params": embed, "lr": 1e-3, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8},
        {"params": rest, "lr": 3e-3, "weight_decay": 0.1, "betas": (0.9, 0.98), "eps": 1e-6},
    ], foreach=False)
    expected = {}
    for step in range(2):
        opt.zero_grad()
        logits = model(input_ids=ids).logits
        v = logits.shape[-1]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), ignore_index=-100,
                               label_smoothing=0.1)
        loss.backward()
        if step == 0:
            for n, p in model.named_parameters():
                expected[f"grad.{n}"] = p.grad.detach().clone()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
        opt.step()
        expected[f"loss.{step}"] = loss.detach().reshape(1)
        expected[f"grad_norm.{step}"] = norm.detach().reshape(1)
        for n, p in model.named_parameters():
            expected[f"step{step + 1}.{n}"] = p.detach().clone()
    save_file({k: v.contiguous() for k, v in expected.items()}, os.path.join(out, "expected.safetensors"),
              metadata=META)

    # the schedule
    lin = torch.nn.Linear(1, 1)
    sched_opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    sched = get_cosine_schedule_with_warmup(sched_opt, num_warmup_steps=5, num_training_steps=30)
    cosine = torch.tensor([sched.lr_lambdas[0](s) for s in range(40)], dtype=torch.float64)

    # accumulation reference: one AdamW step of y = x w^T on 8 samples (the big batch)
    w = torch.randn(3, 4, generator=g)
    x = torch.randn(8, 4, generator=g)
    y = torch.randn(8, 3, generator=g)
    wp = torch.nn.Parameter(w.clone())
    acc_opt = torch.optim.AdamW([wp], lr=1e-2, betas=(0.9, 0.98), weight_decay=0.01, foreach=False)
    F.mse_loss(x @ wp.T, y).backward()
    acc_opt.step()
    # SGD with Nesterov momentum 0.9 and weight decay 0.01: two steps from acc.w on the same batch
    sp = torch.nn.Parameter(w.clone())
    sgd = torch.optim.SGD([sp], lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, foreach=False)
    for _ in range(2):
        sgd.zero_grad()
        F.mse_loss(x @ sp.T, y).backward()
        sgd.step()
    save_file({"cosine": cosine, "acc.w": w, "acc.x": x, "acc.y": y, "acc.w_after": wp.detach().clone(),
               "sgd.w_after2": sp.detach().clone()},
              os.path.join(out, "schedule.safetensors"), metadata=META)
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(out) for f in fs) / 1024
    print(f"train_llama_step: {size:.1f} KB; losses {expected['loss.0'].item():.6f} {expected['loss.1'].item():.6f}, "
          f"grad norms {expected['grad_norm.0'].item():.4f} {expected['grad_norm.1'].item():.4f}")


def main():
    check_versions()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    llama_step()


if __name__ == "__main__":
    main()
