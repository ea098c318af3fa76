"""Reference fixtures for mgm-vision: tiny random CLIP ViT and ConvNeXt towers, and image preprocessing.

Every case is a directory under tests/fixtures/:

- clip_quick_gelu, clip_gelu, clip_noprefix: transformers' CLIPVisionModel with random weights,
  saved with `save_pretrained` (config.json + model.safetensors); inputs.safetensors holds
  `pixel_values`, expected.safetensors `last_hidden_state`, `pooler_output` and `hidden_states.0`
  .. `hidden_states.L` as the model returns them with `output_hidden_states=True` (entry 0 is
  the embeddings after pre_layrnorm; last_hidden_state is entry L, before post_layernorm).
  transformers 5.x's CLIPVisionModel saves its keys without a prefix (`embeddings.`, `encoder.`),
  while real CLIP checkpoints (CLIPModel, and CLIPVisionModel saved by transformers 4.x) spell
  them `vision_model.embeddings.` ...; clip_quick_gelu and clip_gelu are rewritten to the
  prefixed spelling and clip_noprefix keeps the unprefixed one, so a loader meets both. Both
  spellings load back into transformers 5.x, which is checked below. clip_gelu also has
  inputs_interp/expected_interp.safetensors: a non-square 48x40 input run with
  `interpolate_pos_encoding=True` (bicubic resize of the position grid).
- convnext_hf, convnext_hf_deep: transformers' ConvNextModel, random weights (layer scale
  included), saved with `save_pretrained`; outputs as for CLIP with 5 NCHW hidden states.
- convnext_timm, convnext_timm_nonorm: the same architecture built by timm (the trunk of
  OpenCLIP's ConvNeXt towers), weights saved under OpenCLIP names `visual.trunk.*`; expected
  outputs come from timm's own modules (stem, each stage, head norm of the mean pool), an
  implementation independent of transformers'. config.json is the equivalent ConvNextConfig.
  The generator maps the weights onto a transformers ConvNextModel and asserts both agree.
  convnext_timm_nonorm has no `visual.trunk.head.norm.*` (MGM drops the head) and no
  `pooler_output`.
- preprocess_*: a PNG or JPEG of an odd size made here, preprocessor_config.json, and
  expected.safetensors: `pixel_values` from CLIPImageProcessor (torchvision backend, the default
  class in transformers 5.x), `pixel_values_pil` from CLIPImageProcessorPil (PIL resize, the
  semantics of transformers 4.x that LLaVA/MGM were trained with), `pixel_values_pad(_pil)` for
  LLaVA's pad path (`Image.open(f).convert("RGB")`, expand2square with the mean colour, then the
  processor), and the decoded u8 images `image_rgb` [H,W,3] (transformers' convert_to_rgb, which
  composites alpha onto white) and `image_rgb_pad` [S,S,3] (what the pad path feeds the processor;
  PIL's convert("RGB") drops alpha without compositing).

Run through `cargo xtask reference`, which installs the pinned versions from requirements.txt.
Deterministic: rerunning rewrites identical files.
"""

import json
import math
import os
import shutil
import sys

import numpy as np
import PIL
import timm
import torch
import torch.nn as nn
import torchvision
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPImageProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    ConvNextConfig,
    ConvNextModel,
)

PINNED = {
    "torch": (torch.__version__, "2.15.0"),
    "transformers": (transformers.__version__, "5.23.0"),
    "timm": (timm.__version__, "1.0.31"),
    "torchvision": (torchvision.__version__, "0.29.2"),
    "pillow": (PIL.__version__, "13.0.0"),
}

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
# one key: safetensors writes a metadata map in no fixed order, and identical reruns need identical bytes
META = {"generator": f"gen_vision.py, torch {PINNED['torch'][1]}, transformers {PINNED['transformers'][1]}"}


def check_versions():
    import open_clip  # only its version is pinned here: the OpenCLIP names are written by hand

    found = dict(PINNED, open_clip=(open_clip.__version__, "3.3.0"))
    for name, (have, want) in found.items():
        if have.split("+")[0] != want:
            sys.exit(f"{name} {want} is pinned, found {have}")


def fresh_dir(name):
    path = os.path.normpath(os.path.join(FIXTURES, name))
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


def save(tensors, path):
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, path, metadata=META)


