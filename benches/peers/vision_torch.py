"""PyTorch side of `cargo bench -p mgm-benches --bench vision`: one vision tower, eager, f32, on the CPU.

    target/reference-venv/bin/python benches/peers/vision_torch.py --model clip --threads 8 --iters 10

--model clip      transformers' CLIPVisionModel with CLIP ViT-L/14-336 shapes (hidden 1024, 24 layers,
                  16 heads, MLP 4096, 336 px, patch 14, quick_gelu): one 336x336 image.
--model convnext  transformers' ConvNextModel with ConvNeXt-L shapes (depths 3,3,27,3, dims 192,384,
                  768,1536): one 768x768 image, the resolution MGM runs its high-res tower at.
--threads N       torch.set_num_threads(N): give the same count the mgm side runs with.
--iters K         timed forward passes, after --warmup untimed ones (default 1).
--attn A          transformers attention implementation for CLIP: sdpa (transformers' default) or eager.
--serve           after the warm-up, print one JSON line {"ready": true, ...}, then time one forward
                  pass per `run` line read from stdin and answer {"ms": ...} (until `quit` or EOF),
                  so that the bench can interleave its own rounds with PyTorch's in one run.

Weights are random (the default initialisation; the speed of f32 kernels does not depend on the
values), the input is random, and every pass runs under torch.inference_mode() in eager mode
(no torch.compile). No GPU is used even when one is present. Prints exactly one JSON line on
stdout, e.g.

    {"model": "clip", "ms_best": 512.3, "ms_median": 530.1, "torch": "2.15.0", "threads": 8, ...}

with times in milliseconds per image (batch 1). Everything else (library warnings) goes to stderr.
Install the packages with `pip install -r tests/reference/requirements.txt` (what `cargo xtask
reference` puts in target/reference-venv).
"""

import argparse
import json
import os
import statistics
import sys
import time

# Hidden before torch loads, so that nothing initialises CUDA even on a GPU machine.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModel, ConvNextConfig, ConvNextModel  # noqa: E402


def build(name, attn):
    """The model and its input for `name`."""
    if name == "clip":
        config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14,
                                  hidden_act="quick_gelu", layer_norm_eps=1e-5)
        config._attn_implementation = attn
        model = CLIPVisionModel(config)
        size = 336
    elif name == "convnext":
        config = ConvNextConfig(depths=[3, 3, 27, 3], hidden_sizes=[192, 384, 768, 1536], image_size=768)
        model = ConvNextModel(config)
        size = 768
    else:
        raise ValueError(name)
    model = model.to(torch.float32).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return model, x


def info(args, x):
    """The run's settings, reported with the timings."""
    return {
        "model": args.model,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "input": list(x.shape),
        "attn": args.attn if args.model == "clip" else None,
        "transformers": transformers.__version__,
    }


def serve(model, x, args):
    """Times one forward pass per `run` request on stdin."""
    with torch.inference_mode():
        for _ in range(args.warmup):
            model(pixel_values=x)
        sys.stdout.write(json.dumps({"ready": True, **info(args, x)}) + "\n")
        sys.stdout.flush()
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "quit":
                break
            if cmd != "run":
                sys.stdout.write(json.dumps({"error": f"unknown command {cmd!r}"}) + "\n")
                sys.stdout.flush()
                continue
            start = time.perf_counter()
            model(pixel_values=x)
            ms = (time.perf_counter() - start) * 1e3
            sys.stdout.write(json.dumps({"ms": round(ms, 3)}) + "\n")
            sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["clip", "convnext"], required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--iters", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--serve", action="store_true")
    args = ap.parse_args()
    if args.threads < 1 or args.iters < 1 or args.warmup < 0:
        ap.error("--threads and --iters must be >= 1, --warmup >= 0")

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    model, x = build(args.model, args.attn)
    if args.serve:
        serve(model, x, args)
        return
    times = []
    with torch.inference_mode():
        for i in range(args.warmup + args.iters):
            start = time.perf_counter()
            out = model(pixel_values=x)
            elapsed = time.perf_counter() - start
            if i >= args.warmup:
                times.append(elapsed * 1e3)
    shape = list(out.last_hidden_state.shape)
    report = {
        "model": args.model,
        "ms_best": round(min(times), 3),
        "ms_median": round(statistics.median(times), 3),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "iters": args.iters,
        "warmup": args.warmup,
        "input": list(x.shape),
        "output": shape,
        "attn": args.attn if args.model == "clip" else None,
        "transformers": transformers.__version__,
    }
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
