"""Writes the random-weight TinyLlama-1.1B-shaped model of `cargo bench -p mgm-benches --bench decode`.

    target/decode-venv/bin/python benches/peers/decode_model.py [DIR] [--force] [--seed S] [--only ...]

DIR (default target/decode-model) receives

  hf/config.json, hf/model.safetensors   a transformers LlamaForCausalLM checkpoint (f32, one file,
                                         metadata {"format": "pt"}) with TinyLlama-1.1B's config:
                                         vocab 32000, hidden 2048, intermediate 5632, 22 layers,
                                         32 heads, 4 KV heads (head_dim 64), rms_norm_eps 1e-5,
                                         rope_theta 10000, max_position_embeddings 2048, untied
                                         lm_head, bos 1, eos 2.
  model-f32.gguf                         the same weights for llama.cpp, every tensor f32.
  model-q8_0.gguf                        2-D linear weights and output.weight in Q8_0.
  model-q4_0.gguf                        2-D linear weights in Q4_0, output.weight in Q8_0.
  manifest.json                          per file: bytes on disk, tensor-data bytes, bytes read
                                         per decoded token, and the settings it was written with.

Weights: transformers' default init for LLaMA, drawn with numpy (no torch needed): every Linear
and the embedding ~ N(0, 0.02) (initializer_range), every RMSNorm weight 1. Tensor i in the fixed
order below is drawn from np.random.default_rng([seed, i]), so a rerun writes the same bytes.

The GGUF files are converted from hf/model.safetensors the way llama.cpp's convert_hf_to_gguf.py
does for LlamaForCausalLM: HF names mapped to token_embd / blk.N.{attn_norm, attn_q, attn_k,
attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down} / output_norm / output; attn_q and
attn_k rows permuted from HF's rotate-half RoPE layout to GGML's interleaved one
(`LlamaModel.permute`: reshape(n_head, 2, head_dim / 2, hidden).swapaxes(1, 2), with n_head = 4
for k), so llama.cpp computes the same logits as transformers; the quantized blocks are
gguf.quants.quantize's (bit-exact with ggml's reference quantizers). Metadata: general.architecture
llama and the llama.* hyper-parameters, general.file_type (0 ALL_F32, 7 MOSTLY_Q8_0, 2 MOSTLY_Q4_0),
and an SPM ("llama") vocab laid out like LLaMA's own: 0 <unk>, 1 <s>, 2 </s>, 3..258 the byte
tokens <0x00>..<0xFF>, 259..31999 dummy pieces "▁t259".. (we only feed token ids).

Which tensors are quantized (decided for the bench; llama.cpp's own tools differ slightly):
  - token_embd.weight stays f32 in every file (a decoded token reads one row of it, so its type
    does not move decode speed). convert_hf_to_gguf --outtype q8_0 would store it Q8_0 and
    llama-quantize Q4_0 would store it Q4_0.
  - output.weight is Q8_0 in the q8_0 file (as convert_hf_to_gguf --outtype q8_0 does) and also
    Q8_0 in the q4_0 file. llama-quantize's Q4_0 stores it Q6_K instead (llama-quant.cpp: output
    of a non-Q8_0 ftype -> Q6_K), but gguf 0.19 cannot quantize Q6_K, and Q8_0 is what mgm's q4
    path keeps for lm_head too; it costs 69.6 MB vs 53.8 MB of Q6_K per token.
  - 1-D norm weights stay f32 (as in every llama.cpp file).

Files are written to NAME.tmp and renamed when complete; a file is skipped when it exists with the
size manifest.json recorded for the same settings, unless --force. Rewriting hf/ rewrites the
GGUF files too. Needs numpy, safetensors and gguf (benches/peers/requirements-decode.txt); about
11 GB of disk and 5 GB of memory, a few minutes on 2 cores.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from safetensors import safe_open

import gguf
from gguf import GGMLQuantizationType as QT

FORMAT = 1  # bump when the bytes written change, so that old files are rewritten

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "dtype": "float32",
    "eos_token_id": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5632,
    "max_position_embeddings": 2048,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 22,
    "num_key_value_heads": 4,
    "pad_token_id": None,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "tie_word_embeddings": False,
    "transformers_version": "5.23.0",
    "use_cache": True,
    "vocab_size": 32000,
}

# What LlamaConfig(...).to_json_string() of transformers 5.23 writes for these settings (checked);
# older transformers read rope_theta from the top level, so it is there too.
CONFIG_JSON = {**CONFIG, "rope_theta": 10000.0}

GGUF_FILES = {
    # name: (file, general.file_type, type of 2-D linear weights, type of output.weight)
    "f32": ("model-f32.gguf", gguf.LlamaFileType.ALL_F32, QT.F32, QT.F32),
    "q8_0": ("model-q8_0.gguf", gguf.LlamaFileType.MOSTLY_Q8_0, QT.Q8_0, QT.Q8_0),
    "q4_0": ("model-q4_0.gguf", gguf.LlamaFileType.MOSTLY_Q4_0, QT.Q4_0, QT.Q8_0),
}


def hf_tensors(c):
    """(name, shape, kind) of every HF tensor, in the order they are drawn (kind: normal or ones)."""
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    out = [("model.embed_tokens.weight", (v, h), "normal")]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,), "ones"),
            (p + "self_attn.q_proj.weight", (h, h), "normal"),
            (p + "self_attn.k_proj.weight", (kv, h), "normal"),
            (p + "self_attn.v_proj.weight", (kv, h), "normal"),
            (p + "self_attn.o_proj.weight", (h, h), "normal"),
            (p + "post_attention_layernorm.weight", (h,), "ones"),
            (p + "mlp.gate_proj.weight", (f, h), "normal"),
            (p + "mlp.up_proj.weight", (f, h), "normal"),
            (p + "mlp.down_proj.weight", (h, f), "normal"),
        ]
    out += [("model.norm.weight", (h,), "ones"), ("lm_head.weight", (v, h), "normal")]
    return out


def gguf_name(hf):
    """llama.cpp's tensor name for an HF LLaMA tensor name."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, i, rest = hf.split(".", 3)
    part = {"input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "attn_q",
            "self_attn.k_proj.weight": "attn_k", "self_attn.v_proj.weight": "attn_v",
            "self_attn.o_proj.weight": "attn_output", "post_attention_layernorm.weight": "ffn_norm",
            "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up",
            "mlp.down_proj.weight": "ffn_down"}[rest]
    return f"blk.{i}.{part}.weight"


