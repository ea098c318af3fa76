"""Peers of `cargo bench -p mgm-benches --bench decode`: llama.cpp and PyTorch decoding one LLaMA on the CPU.

Setup (once; the llama-cpp-python build compiles llama.cpp from source, ~15 minutes on 2 cores):

    python3 -m venv target/decode-venv
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
        -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON \
        -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
        -DGGML_AMX_BF16=OFF -DGGML_BLAS=OFF" \
        target/decode-venv/bin/pip install --no-binary llama-cpp-python -r benches/peers/requirements-decode.txt
    target/decode-venv/bin/python benches/peers/decode_model.py target/decode-model
    cargo xtask reference        # target/reference-venv with torch, for the PyTorch peer

The flags are GGML_NATIVE's set for this CPU (Sapphire Rapids) without AMX: llama.cpp 0.3.36's
AMX int8 matmul (built by GGML_NATIVE=ON here) segfaults in ggml_backend_amx_mul_mat on any batch
of more than one token (gdb backtrace, Q8_0 and Q4_0 alike), so the prompt could not be evaluated
at all; AMX only serves llama.cpp's batched (prefill) products, its decode path is the same.
On another CPU use its own flags (GGML_NATIVE=ON where AMX is absent).

decode_model.py writes TinyLlama-1.1B-shaped random weights (22 layers, 4.4 GB in f32) as
target/decode-model/hf (transformers, safetensors) and target/decode-model/model-{f32,q8_0,
q4_0}.gguf (the same weights for llama.cpp, q/k permuted as convert_hf_to_gguf.py does).

Usage:

    target/decode-venv/bin/python benches/peers/decode_peers.py --engine llama_cpp \
        --model target/decode-model/model-q8_0.gguf --threads 2 --prompt-tokens 128 --new-tokens 32
    target/reference-venv/bin/python benches/peers/decode_peers.py --engine torch \
        --model target/decode-model/hf --threads 2 --prompt-tokens 128 --new-tokens 32 [--serve]

One measurement is: (a) prefill: evaluate the P prompt ids from an empty KV cache, keeping only the
last position's logits, timed as P / seconds; then (b) decode: G greedy steps, each one
single-token evaluation plus an argmax over the 32000 logits (done here, in numpy or torch), timed
as G / seconds for the whole loop. Model loading is never timed.

--engine llama_cpp  llama-cpp-python's Llama on a GGUF file: n_threads = n_threads_batch = N,
                    n_ctx = P + G rounded up to 256, n_batch = n_ubatch = max(512, P) (the prompt is
                    one batch), use_mmap, F16 KV cache (llama.cpp's default), flash attention on
                    (--flash-attn; llama.cpp's own default 'auto' resolves to on for the CPU).
--engine torch      transformers' LlamaForCausalLM from an HF directory in f32, torch.set_num_threads(N),
                    torch.inference_mode(), eager (no torch.compile), attention --attn (default
                    sdpa, transformers' default), a DynamicCache, logits_to_keep=1.
--model PATH        the .gguf file (llama_cpp) or the HF directory (torch); a decode_model.py output
                    directory works for torch too (its hf/ is used).
--threads N         the thread count; give the one the mgm side runs with.
--prompt-tokens P   prompt length; --new-tokens G: greedy steps after it.
--serve             load, warm up once, print one JSON line {"ready": true, "engine": ..., versions,
                    settings}, then answer each `run` line on stdin with one measurement
                    {"prefill_tok_s": x, "decode_tok_s": y, "peak_rss_mb": z, "prefill_ms": ..,
                    "decode_ms": .., "tokens": [first generated ids]} until `quit` or EOF. peak_rss_mb is the
                    process's VmHWM so far (/proc/self/status).
without --serve     load, warm up once (--warmup), measure --iters times (default 3) and print one
                    JSON line with the best of each rate (and the medians).

The prompt is P fixed ids, the same for both engines and easy to reproduce elsewhere:
x0 = 0x2545F491, x(i+1) = (x(i) * 6364136223846793005 + 1442695040888963407) mod 2^64,
id(i) = 259 + (x(i+1) >> 33) mod (32000 - 259); ids below 259 are <unk>, <s>, </s> and the byte
pieces. Only JSON goes to stdout: file descriptor 1 is pointed at stderr while this script runs
(llama.cpp and torch print there) and the answers are written to a private copy of the original.
No GPU is used even when one is present.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# Hidden before torch loads, so that nothing initialises CUDA even on a GPU machine.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

# Answers go to a private copy of stdout; everything else that writes to fd 1 lands on stderr.
_OUT = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr

import numpy as np  # noqa: E402

VOCAB = 32000
FIRST_NORMAL = 259
MASK64 = (1 << 64) - 1


def prompt_ids(n):
    """The fixed prompt (a 64-bit LCG, see the module docstring)."""
    x, out = 0x2545F491, []
    for _ in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) & MASK64
        out.append(FIRST_NORMAL + (x >> 33) % (VOCAB - FIRST_NORMAL))
    return out


def peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def emit(obj):
    _OUT.write(json.dumps(obj) + "\n")
    _OUT.flush()


class LlamaCppPeer:
    def __init__(self, args):
        import ctypes
        import llama_cpp

        self.llama_cpp = llama_cpp
        # llama-cpp-python's own log callback prints every llama.cpp line; keep errors only.
        from llama_cpp import _logger
        _logger.set_verbose(False)
        n_ctx = -(-(args.prompt_tokens + args.new_tokens + 1) // 256) * 256
        n_batch = max(512, args.prompt_tokens)
        self.llm = llama_cpp.Llama(
            model_path=args.model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
            n_threads=args.threads, n_threads_batch=args.threads, use_mmap=True, use_mlock=False,
            n_gpu_layers=0, flash_attn=args.flash_attn == "on", logits_all=False, verbose=False)
        self.ctx = self.llm._ctx.ctx
        self.n_vocab = self.llm.n_vocab()
        self.ctypes = ctypes
        meta = self.llm.metadata
        self.info = {
            "engine": "llama_cpp",
            "llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
            "file_type": meta.get("general.file_type"),
            "n_ctx": n_ctx,
            "n_batch": n_batch,
            "flash_attn": args.flash_attn,
        }

    def last_argmax(self):
        ptr = self.llama_cpp.llama_get_logits_ith(self.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return int(logits.argmax())

    def measure(self, prompt, new_tokens):
        llm = self.llm
        llm.reset()  # n_tokens = 0: eval() drops the whole KV cache first
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = self.last_argmax()
        t1 = time.perf_counter()
        toks = [tok]
        for _ in range(new_tokens):
            llm.eval([tok])
            tok = self.last_argmax()
            toks.append(tok)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, toks


class TorchPeer:
    def __init__(self, args):
        import torch
        import transformers
        from transformers import DynamicCache, LlamaForCausalLM

        self.torch = torch
        self.DynamicCache = DynamicCache
        torch.set_num_threads(args.threads)
        transformers.logging.set_verbosity_error()
        path = Path(args.model)
        if (path / "hf" / "config.json").exists():
            path = path / "hf"
        self.model = LlamaForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation=args.attn).eval()
        self.info = {
            "engine": "torch",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "attn": args.attn,
        }

    def measure(self, prompt, new_tokens):
        torch = self.torch
        model = self.model
        with torch.inference_mode():
            cache = self.DynamicCache(config=model.config)
            ids = torch.tensor([prompt], dtype=torch.long)
            t0 = time.perf_counter()
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            t1 = time.perf_counter()
            toks = [tok]
            for _ in range(new_tokens):
                out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                toks.append(tok)
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1, [int(t) for t in toks]


def one(peer, prompt, args):
    pre, dec, toks = peer.measure(prompt, args.new_tokens)
    return {
        "prefill_tok_s": round(len(prompt) / pre, 3),
        "decode_tok_s": round(args.new_tokens / dec, 3) if args.new_tokens else None,
        "peak_rss_mb": peak_rss_mb(),
        "prefill_ms": round(pre * 1e3, 3),
        "decode_ms": round(dec * 1e3, 3),
        "tokens": toks[:8],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["llama_cpp", "torch"], required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--prompt-tokens", type=int, required=True)
    ap.add_argument("--new-tokens", type=int, required=True)
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--flash-attn", choices=["on", "off"], default="on", help="llama_cpp only")
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="torch only")
    args = ap.parse_args()
    if args.threads < 1 or args.prompt_tokens < 1 or args.new_tokens < 0 or args.iters < 1:
        ap.error("--threads, --prompt-tokens and --iters must be >= 1, --new-tokens >= 0")

    t0 = time.perf_counter()
    peer = LlamaCppPeer(args) if args.engine == "llama_cpp" else TorchPeer(args)
    load_s = time.perf_counter() - t0
    prompt = prompt_ids(args.prompt_tokens)
    info = {
        **peer.info,
        "model": str(args.model),
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "load_s": round(load_s, 3),
    }
    for _ in range(args.warmup):
        peer.measure(prompt, args.new_tokens)

    if args.serve:
        emit({"ready": True, **info, "peak_rss_mb": peak_rss_mb()})
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "quit":
                break
            if cmd != "run":
                emit({"error": f"unknown command {cmd!r}"})
                continue
            emit(one(peer, prompt, args))
        return

    runs = [one(peer, prompt, args) for _ in range(args.iters)]
    pre = [r["prefill_tok_s"] for r in runs]
    dec = [r["decode_tok_s"] for r in runs if r["decode_tok_s"] is not None]
    emit({
        **info,
        "prefill_tok_s": max(pre),
        "decode_tok_s": max(dec) if dec else None,
        "prefill_tok_s_median": statistics.median(pre),
        "decode_tok_s_median": statistics.median(dec) if dec else None,
        "peak_rss_mb": peak_rss_mb(),
        "iters": args.iters,
        "warmup": args.warmup,
        "tokens": runs[-1]["tokens"],
    })


if __name__ == "__main__":
    main()
