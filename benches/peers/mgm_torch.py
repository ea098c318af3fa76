"""PyTorch side of `cargo bench -p mgm-benches --bench mgm`: the MGM reference forward, eager, f32, CPU.

    target/reference-venv/bin/python benches/peers/mgm_torch.py --model target/mgm-bench-model \
        --threads 2 --new-tokens 16 [--serve]

The model is the directory benches/peers/mgm_model.py writes (MGM-2B's shapes, random weights). It
runs the MGM forward of tests/reference/gen_mgm.py (written from DESIGN.md section 1) on library
modules, vectorized for real sizes (the generator gathers windows with loops, which only suits its
2 x 2 grids):

- low-res input: pixel_values_aux resized bilinearly (align_corners=False) to 336, as MGM derives it;
- X_LR: transformers CLIPVisionModel (sdpa attention, transformers' default), hidden_states[-2]
  without the class token;
- X_HR: timm convnext_large's stem and stages (OpenCLIP's trunk), every stage resized bilinearly to
  the first stage's 192 x 192 grid and concatenated (2880 channels);
- mining: LN+Linear Q, K, V; each of the 24 x 24 tokens attends to its 8 x 8 window (one reshape
  and permute); NaN scores as 0; residual; mlp2x_gelu into 2048;
- splice: the text ids embedded by Gemma (scaled by sqrt(2048) inside the embedding, transformers
  5.x) and the image rows scaled by the same factor, passed as inputs_embeds;
- transformers GemmaForCausalLM (sdpa), a DynamicCache, logits_to_keep=1, greedy argmax.

Its weights are the safetensors files memory-mapped (torch.UntypedStorage.from_file, shared), so
that this process and the mgm one map the same page-cache pages instead of holding two 10 GB
copies in a 24 GB machine; the towers (2 GB) are loaded into memory.

One measurement: time to first token (image preprocessing from the normalized 768 px tensor,
both towers, mining, projector, splicing, prefill of the spliced prompt, the first argmax), then
--new-tokens greedy decode steps timed as tokens / second. The prompt and the image are defined in
benches/benches/mgm.rs's doc (the same on both sides). --serve: load, warm up once, print
{"ready": true, ...versions}, then answer every `run` line on stdin with {"ttft_ms": .., "decode_tok_s":
.., "peak_rss_mb": .., "tokens": [..]} until `quit` or EOF. Only JSON goes to stdout.
"""

import argparse
import json
import math
import os
import sys
import time

os.environ["CUDA_VISIBLE_DEVICES"] = ""

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import CLIPVisionModel, DynamicCache, GemmaConfig, GemmaForCausalLM  # noqa: E402

IMAGE = -200
TEXT_BEFORE, TEXT_AFTER = 8, 16


def prompt_ids(vocab):
    """BOS, 8 ids, the image placeholder, 16 ids; ids from the 64-bit LCG of mgm.rs."""
    x, ids = 0x2545F491, []
    for _ in range(TEXT_BEFORE + TEXT_AFTER):
        x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        ids.append(256 + (x >> 33) % (vocab - 256))
    return [2] + ids[:TEXT_BEFORE] + [IMAGE] + ids[TEXT_BEFORE:]


def image(size):
    """The normalized high-res input [1, 3, size, size]: ((131 c + 31 y + 17 x) mod 255) / 127.5 - 1."""
    c = torch.arange(3).view(3, 1, 1)
    y = torch.arange(size).view(1, size, 1)
    x = torch.arange(size).view(1, 1, size)
    return (((131 * c + 31 * y + 17 * x) % 255).float() / 127.5 - 1.0)[None]