def permute(w, n_head):
    """convert_hf_to_gguf's LlamaModel.permute: HF rotate-half rows -> GGML interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_type(name, linear_type, output_type):
    """The GGML type a tensor is stored in (see the module docstring)."""
    if name == "token_embd.weight" or not name.endswith(".weight") or name.endswith("_norm.weight"):
        return QT.F32
    if name == "output.weight":
        return output_type
    return linear_type


def nbytes(shape, qtype):
    """Bytes of a tensor of `shape` stored as `qtype`."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    assert n % block == 0
    return n // block * size


def load_manifest(out):
    path = out / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def save_manifest(out, manifest):
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / "manifest.json")


def up_to_date(out, manifest, key, settings):
    """True when manifest[key] was written with `settings` and its file has the recorded size."""
    entry = manifest.get(key)
    if not entry or entry.get("settings") != settings:
        return False
    path = out / entry["file"]
    return path.is_file() and path.stat().st_size == entry["file_bytes"]


def write_hf(out, seed):
    """hf/config.json and hf/model.safetensors; returns (file bytes, tensor bytes).

    The safetensors file is written tensor by tensor (header first, as the format lays it out:
    u64 header length, JSON header padded with spaces to 8 bytes, then the raw little-endian
    data in header order), so that only one tensor is in memory at a time."""
    hf = out / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    std = np.float32(CONFIG["initializer_range"])
    plan = hf_tensors(CONFIG)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in plan:
        n = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    (hf / "config.json.tmp").write_text(json.dumps(CONFIG_JSON, indent=2, sort_keys=True) + "\n")
    os.replace(hf / "config.json.tmp", hf / "config.json")
    (hf / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "transformers_version": "5.23.0"}, indent=2) + "\n")
    tmp = hf / "model.safetensors.tmp"
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for i, (name, shape, kind) in enumerate(plan):
            if kind == "ones":
                t = np.ones(shape, dtype=np.float32)
            else:
                t = np.random.default_rng([seed, i]).standard_normal(shape, dtype=np.float32)
                t *= std
            t.astype("<f4", copy=False).tofile(f)
    os.replace(tmp, hf / "model.safetensors")
    return (hf / "model.safetensors").stat().st_size, offset


