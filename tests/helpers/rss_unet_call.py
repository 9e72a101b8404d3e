"""Run by tests/test_memory.py in a fresh process: the peak RSS growth of one real
fast-path UNet call on the CPU, and the memory model's prediction.
Usage: python rss_unet_call.py MEMBERS RESOLUTION [CONFIG_FOLDER] -> prints
"measured_bytes predicted_bytes". Without CONFIG_FOLDER the tiny model; with one (a
skeleton such as sdxl-base) its full-size UNet with uninitialised weights: activations
do not depend on the weights' values, and untouched weight pages cost no resident memory."""
import json
import sys
from pathlib import Path

import torch

from emerdiff_fast import load_pipeline
from emerdiff_fast.attention import Modulation, RunState, SharedProcessor, installed, make_processors
from emerdiff_fast.conditioning import placeholder
from emerdiff_fast.config import default_layers, layer_grid, vae_scale_factor
from emerdiff_fast.memory import MemoryModel, meta_models


def status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def models(folder: str | None):
    if folder is None:
        pipe = load_pipeline("tiny")
        return pipe.unet, dict(pipe.vae.config)
    configs = [json.loads((Path(folder) / part / "config.json").read_text()) for part in ("unet", "vae")]
    unet, _ = meta_models(*configs, torch.float32)
    return unet.to_empty(device="cpu"), configs[1]


def main(members: int, res: int, folder: str | None = None) -> None:
    torch.set_num_threads(1)  # one thread: no per-thread scratch buffers
    unet, vae_config = models(folder)
    _, layer = default_layers(unet)
    side = res // vae_scale_factor(vae_config)
    h, w = layer_grid(unet.config, vae_config, (res, res), layer)
    state = RunState(mode="shared", modulated_layer=layer, modulate_now=True)
    state.modulation = Modulation(torch.zeros(members, h * w), torch.zeros(members, dtype=torch.long),
                                  torch.zeros(members))
    x = torch.randn(members, unet.config.in_channels, side, side)
    cond = placeholder(unet.config, (res, res), torch.float32, "cpu").kwargs(members)
    cond["encoder_hidden_states"] = torch.randn_like(cond["encoder_hidden_states"])
    t = torch.tensor(281)
    with torch.inference_mode(), installed(unet, make_processors(unet, SharedProcessor, state)):
        # warm-up: one-time allocations (oneDNN primitives, thread pools) are not the call's
        unet(x, t, **cond)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark
        before = status("VmRSS")
        out = unet(x, t, **cond).sample
        peak = status("VmHWM")
    del out
    model = MemoryModel.of(unet.config, vae_config, res, torch.float32, layer)
    print(peak - before, model.unet_call(members))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:4])
