"""Reference fixture for mgm-tensor: forward and gradients of a composite expression in PyTorch.

The expression touches the ops a vision-language model leans on: conv2d (with padding and a
stride), layer_norm, matmul with broadcast batch dims, exact and tanh GELU, softmax, rms_norm,
bilinear interpolation, and cross entropy. It is evaluated in float32 (what users compare
against) and float64 (to check our f64 path tightly), and every input's gradient is saved.

Run through `cargo xtask reference`, which installs the pinned versions from requirements.txt.
Writes tests/fixtures/tensor_composite/{inputs,expected}.safetensors.
"""

import math
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

EXPECTED_TORCH = "2.15.0"


def composite(p):
    """The expression; `p` maps names to leaf tensors. Returns (loss, logits, hidden)."""
    x = p["x"]  # [2, 3, 9, 7]
    h = F.conv2d(x, p["conv_w"], p["conv_b"], stride=(1, 2), padding=1)  # [2, 4, 9, 4]
    h = F.interpolate(h, size=(6, 6), mode="bilinear", align_corners=False)  # [2, 4, 6, 6]
    h = h.flatten(2).transpose(1, 2)  # [2, 36, 4]
    h = F.layer_norm(h, (4,), p["ln_w"], p["ln_b"], eps=1e-5)
    h = F.gelu(h @ p["w1"] + p["b1"])  # [2, 36, 8]
    scores = (h @ h.transpose(-1, -2)) / math.sqrt(h.shape[-1])  # [2, 36, 36]
    attn = torch.softmax(scores, dim=-1)
    h = attn @ h  # [2, 36, 8]
    rms = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * p["rms_w"]
    h = F.gelu(rms, approximate="tanh")
    logits = h.mean(dim=1) @ p["w2"]  # [2, 5]
    loss = F.cross_entropy(logits, p["targets"])
    return loss, logits, h


def main():
    if torch.__version__.split("+")[0] != EXPECTED_TORCH:
        sys.exit(f"torch {EXPECTED_TORCH} is pinned, found {torch.__version__}")
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(__file__), "..", "fixtures", "tensor_composite")
    os.makedirs(out_dir, exist_ok=True)
    g = torch.Generator().manual_seed(1234)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    inputs = {
        "x": randn(2, 3, 9, 7),
        "conv_w": randn(4, 3, 3, 3, scale=0.3),
        "conv_b": randn(4, scale=0.1),
        "ln_w": 1.0 + randn(4, scale=0.1),
        "ln_b": randn(4, scale=0.1),
        "w1": randn(4, 8, scale=0.5),
        "b1": randn(8, scale=0.1),
        "rms_w": 1.0 + randn(8, scale=0.1),
        "w2": randn(8, 5, scale=0.5),
    }
    targets = torch.tensor([3, 1], dtype=torch.int64)
    saved_inputs = {k: v.float().contiguous() for k, v in inputs.items()}
    saved_inputs["targets"] = targets
    expected = {}
    for dtype, tag in ((torch.float32, "f32"), (torch.float64, "f64")):
        leaves = {k: v.to(dtype).requires_grad_(True) for k, v in inputs.items()}
        # f32 leaves are the saved f32 values exactly; f64 leaves are those same values widened
        if dtype == torch.float64:
            leaves = {k: saved_inputs[k].double().requires_grad_(True) for k in inputs}
        loss, logits, hidden = composite({**leaves, "targets": targets})
        loss.backward()
        expected[f"{tag}.loss"] = loss.detach().reshape(1)
        expected[f"{tag}.logits"] = logits.detach()
        expected[f"{tag}.hidden"] = hidden.detach()
        for k, v in leaves.items():
            expected[f"{tag}.grad.{k}"] = v.grad.detach()
    save_file(saved_inputs, os.path.join(out_dir, "inputs.safetensors"),
              metadata={"generator": "gen_tensor_composite.py", "torch": torch.__version__})
    save_file({k: v.contiguous() for k, v in expected.items()}, os.path.join(out_dir, "expected.safetensors"),
              metadata={"generator": "gen_tensor_composite.py", "torch": torch.__version__})
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