def add_metadata(w, c, file_type):
    w.add_name("mgm-bench random TinyLlama-1.1B")
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_rope_dimension_count(c["head_dim"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_freq_base(c["rope_parameters"]["rope_theta"])
    w.add_vocab_size(c["vocab_size"])
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # SPM vocab with LLaMA's layout; scores descending like a real sentencepiece model.
    n = c["vocab_size"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(len(tokens), n)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (n - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(n - 259)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types([int(t) for t in types])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def write_gguf(out, key):
    """One GGUF file from hf/model.safetensors, streamed tensor by tensor; returns byte counts."""
    fname, file_type, linear, output = GGUF_FILES[key]
    c = CONFIG
    path = out / fname
    tmp = out / (fname + ".tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    add_metadata(w, c, file_type)
    plan = []
    for name, shape, _ in hf_tensors(c):
        gname = gguf_name(name)
        qtype = gguf_type(gname, linear, output)
        plan.append((name, gname, shape, qtype))
        if qtype == QT.F32:
            w.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes(shape, qtype))
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            w.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), nbytes(shape, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    data = per_token = 0
    with safe_open(str(out / "hf" / "model.safetensors"), framework="numpy") as st:
        for name, gname, shape, qtype in plan:
            t = st.get_tensor(name)
            assert t.shape == tuple(shape) and t.dtype == np.float32, (name, t.shape, t.dtype)
            if gname.endswith("attn_q.weight"):
                t = permute(t, c["num_attention_heads"])
            elif gname.endswith("attn_k.weight"):
                t = permute(t, c["num_key_value_heads"])
            t = np.ascontiguousarray(gguf.quants.quantize(t, qtype))
            assert t.nbytes == nbytes(shape, qtype), gname
            w.write_tensor_data(t)
            data += t.nbytes
            # a decoded token reads every tensor whole, except one row of the embedding table
            per_token += t.nbytes // shape[0] if gname == "token_embd.weight" else t.nbytes
    w.close()
    os.replace(tmp, path)
    return path.stat().st_size, data, per_token


def mb(n):
    return f"{n / 1e6:,.1f} MB"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", nargs="?", default="target/decode-model")
    ap.add_argument("--force", action="store_true", help="rewrite files even when up to date")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="+", choices=["hf", *GGUF_FILES], default=None,
                    help="write only these (default: all; GGUF files need hf/)")
    args = ap.parse_args()
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(out)
    wanted = args.only or ["hf", *GGUF_FILES]
    hf_settings = {"format": FORMAT, "seed": args.seed, "config": CONFIG}

    hf_rewritten = False
    if "hf" in wanted:
        if args.force or not up_to_date(out, manifest, "hf", hf_settings):
            t0 = time.perf_counter()
            size, data = write_hf(out, args.seed)
            manifest["hf"] = {"file": "hf/model.safetensors", "file_bytes": size, "weight_bytes": data,
                              "decode_bytes_per_token": data - (CONFIG["vocab_size"] - 1) * CONFIG["hidden_size"] * 4,
                              "settings": hf_settings}
            save_manifest(out, manifest)
            hf_rewritten = True
            print(f"wrote hf/model.safetensors in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        else:
            print("hf/model.safetensors up to date", file=sys.stderr)
    if not (out / "hf" / "model.safetensors").is_file():
        sys.exit(f"{out}/hf/model.safetensors is missing: run without --only first")
    hf_stamp = manifest.get("hf", {}).get("file_bytes")

    for key in GGUF_FILES:
        if key not in wanted:
            continue
        fname, file_type, linear, output = GGUF_FILES[key]
        settings = {"format": FORMAT, "hf": hf_settings, "hf_bytes": hf_stamp, "file_type": int(file_type),
                    "linear": linear.name, "output": output.name, "gguf": gguf_version()}
        if args.force or hf_rewritten or not up_to_date(out, manifest, key, settings):
            t0 = time.perf_counter()
            size, data, per_token = write_gguf(out, key)
            manifest[key] = {"file": fname, "file_bytes": size, "weight_bytes": data,
                             "decode_bytes_per_token": per_token, "settings": settings}
            save_manifest(out, manifest)
            print(f"wrote {fname} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        else:
            print(f"{fname} up to date", file=sys.stderr)

    print(f"{'file':<22} {'on disk':>12} {'weights':>12} {'read/token':>12}")
    for key in ["hf", *GGUF_FILES]:
        e = manifest.get(key)
        if e:
            print(f"{e['file']:<22} {mb(e['file_bytes']):>12} {mb(e['weight_bytes']):>12} "
                  f"{mb(e['decode_bytes_per_token']):>12}")


def gguf_version():
    from importlib.metadata import version
    return version("gguf")


if __name__ == "__main__":
    main()
