"""Run by tests/test_memory.py in a fresh process: the peak RSS growth of one real
fast-path UNet call of the tiny model on the CPU, and the memory model's prediction.
Usage: python rss_unet_call.py MEMBERS RESOLUTION -> prints "measured_bytes predicted_bytes"."""
import sys

import torch

from emerdiff_fast import load_pipeline
from emerdiff_fast.attention import Modulation, RunState, SharedProcessor, installed, make_processors
from emerdiff_fast.config import EmerDiffConfig
from emerdiff_fast.memory import MemoryModel


def status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def main(members: int, res: int) -> None:
    torch.set_num_threads(1)  # one thread: no per-thread scratch buffers
    unet = load_pipeline("tiny").unet
    layer = EmerDiffConfig().modulated_layer
    side = res // 8
    n = (side // 4) ** 2
    state = RunState(mode="shared", modulated_layer=layer, modulate_now=True)
    state.modulation = Modulation(torch.zeros(members, n), torch.zeros(members, dtype=torch.long),
                                  torch.zeros(members))
    x = torch.randn(members, 4, side, side)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim).expand(members, -1, -1)
    t = torch.tensor(281)
    with torch.inference_mode(), installed(unet, make_processors(unet, SharedProcessor, state)):
        # warm-up: one-time allocations (oneDNN primitives, thread pools) are not the call's
        unet(x, t, encoder_hidden_states=ctx)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark
        before = status("VmRSS")
        out = unet(x, t, encoder_hidden_states=ctx).sample
        peak = status("VmHWM")
    del out
    from emerdiff_fast import loading

    model = MemoryModel.of(unet.config, loading.tiny_pipeline().vae.config, res, torch.float32, layer)
    print(peak - before, model.unet_call(members))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
