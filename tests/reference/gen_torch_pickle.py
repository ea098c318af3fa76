"""Reference fixture for mgm-tensor's restricted torch.save reader (torch_pickle).

tests/fixtures/torch_pickle/state.bin is `torch.save` of an OrderedDict (a state dict, with
`_metadata` as nn.Module.state_dict writes it) holding tensors of every storage type the reader
supports, including views whose storage is shared, offset or transposed (non-contiguous), an
nn.Parameter, a 0-d tensor and an empty one; state.safetensors holds the same tensors,
contiguous, widened where the reader widens (int32 / int16 / int8 / bool to int64), so the test
compares the two byte for byte. The mgm_llama fixture's ConvNeXt tower is also written as
OpenCLIP's pickle `open_clip_pytorch_model.bin` (tests/fixtures/convnext_openclip_bin), which
ConvNextModel::load_dir must load to the same outputs as the safetensors one.

Run through `cargo xtask reference` (pinned versions of requirements.txt). Deterministic:
torch.save's archive has fixed entry names and no timestamps that vary (checked by rerunning).
"""

import collections
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

PINNED = {"torch": (torch.__version__, "2.15.0")}
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")


def check_versions():
    for name, (have, want) in PINNED.items():
        if have.split("+")[0] != want:
            sys.exit(f"{name} {want} is pinned, found {have}")


def main():
    check_versions()
    g = torch.Generator().manual_seed(7)
    base = torch.randn(4, 6, generator=g)
    sd = collections.OrderedDict()
    sd["f32"] = torch.randn(2, 3, generator=g)
    sd["f32_transposed"] = base.t()  # non-contiguous view of base
    sd["f32_row"] = base[2]  # offset view into the same storage
    sd["f64"] = torch.randn(3, generator=g, dtype=torch.float64)
    sd["f16"] = torch.randn(2, 2, generator=g).half()
    sd["bf16"] = torch.randn(5, generator=g).bfloat16()
    sd["i64"] = torch.arange(-3, 3, dtype=torch.int64).reshape(2, 3)
    sd["i32"] = torch.tensor([-7, 0, 2**31 - 1], dtype=torch.int32)
    sd["i16"] = torch.tensor([-300, 12], dtype=torch.int16)
    sd["i8"] = torch.tensor([-128, 5], dtype=torch.int8)
    sd["u8"] = torch.tensor([0, 200, 255], dtype=torch.uint8)
    sd["bool"] = torch.tensor([True, False, True])
    sd["param"] = torch.nn.Parameter(torch.randn(3, generator=g))
    sd["scalar"] = torch.tensor(1.5)
    sd["empty"] = torch.zeros(0, 4)
    sd._metadata = collections.OrderedDict({"": {"version": 1}})
    out = os.path.normpath(os.path.join(FIXTURES, "torch_pickle"))
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    torch.save(sd, os.path.join(out, "state.bin"))
    widen = {torch.int32, torch.int16, torch.int8, torch.bool}
    flat = {k: (v.detach().to(torch.int64) if v.dtype in widen else v.detach()).contiguous().clone() for k, v in sd.items()}
    save_file(flat, os.path.join(out, "state.safetensors"))

    src = os.path.normpath(os.path.join(FIXTURES, "mgm_llama", "convnext", "open_clip_model.safetensors"))
    tower = load_file(src)
    dst = os.path.normpath(os.path.join(FIXTURES, "convnext_openclip_bin"))
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    os.makedirs(dst)
    torch.save(collections.OrderedDict(sorted(tower.items())), os.path.join(dst, "open_clip_pytorch_model.bin"))
    print(f"torch_pickle: {len(sd)} tensors; convnext_openclip_bin: {len(tower)} tensors")


if __name__ == "__main__":
    main()
