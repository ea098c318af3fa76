"""Reference fixture for mgm-fusion: MGM's patch-info mining and its mlp2x_gelu projector.

An independent PyTorch implementation written from the formula of DESIGN.md section 1 (not from
MGM's code): Q = LN+Linear(X_LR), K = LN+Linear(X_HR), V = LN+Linear(X_HR) (LayerNorm eps 1e-5);
low-res token w = pr * G + pc attends to the high-res pixels (pr * M + ir, pc * M + ic), in-window
index ir * M + ic; scores q . k / sqrt(d) with NaN scores set to 0; softmax over the window; mined =
attention-weighted V; T = Linear2(GELU(Linear0(X_LR + mined))). The windows are gathered with an
explicit index loop here (the Rust side reshapes and permutes), so a layout error on either side
shows.

Case fusion_mining: batch 2, low-res grid G = 3 (9 tokens) of width 16, a high-res map of 24
channels at 12 x 12 (M = 4, 16 pixels per window), LLM width 20. Parameters are random (matrices
std 1/sqrt(fan_in), LayerNorm weights 1 + 0.2 N(0, 1), biases 0.1 N(0, 1)) and saved under MGM's
names (`model.vlm_uni_{query,aux,val}_projector.{0,1}.*`, `model.mm_projector.{0,2}.*`).

- weights.safetensors: the parameters, float32.
- inputs.safetensors: `x_lr` [2, 9, 16], `x_hr` [2, 24, 12, 12], `cotangent` [2, 9, 20], float32.
- expected.safetensors: computed in float64 from the float32 inputs: `mined` [2, 9, 16] (X_LR +
  mined, before the projector), `tokens` [2, 9, 20], and `grad.<name>` for x_lr, x_hr and every
  parameter: the gradient of sum(tokens * cotangent).

Run through `cargo xtask reference` (pinned versions of requirements.txt). Deterministic.
"""

import math
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

PINNED = {"torch": (torch.__version__, "2.15.0")}
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
META = {"generator": f"gen_fusion.py, torch {PINNED['torch'][1]}"}

B, G, M, D_LR, D_HR, D_LLM = 2, 3, 4, 16, 24, 20
EPS = 1e-5


def check_versions():
    for name, (have, want) in PINNED.items():
        if have.split("+")[0] != want:
            sys.exit(f"{name} {want} is pinned, found {have}")


def params(g):
    p = {}

    def linear(name, fan_in, fan_out):
        p[f"{name}.weight"] = torch.randn(fan_out, fan_in, generator=g) / math.sqrt(fan_in)
        p[f"{name}.bias"] = torch.randn(fan_out, generator=g) * 0.1

    def norm(name, dim):
        p[f"{name}.weight"] = 1 + 0.2 * torch.randn(dim, generator=g)
        p[f"{name}.bias"] = 0.1 * torch.randn(dim, generator=g)

    for which, fan_in in [("query", D_LR), ("aux", D_HR), ("val", D_HR)]:
        norm(f"model.vlm_uni_{which}_projector.0", fan_in)
        linear(f"model.vlm_uni_{which}_projector.1", fan_in, D_LR)
    linear("model.mm_projector.0", D_LR, D_LLM)
    linear("model.mm_projector.2", D_LLM, D_LLM)
    return p


def forward(p, x_lr, x_hr):
    def norm_linear(which, x):
        pre = f"model.vlm_uni_{which}_projector"
        dim = x.shape[-1]
        h = torch.nn.functional.layer_norm(x, [dim], p[f"{pre}.0.weight"], p[f"{pre}.0.bias"], EPS)
        return h @ p[f"{pre}.1.weight"].T + p[f"{pre}.1.bias"]

    # windows by explicit indices: window w = pr * G + pc, entry ir * M + ic
    rows = []
    for pr in range(G):
        for pc in range(G):
            entries = [x_hr[:, :, pr * M + ir, pc * M + ic] for ir in range(M) for ic in range(M)]
            rows.append(torch.stack(entries, dim=1))  # [B, M*M, C]
    win = torch.stack(rows, dim=1)  # [B, G*G, M*M, C]
    q = norm_linear("query", x_lr)  # [B, N, d]
    k = norm_linear("aux", win)  # [B, N, M*M, d]
    v = norm_linear("val", win)
    scores = torch.einsum("bnd,bnkd->bnk", q, k) / math.sqrt(D_LR)
    scores = torch.where(torch.isnan(scores), torch.zeros_like(scores), scores)
    attn = scores.softmax(-1)
    mined = x_lr + torch.einsum("bnk,bnkd->bnd", attn, v)
    h = mined @ p["model.mm_projector.0.weight"].T + p["model.mm_projector.0.bias"]
    h = torch.nn.functional.gelu(h)
    tokens = h @ p["model.mm_projector.2.weight"].T + p["model.mm_projector.2.bias"]
    return mined, tokens


def main():
    check_versions()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(20261202)
    p32 = params(g)
    x_lr = torch.randn(B, G * G, D_LR, generator=g)
    x_hr = torch.randn(B, D_HR, G * M, G * M, generator=g)
    cot = torch.randn(B, G * G, D_LLM, generator=g)

    leaves = {k: v.double().requires_grad_(True) for k, v in p32.items()}
    xl = x_lr.double().requires_grad_(True)
    xh = x_hr.double().requires_grad_(True)
    mined, tokens = forward(leaves, xl, xh)
    (tokens * cot.double()).sum().backward()

    out = os.path.normpath(os.path.join(FIXTURES, "fusion_mining"))
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    save_file({k: v.contiguous() for k, v in p32.items()}, os.path.join(out, "weights.safetensors"), metadata=META)
    save_file({"x_lr": x_lr, "x_hr": x_hr, "cotangent": cot}, os.path.join(out, "inputs.safetensors"), metadata=META)
    expected = {"mined": mined.detach(), "tokens": tokens.detach(), "grad.x_lr": xl.grad, "grad.x_hr": xh.grad}
    expected.update({f"grad.{k}": v.grad for k, v in leaves.items()})
    save_file({k: v.contiguous() for k, v in expected.items()}, os.path.join(out, "expected.safetensors"), metadata=META)
    kb = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 1024
    print(f"fusion_mining: {len(p32)} parameters, {kb:.1f} KB")


if __name__ == "__main__":
    main()
