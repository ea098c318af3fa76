"""The model of `cargo bench -p mgm-benches --bench mgm`: an MGM with MGM-2B's shapes and random weights.

    target/reference-venv/bin/python benches/peers/mgm_model.py target/mgm-bench-model

Writes, in MGM's checkpoint layout (DESIGN.md section 1; what `mgm::minigemini::Mgm::from_dir` and
benches/peers/mgm_torch.py both load):

  config.json                 Gemma-2B's config (hidden 2048, 18 layers, 8 heads of 256, one KV head,
                              MLP 16384, vocab 256000, tied embeddings) with model_type mgm_gemma and
                              MGM-2B's mm_* keys: towers `clip` and `convnext`, mlp2x_gelu projector,
                              select layer -2 'patch', image_size_aux 768, the normal variant.
  model-0000k-of-0000N.safetensors + model.safetensors.index.json
                              the decoder (`model.*`), `model.mm_projector.{0,2}.*` and
                              `model.vlm_uni_{query,aux,val}_projector.{0,1}.*` (9.9 GB in f32), in
                              shards of about 1.8 GB so that no more than one shard is in memory here.
  clip/                       transformers CLIPVisionModel, CLIP ViT-L/14-336 shapes (24 layers, width
                              1024, 16 heads, MLP 4096, quick_gelu), save_pretrained.
  convnext/open_clip_model.safetensors
                              timm convnext_large (OpenCLIP convnext_large_d_320's trunk: depths 3, 3,
                              27, 3, dims 192, 384, 768, 1536) under OpenCLIP's names `visual.trunk.*`,
                              without the head (MGM drops it).

Decoder and fusion weights are seeded normals (std 0.02 for matrices, small norm weights around
Gemma's (1 + w) = 1); the towers keep the libraries' default initialisation. The speed of f32 and
quantized kernels does not depend on the values. Deterministic; skips the work when
`config.json` is already there (delete the directory to rewrite it).
"""

import json
import os
import sys

os.environ["CUDA_VISIBLE_DEVICES"] = ""

import timm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModel  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB = 2048, 18, 8, 1, 256, 16384, 256000
CLIP_WIDTH, HR_DIMS = 1024, [192, 384, 768, 1536]
SHARD_BYTES = 1800 << 20


def decoder_config():
    """Gemma-2B's config.json keys, as transformers writes them."""
    return {
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": MLP, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": True,
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "initializer_range": 0.02,
    }


def tensor_specs():
    """(name, shape, kind) of every decoder and fusion tensor, in file order."""
    specs = [("model.embed_tokens.weight", (VOCAB, HIDDEN), "matrix")]
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        specs += [
            (f"{p}.input_layernorm.weight", (HIDDEN,), "rmsnorm"),
            (f"{p}.self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN), "matrix"),
            (f"{p}.self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), "matrix"),
            (f"{p}.self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), "matrix"),
            (f"{p}.self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM), "matrix"),
            (f"{p}.post_attention_layernorm.weight", (HIDDEN,), "rmsnorm"),
            (f"{p}.mlp.gate_proj.weight", (MLP, HIDDEN), "matrix"),
            (f"{p}.mlp.up_proj.weight", (MLP, HIDDEN), "matrix"),
            (f"{p}.mlp.down_proj.weight", (HIDDEN, MLP), "matrix"),
        ]
    specs.append(("model.norm.weight", (HIDDEN,), "rmsnorm"))
    d_hr = sum(HR_DIMS)
    for which, fan_in in [("query", CLIP_WIDTH), ("aux", d_hr), ("val", d_hr)]:
        specs += [
            (f"model.vlm_uni_{which}_projector.0.weight", (fan_in,), "lnweight"),
            (f"model.vlm_uni_{which}_projector.0.bias", (fan_in,), "bias"),
            (f"model.vlm_uni_{which}_projector.1.weight", (CLIP_WIDTH, fan_in), "matrix"),
            (f"model.vlm_uni_{which}_projector.1.bias", (CLIP_WIDTH,), "bias"),
        ]
    specs += [
        ("model.mm_projector.0.weight", (HIDDEN, CLIP_WIDTH), "matrix"),
        ("model.mm_projector.0.bias", (HIDDEN,), "bias"),
        ("model.mm_projector.2.weight", (HIDDEN, HIDDEN), "matrix"),
        ("model.mm_projector.2.bias", (HIDDEN,), "bias"),
    ]
    return specs


def value(shape, kind, g):
    x = torch.randn(shape, generator=g)
    if kind == "matrix":
        return x.mul_(0.02)
    if kind == "lnweight":
        return x.mul_(0.1).add_(1.0)
    return x.mul_(0.01)  # rmsnorm (Gemma's w in (1 + w)) and biases


def write_decoder(out):
    g = torch.Generator().manual_seed(2024)
    specs = tensor_specs()
    shards, cur, size = [], [], 0
    for s in specs:
        n = 4 * int(torch.tensor(s[1]).prod())
        if cur and size + n > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append(s)
        size += n
    shards.append(cur)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: value(shape, kind, g) for n, shape, kind in shard}
        total += sum(t.numel() * 4 for t in tensors.values())
        save_file(tensors, os.path.join(out, name), metadata={"format": "pt"})
        weight_map.update({n: name for n in tensors})
        del tensors
        print(f"{name}: {len(shard)} tensors", file=sys.stderr)
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_towers(out):
    torch.manual_seed(0)
    vc = CLIPVisionConfig(hidden_size=CLIP_WIDTH, intermediate_size=4096, num_hidden_layers=24,
                          num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu",
                          layer_norm_eps=1e-5)
    CLIPVisionModel(vc).eval().save_pretrained(os.path.join(out, "clip"))
    trunk = timm.create_model("convnext_large", pretrained=False, num_classes=0).eval()
    os.makedirs(os.path.join(out, "convnext"), exist_ok=True)
    state = {"visual.trunk." + k: v.contiguous() for k, v in trunk.state_dict().items() if not k.startswith("head.")}
    save_file(state, os.path.join(out, "convnext", "open_clip_model.safetensors"), metadata={"format": "pt"})


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "target/mgm-bench-model"
    if os.path.exists(os.path.join(out, "config.json")):
        print(f"{out} is already written", file=sys.stderr)
        return
    os.makedirs(out, exist_ok=True)
    write_towers(out)
    write_decoder(out)
    cfg = decoder_config()
    cfg.update({
        "architectures": ["MGMGemmaForCausalLM"], "model_type": "mgm_gemma",
        "mm_vision_tower": "clip", "mm_vision_tower_aux": "convnext", "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": CLIP_WIDTH, "mm_hidden_size_aux": sum(HR_DIMS), "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "image_size_aux": 768, "image_grid": 1, "image_global": False,
        "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
    })
    # config.json last: its presence marks a complete directory
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