def randomize(model, seed):
    """Replaces every parameter with seeded random values that keep activations O(1).

    Projections get std 1/sqrt(fan_in); norms get weight 1 + N(0, 0.2) and bias N(0, 0.2) so a
    swapped weight/bias or a missing affine shows; layer scales get N(0, 0.5) instead of 1e-6
    so the residual branches matter.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(t, std, mean=0.0):
        with torch.no_grad():
            t.copy_(torch.randn(t.shape, generator=g) * std + mean)

    done = set()
    for mname, m in model.named_modules():
        own = {n: p for n, p in m.named_parameters(recurse=False)}
        if not own:
            continue
        for pname, p in sorted(own.items()):
            full = f"{mname}.{pname}" if mname else pname
            if isinstance(m, nn.LayerNorm):
                randn(p, 0.2, 1.0 if pname == "weight" else 0.0)
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                randn(p, 1.0 / math.sqrt(p[0].numel()) if pname == "weight" else 0.1)
            elif isinstance(m, nn.Embedding):
                randn(p, 0.5)
            elif pname in ("class_embedding",):
                randn(p, 0.5)
            elif pname in ("layer_scale_parameter", "gamma"):
                randn(p, 0.5)
            else:
                raise SystemExit(f"no init rule for {full} in {type(m).__name__}")
            done.add(full)
    missing = {n for n, _ in model.named_parameters()} - done
    assert not missing, missing


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def clip_case(name, seed, batch, prefix, interp=None, **cfg):
    torch.manual_seed(seed)
    config = CLIPVisionConfig(**cfg)
    model = CLIPVisionModel(config).eval()
    randomize(model, seed)
    out = fresh_dir(name)
    model.save_pretrained(out)
    weights = os.path.join(out, "model.safetensors")
    state = load_file(weights)
    assert all(not k.startswith("vision_model.") for k in state), "save_pretrained added a prefix"
    if prefix:
        state = {"vision_model." + k: v for k, v in state.items()}
    save_file(state, weights, metadata={"format": "pt"})

    g = torch.Generator().manual_seed(seed + 1)
    size = config.image_size
    x = torch.randn(batch, 3, size, size, generator=g)
    with torch.inference_mode():
        o = model(pixel_values=x, output_hidden_states=True)
        # the saved directory, whichever spelling, must load back to the same network
        back = CLIPVisionModel.from_pretrained(out).eval()(pixel_values=x).last_hidden_state
    assert max_diff(back, o.last_hidden_state) == 0.0, f"{name}: reloaded model differs"
    expected = {"last_hidden_state": o.last_hidden_state, "pooler_output": o.pooler_output}
    expected.update({f"hidden_states.{i}": h for i, h in enumerate(o.hidden_states)})
    assert len(o.hidden_states) == config.num_hidden_layers + 1
    save({"pixel_values": x}, os.path.join(out, "inputs.safetensors"))
    save(expected, os.path.join(out, "expected.safetensors"))
    extra = ""
    if interp is not None:
        h, w = interp
        xi = torch.randn(1, 3, h, w, generator=g)
        with torch.inference_mode():
            oi = model(pixel_values=xi, output_hidden_states=True, interpolate_pos_encoding=True)
        ei = {"last_hidden_state": oi.last_hidden_state, "pooler_output": oi.pooler_output}
        ei.update({f"hidden_states.{i}": t for i, t in enumerate(oi.hidden_states)})
        save({"pixel_values": xi}, os.path.join(out, "inputs_interp.safetensors"))
        save(ei, os.path.join(out, "expected_interp.safetensors"))
        extra = f", interp {h}x{w} -> {tuple(oi.last_hidden_state.shape)}"
    keys = "vision_model.*" if prefix else "unprefixed"
    print(f"{name}: CLIP {cfg['hidden_act']} L={config.num_hidden_layers} x{tuple(x.shape)} -> "
          f"{tuple(o.last_hidden_state.shape)}, {len(state)} weights ({keys}){extra}, "
          f"|h|max {o.last_hidden_state.abs().max().item():.2f}, {dir_kb(out)} KB")


def convnext_hf_case(name, seed, batch, depths, hidden_sizes, image):
    torch.manual_seed(seed)
    config = ConvNextConfig(depths=depths, hidden_sizes=hidden_sizes, image_size=image, drop_path_rate=0.0)
    model = ConvNextModel(config).eval()
    randomize(model, seed)
    out = fresh_dir(name)
    model.save_pretrained(out)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, image, image, generator=g)
    with torch.inference_mode():
        o = model(pixel_values=x, output_hidden_states=True)
        back = ConvNextModel.from_pretrained(out).eval()(pixel_values=x).last_hidden_state
    assert max_diff(back, o.last_hidden_state) == 0.0, f"{name}: reloaded model differs"
    assert len(o.hidden_states) == 5
    expected = {"last_hidden_state": o.last_hidden_state, "pooler_output": o.pooler_output}
    expected.update({f"hidden_states.{i}": h for i, h in enumerate(o.hidden_states)})
    save({"pixel_values": x}, os.path.join(out, "inputs.safetensors"))
    save(expected, os.path.join(out, "expected.safetensors"))
    shapes = " ".join("x".join(map(str, h.shape[1:])) for h in o.hidden_states)
    print(f"{name}: ConvNext depths {depths} dims {hidden_sizes} x{tuple(x.shape)} -> {shapes}, "
          f"pooler {tuple(o.pooler_output.shape)}, {dir_kb(out)} KB")


def hf_to_timm(name):
    """The OpenCLIP/timm ConvNeXt trunk name of a transformers ConvNextModel weight."""
    p = name.split(".")
    if p[0] == "embeddings":
        return {"patch_embeddings": "stem.0", "layernorm": "stem.1"}[p[1]] + "." + p[2]
    if p[0] == "layernorm":
        return "head.norm." + p[1]
    # encoder.stages.N.downsampling_layer.I.* / encoder.stages.N.layers.M.<mod>[.*]
    n = p[2]
    if p[3] == "downsampling_layer":
        return f"stages.{n}.downsample.{p[4]}.{p[5]}"
    sub = {"dwconv": "conv_dw", "layernorm": "norm", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2",
           "layer_scale_parameter": "gamma"}[p[5]]
    rest = "." + p[6] if len(p) > 6 else ""
    return f"stages.{n}.blocks.{p[4]}.{sub}{rest}"


def convnext_timm_case(name, seed, batch, depths, dims, image, head_norm):
    torch.manual_seed(seed)
    trunk = timm.create_model("convnext_large", pretrained=False, depths=depths, dims=dims,
                              num_classes=0, drop_path_rate=0.0).eval()
    randomize(trunk, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, image, image, generator=g)
    with torch.inference_mode():
        hs = [trunk.stem(x)]
        for stage in trunk.stages:
            hs.append(stage(hs[-1]))
        assert max_diff(hs[-1], trunk.forward_features(x)) == 0.0
        pooled = trunk.forward_head(trunk.forward_features(x))  # avg pool, head.norm, flatten

    # The transformers architecture with the same weights must compute the same thing: this is
    # what lets config.json describe a timm-named checkpoint.
    config = ConvNextConfig(depths=depths, hidden_sizes=dims, image_size=image, drop_path_rate=0.0,
                            layer_norm_eps=1e-6)  # timm's head norm eps; transformers defaults to 1e-12
    hf = ConvNextModel(config).eval()
    tsd = trunk.state_dict()
    hsd = hf.state_dict()
    assert {hf_to_timm(k) for k in hsd} == set(tsd), "weight name mapping is not a bijection"
    hf.load_state_dict({k: tsd[hf_to_timm(k)] for k in hsd})
    with torch.inference_mode():
        ho = hf(pixel_values=x, output_hidden_states=True)
    worst = max([max_diff(a, b) for a, b in zip(ho.hidden_states, hs)] + [max_diff(ho.pooler_output, pooled)])
    assert worst < 1e-5, f"{name}: transformers and timm disagree by {worst}"

    out = fresh_dir(name)
    hf.save_pretrained(out)  # config.json (and weights, replaced below by the timm-named ones)
    state = {"visual.trunk." + k: v for k, v in tsd.items() if head_norm or not k.startswith("head.")}
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    expected = {"last_hidden_state": hs[-1]}
    if head_norm:
        expected["pooler_output"] = pooled
    expected.update({f"hidden_states.{i}": h for i, h in enumerate(hs)})
    save({"pixel_values": x}, os.path.join(out, "inputs.safetensors"))
    save(expected, os.path.join(out, "expected.safetensors"))
    print(f"{name}: timm ConvNeXt depths {depths} dims {dims} x{tuple(x.shape)}, {len(state)} weights "
          f"(head norm: {head_norm}), transformers vs timm max diff {worst:.1e}, {dir_kb(out)} KB")


def make_image(seed, h, w, mode):
    """Smooth gradients plus noise, as uint8 in PIL's layout for `mode`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    planes = []
    for c in range(chans):
        v = 128 + 90 * np.sin(xx / (2.5 + c) + yy / (4.0 + 1.5 * c) + c) + 60 * (xx / w - yy / h)
        planes.append(v + rng.normal(0, 18, (h, w)))
    a = np.clip(np.rint(np.stack(planes, -1)), 0, 255).astype(np.uint8)
    if mode == "RGBA":
        # full range of alpha, including fully transparent and fully opaque pixels
        alpha = 255 * (xx / (w - 1)) * (0.5 + yy / (2 * (h - 1)))
        a[..., 3] = np.clip(np.rint(alpha), 0, 255).astype(np.uint8)
        a[0, :, 3] = 0
        a[-1, :, 3] = 255
    return a[..., 0] if mode == "L" else a


