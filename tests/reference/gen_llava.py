"""Reference fixtures for mgm's LLaVA: tiny random LlavaForConditionalGeneration models.

Each case is a transformers LlavaForConditionalGeneration (CLIP vision tower, 2-layer LLaMA text
model with GQA) built from a config, given seeded random weights (matrices std 1/sqrt(fan_in),
LayerNorm / RMSNorm weights 1 + 0.2 N(0, 1), biases and embeddings as noted in `randomize`), saved
with `save_pretrained` (transformers 5.23 writes llava-hf's layout: `vision_tower.*`,
`multi_modal_projector.linear_{1,2}.*`, `language_model.model.*`, `language_model.lm_head.*`) and
loaded back before the expected values are computed. float32, CPU, eval, inference_mode.

Cases (28 x 28 images, patch 14: 4 patches + CLS per image):
- llava_default: vision_feature_layer -2, select strategy 'default' (CLS dropped): 4 tokens
  per image.
- llava_full: vision_feature_layer -1, strategy 'full' (CLS kept): 5 tokens per image.
- llava_layers: vision_feature_layer [-3, -1] (two layers concatenated on channels), 'default'.

Each holds, for one prompt with one image and one with two:
- inputs_1.safetensors / inputs_2.safetensors: `input_ids` int64 [1, T] with config.image_token_id
  repeated once per image feature (as transformers expects; image tokens where a `<image>` was,
  text ids elsewhere) and `pixel_values` float32 [n_images, 3, 28, 28] (N(0, 1) noise).
- expected_1.safetensors / expected_2.safetensors: `logits` float32 [1, T, V] from
  `model(input_ids=..., pixel_values=...)`, and `image_features` [n_images, tokens, hidden] from
  `model.get_image_features(pixel_values)` (the projected features spliced in).

Run through `cargo xtask reference` (pinned versions of requirements.txt). Deterministic.
"""

import json
import math
import os
import shutil
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

PINNED = {
    "torch": (torch.__version__, "2.15.0"),
    "transformers": (transformers.__version__, "5.23.0"),
}
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
META = {"generator": f"gen_llava.py, torch {PINNED['torch'][1]}, transformers {PINNED['transformers'][1]}"}
VOCAB = 96
IMAGE_TOKEN = VOCAB - 1


def check_versions():
    for name, (have, want) in PINNED.items():
        if have.split("+")[0] != want:
            sys.exit(f"{name} {want} is pinned, found {have}")


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "layrnorm" in name):
                if name.endswith("bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                # biases and the class embedding
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("position_embedding.weight"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def case(name, feature_layer, strategy, seed):
    vc = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                          image_size=28, patch_size=14, projection_dim=16, hidden_act="quick_gelu")
    tc = LlamaConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, head_dim=6)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN,
                      vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                      projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    randomize(model, seed)
    out = os.path.normpath(os.path.join(FIXTURES, name))
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    model.save_pretrained(out)
    for f in os.listdir(out):
        if f not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(out, f))
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    per_image = 4 if strategy == "default" else 5
    g = torch.Generator().manual_seed(seed + 1)
    for n_images in (1, 2):
        ids = [1]
        for i in range(n_images):
            ids += torch.randint(3, VOCAB - 1, (3,), generator=g).tolist()
            ids += [IMAGE_TOKEN] * per_image
        ids += torch.randint(3, VOCAB - 1, (4,), generator=g).tolist()
        input_ids = torch.tensor([ids], dtype=torch.int64)
        pixel_values = torch.randn(n_images, 3, 28, 28, generator=g)
        with torch.inference_mode():
            logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
            feats = model.get_image_features(pixel_values=pixel_values)
            feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
            if isinstance(feats, (list, tuple)):
                feats = torch.stack(list(feats))
        save_file({"input_ids": input_ids, "pixel_values": pixel_values},
                  os.path.join(out, f"inputs_{n_images}.safetensors"), metadata=META)
        save_file({"logits": logits.contiguous(), "image_features": feats.reshape(n_images, per_image, -1).contiguous()},
                  os.path.join(out, f"expected_{n_images}.safetensors"), metadata=META)
    kb = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 1024
    print(f"{name}: {per_image} tokens per image, {kb:.1f} KB")


def main():
    check_versions()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    case("llava_default", -2, "default", 31)
    case("llava_full", -1, "full", 32)
    case("llava_layers", [-3, -1], "default", 33)


if __name__ == "__main__":
    main()
