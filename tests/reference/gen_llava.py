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



def example():
    """examples/tiny-llava: the README's main command. A tiny LLaVA (random weights, so its
    answers are noise until a trained model replaces it) with the BPE tokenizer of
    tests/fixtures/tokenizer_bpe (vocab 400 + the image token 400), a CLIPImageProcessor
    preprocessor_config.json (28 px), and examples/images/shapes.png (64 x 48: a red square and
    a blue circle on white, drawn with PIL). generate.safetensors holds transformers' greedy
    `generate` for the prompt "<image>\\nWhat colour is the square?": `input_ids` (the chunks
    around the marker tokenized separately, BOS on the first only, the image token once per
    feature), `pixel_values` from the processor, `output_ids` (8 new tokens; every step's best
    logit beats the second by >= 1e-3, the weights seed chosen until it does)."""
    from PIL import Image, ImageDraw
    from transformers import AutoTokenizer, CLIPImageProcessor

    root = os.path.normpath(os.path.join(FIXTURES, "..", "..", "examples"))
    img_dir = os.path.join(root, "images")
    os.makedirs(img_dir, exist_ok=True)
    img = Image.new("RGB", (64, 48), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.rectangle([6, 10, 26, 30], fill=(220, 30, 30))
    d.ellipse([36, 12, 58, 34], fill=(30, 60, 220))
    img_path = os.path.join(img_dir, "shapes.png")
    img.save(img_path, optimize=False)

    tok_src = os.path.normpath(os.path.join(FIXTURES, "tokenizer_bpe"))
    tok = AutoTokenizer.from_pretrained(tok_src)
    vocab = 401
    image_token = 400
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=28, patch_size=14, projection_dim=32, hidden_act="quick_gelu")
    tc = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, head_dim=16,
                     bos_token_id=1, eos_token_id=2, pad_token_id=3)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=image_token, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    pixel_values = processor(images=Image.open(img_path), return_tensors="pt")["pixel_values"]
    prompt = "<image>\nWhat colour is the square?"
    ids = []
    for i, chunk in enumerate(prompt.split("<image>")):
        if i > 0:
            ids += [image_token] * 4
        if chunk or i == 0:
            ids += tok(chunk, add_special_tokens=(i == 0))["input_ids"]
    input_ids = torch.tensor([ids], dtype=torch.int64)
    out = os.path.join(root, "tiny-llava")
    for seed in range(100, 200):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(cfg).eval()
        randomize(model, seed)
        with torch.inference_mode():
            gen = model.generate(input_ids=input_ids, pixel_values=pixel_values, do_sample=False,
                                 max_new_tokens=8, min_new_tokens=8, output_logits=True,
                                 return_dict_in_generate=True)
        margins = [torch.topk(l[0], 2).values for l in gen.logits]
        if all(float(m[0] - m[1]) >= 1e-3 for m in margins) and int(tc.eos_token_id) not in gen.sequences[0, len(ids):].tolist():
            break
    else:
        sys.exit("no seed in 100..200 gives clear greedy margins")
    if os.path.isdir(out):
        shutil.rmtree(out)
    model.save_pretrained(out)
    for f in os.listdir(out):
        if f not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(out, f))
    processor.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_src, f), os.path.join(out, f))
    save_file({"input_ids": input_ids, "pixel_values": pixel_values, "output_ids": gen.sequences},
              os.path.join(out, "generate.safetensors"), metadata=META)
    kb = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 1024
    print(f"examples/tiny-llava: seed {seed}, {kb:.1f} KB; prompt ids {ids}; output {gen.sequences[0, len(ids):].tolist()}")

def main():
    check_versions()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    case("llava_default", -2, "default", 31)
    case("llava_full", -1, "full", 32)
    case("llava_layers", [-3, -1], "default", 33)
    example()


if __name__ == "__main__":
    main()


if __name__ == "__main__":
    main()