def expand2square(img, background):
    """LLaVA's pad-to-square: the image pasted centred on a square of the background colour."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    result = Image.new(img.mode, (side, side), background)
    result.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return result


def preprocess_case(name, seed, h, w, mode, fmt, shortest_edge, crop):
    out = fresh_dir(name)
    fname = os.path.join(out, "image." + ("png" if fmt == "PNG" else "jpg"))
    img = Image.fromarray(make_image(seed, h, w, mode), mode)
    if fmt == "JPEG":
        # 4:4:4 so that decoders do not differ in chroma upsampling, only in IDCT rounding
        img.save(fname, "JPEG", quality=95, subsampling=0)
    else:
        img.save(fname, "PNG")
    kwargs = dict(size={"shortest_edge": shortest_edge}, crop_size={"height": crop, "width": crop})
    proc = CLIPImageProcessor(**kwargs)
    proc_pil = CLIPImageProcessorPil(**kwargs)
    proc.save_pretrained(out)
    assert json.load(open(os.path.join(out, "preprocessor_config.json")))["resample"] == 3

    loaded = Image.open(fname)
    assert loaded.mode == mode and loaded.size == (w, h)
    pv = proc(images=Image.open(fname), return_tensors="pt").pixel_values
    pv_pil = proc_pil(images=Image.open(fname), return_tensors="pt").pixel_values
    from transformers.image_transforms import convert_to_rgb

    rgb = convert_to_rgb(Image.open(fname), return_numpy=True)
    mean = tuple(int(x * 255) for x in proc.image_mean)
    square = expand2square(Image.open(fname).convert("RGB"), mean)
    pad = proc(images=square, return_tensors="pt").pixel_values
    pad_pil = proc_pil(images=square, return_tensors="pt").pixel_values
    expected = {
        "pixel_values": pv,
        "pixel_values_pil": pv_pil,
        "pixel_values_pad": pad,
        "pixel_values_pad_pil": pad_pil,
        "image_rgb": torch.from_numpy(np.ascontiguousarray(rgb)),
        "image_rgb_pad": torch.from_numpy(np.array(square)),
    }
    save(expected, os.path.join(out, "expected.safetensors"))
    std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
    tv_vs_pil = 255 * max(((a - b) * std).abs().max().item() for a, b in ((pv, pv_pil), (pad, pad_pil)))
    print(f"{name}: {fmt} {mode} {w}x{h}, shortest_edge {shortest_edge} crop {crop}, pad colour {mean}, "
          f"torchvision vs PIL backend {tv_vs_pil:.2f}/255, {dir_kb(out)} KB")


def dir_kb(path):
    return round(sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 1024, 1)


def main():
    check_versions()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    clip = dict(hidden_size=32, num_attention_heads=4, intermediate_size=37, image_size=30, patch_size=6,
                hidden_act="quick_gelu", layer_norm_eps=1e-5)
    clip_case("clip_quick_gelu", 100, 2, prefix=True, num_hidden_layers=2, **clip)
    clip_case("clip_gelu", 200, 1, prefix=True, interp=(48, 40), hidden_size=24, num_attention_heads=3,
              intermediate_size=40, num_hidden_layers=3, image_size=32, patch_size=8, hidden_act="gelu")
    clip_case("clip_noprefix", 300, 2, prefix=False, num_hidden_layers=1, **clip)

    convnext_hf_case("convnext_hf", 400, 2, [1, 1, 2, 1], [8, 16, 24, 32], 32)
    convnext_hf_case("convnext_hf_deep", 500, 1, [2, 1, 1, 1], [12, 12, 20, 28], 40)
    # 64 px leaves a 2x2 last stage, so the pooler's order (mean, then norm) matters
    convnext_timm_case("convnext_timm", 600, 1, [1, 1, 2, 1], [8, 16, 24, 32], 64, head_norm=True)
    convnext_timm_case("convnext_timm_nonorm", 700, 1, [1, 1, 2, 1], [8, 16, 24, 32], 48, head_norm=False)

    preprocess_case("preprocess_png_rgba", 800, 23, 37, "RGBA", "PNG", 24, 24)
    preprocess_case("preprocess_jpeg", 900, 81, 50, "RGB", "JPEG", 26, 22)
    preprocess_case("preprocess_png_gray", 1000, 17, 17, "L", "PNG", 24, 24)


if __name__ == "__main__":
    main()