def mmap_safetensors(path):
    """Every tensor of a safetensors file as a view of one shared memory map of it (f32 only)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=os.path.getsize(path))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            sys.exit(f"{path}: {name} is {info['dtype']}, this peer maps f32 only")
        start, _ = info["data_offsets"]
        t = torch.empty(0, dtype=torch.float32)
        t.set_(storage, (base + start) // 4, info["shape"])
        out[name] = t
    return out


class Mgm:
    def __init__(self, d):
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(d, "model.safetensors.index.json")) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for name in files:
            state.update(mmap_safetensors(os.path.join(d, name)))
        self.mm = {k: v for k, v in state.items() if "vlm_uni_" in k or "mm_projector" in k}
        keys = {k for k in GemmaConfig().to_dict()} | {"head_dim", "hidden_activation"}
        gc = GemmaConfig(**{k: v for k, v in cfg.items() if k in keys and k != "model_type"})
        # built on the meta device, then given the mapped tensors (assign: no copy)
        with torch.device("meta"):
            llm = GemmaForCausalLM(gc)
        llm.load_state_dict({k: v for k, v in state.items() if k not in self.mm}, strict=False, assign=True)
        llm.lm_head.weight = llm.model.embed_tokens.weight
        # the buffers a checkpoint does not hold, made on the CPU
        llm.model.rotary_emb = type(llm.model.rotary_emb)(config=gc)
        llm.model.embed_tokens.register_buffer("embed_scale", torch.tensor(gc.hidden_size ** 0.5), persistent=False)
        meta = [n for n, t in list(llm.named_parameters()) + list(llm.named_buffers()) if t.is_meta]
        if meta:
            sys.exit(f"not loaded: {meta[:5]}")
        self.llm = llm.eval()
        self.hidden = gc.hidden_size
        self.clip = CLIPVisionModel.from_pretrained(os.path.join(d, "clip"), dtype=torch.float32).eval()
        self.trunk = timm.create_model("convnext_large", pretrained=False, num_classes=0).eval()
        trunk_state = load_file(os.path.join(d, "convnext", "open_clip_model.safetensors"))
        missing, _ = self.trunk.load_state_dict(
            {k.removeprefix("visual.trunk."): v for k, v in trunk_state.items()}, strict=False)
        if [k for k in missing if not k.startswith("head.")]:
            sys.exit(f"convnext weights missing: {missing[:5]}")
        self.size_aux = cfg["image_size_aux"]
        self.size = self.clip.config.image_size
        self.vocab = gc.vocab_size

    def image_tokens(self, aux):
        low = F.interpolate(aux, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x_lr = self.clip(pixel_values=low, output_hidden_states=True).hidden_states[-2][:, 1:]
        x = self.trunk.stem(aux)
        stages = []
        for stage in self.trunk.stages:
            x = stage(x)
            stages.append(x)
        size = stages[0].shape[-2:]
        x_hr = torch.cat([F.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in stages], 1)
        n, c, hh, _ = x_hr.shape
        g = int(math.isqrt(x_lr.shape[1]))
        m = hh // g
        windows = x_hr.reshape(n, c, g, m, g, m).permute(0, 2, 4, 3, 5, 1).reshape(n, g * g, m * m, c)
        p = self.mm

        def norm_linear(which, t):
            pre = f"model.vlm_uni_{which}_projector"
            h = F.layer_norm(t, [t.shape[-1]], p[f"{pre}.0.weight"], p[f"{pre}.0.bias"], 1e-5)
            return F.linear(h, p[f"{pre}.1.weight"], p[f"{pre}.1.bias"])

        q, k, v = norm_linear("query", x_lr), norm_linear("aux", windows), norm_linear("val", windows)
        s = torch.einsum("nwd,nwkd->nwk", q, k) / math.sqrt(q.shape[-1])
        s = torch.where(torch.isnan(s), torch.zeros_like(s), s)
        mined = x_lr + torch.einsum("nwk,nwkd->nwd", s.softmax(-1), v)
        h = F.gelu(F.linear(mined, p["model.mm_projector.0.weight"], p["model.mm_projector.0.bias"]))
        return F.linear(h, p["model.mm_projector.2.weight"], p["model.mm_projector.2.bias"])

    def embeds(self, ids, toks):
        text = [t for t in ids if t != IMAGE]
        emb = self.llm.get_input_embeddings()(torch.tensor([text]))[0]
        scale = torch.tensor(self.hidden ** 0.5, dtype=emb.dtype)
        pieces, ti, img = [], 0, 0
        for t in ids:
            if t == IMAGE:
                pieces.append(toks[img] * scale)
                img += 1
            else:
                pieces.append(emb[ti:ti + 1])
                ti += 1
        return torch.cat(pieces, 0)[None]

    def measure(self, new_tokens):
        ids = prompt_ids(self.vocab)
        aux = image(self.size_aux)
        with torch.inference_mode():
            t0 = time.perf_counter()
            x = self.embeds(ids, self.image_tokens(aux))
            cache = DynamicCache()
            out = self.llm(inputs_embeds=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = int(out.logits[0, -1].argmax())
            ttft = time.perf_counter() - t0
            toks = [tok]
            t1 = time.perf_counter()
            for _ in range(new_tokens):
                out = self.llm(input_ids=torch.tensor([[tok]]), past_key_values=out.past_key_values,
                               use_cache=True, logits_to_keep=1)
                tok = int(out.logits[0, -1].argmax())
                toks.append(tok)
            dec = new_tokens / (time.perf_counter() - t1)
        return {"ttft_ms": ttft * 1e3, "decode_tok_s": dec, "peak_rss_mb": peak_rss_mb(),
                "tokens": toks[:8], "spliced_tokens": x.shape[1]}


def peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="target/mgm-bench-model")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--serve", action="store_true")
    args = ap.parse_args()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library prints go to stderr
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    model = Mgm(args.model)
    first = model.measure(args.new_tokens)  # warm-up: faults the mapped weights in
    info = {"ready": True, "torch": torch.__version__, "transformers": transformers.__version__,
            "timm": timm.__version__, "threads": torch.get_num_threads(), **first}
    out.write(json.dumps(info) + "\n")
    out.flush()
    if not args.serve:
        return
    for line in sys.stdin:
        if line.strip() != "run":
            break
        out.write(json.dumps(model.measure(args.new_tokens)) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
