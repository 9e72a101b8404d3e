"""The two model calls that dominate the fast path, at its batch size 2K (K = 30):
one UNet denoising step (diffusers' default attention vs the fast path's shared-P
processors with the modulation on, 2K + 1 members) and one VAE decode. Tiny model at
192 px on the CPU; EMERDIFF_BENCH_FULL=1: SD 2.1-base skeleton at 512 px in bf16.

    pytest benchmarks/bench_components.py --benchmark-only
"""
import pytest
import torch

from emerdiff_fast import EmerDiff, EmerDiffConfig
from emerdiff_fast.attention import installed

from .common import demo_modulation, environment, peak_memory_gb, reset_peak_memory
from .conftest import DEVICE, FULL, bench_pipe, sync

K = 30
RESOLUTION = 512 if FULL else 192


@pytest.fixture(scope="module")
def seg():
    return EmerDiff(bench_pipe(), EmerDiffConfig(num_masks=K, resolution=RESOLUTION), backend="fast")


def _record(benchmark, seg, **info):
    benchmark.extra_info.update(environment(DEVICE), dtype=str(seg.dtype), resolution=RESOLUTION,
                                peak_mem_gb=peak_memory_gb(DEVICE), **info)


def _latents(seg, batch):
    lat = RESOLUTION // 8
    return torch.randn(batch, seg.unet.config.in_channels, lat, lat, device=seg.device, dtype=seg.dtype)


@pytest.mark.parametrize("attention", ["diffusers-default", "shared-P"])
@torch.inference_mode()
def test_unet_step(benchmark, seg, attention):
    batch = 2 * K + (attention == "shared-P")  # the fast path adds the reference member
    x = _latents(seg, batch)
    t = torch.tensor(seg.config.t_modulate, device=seg.device)
    cond = seg.cond_at((RESOLUTION, RESOLUTION)).kwargs(batch)
    state = seg.fast.state
    state.modulation, state.step, state.modulate_now = demo_modulation(seg, batch), 0, True
    procs = seg.fast.processors if attention == "shared-P" else seg.unet.attn_processors
    with installed(seg.unet, procs):
        step = lambda: (seg.unet(x, t, **cond), sync())  # noqa: E731
        step()
        reset_peak_memory(DEVICE)
        benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    state.modulation = None
    _record(benchmark, seg, batch=batch, attention=attention)


@torch.inference_mode()
def test_vae_decode(benchmark, seg):
    x = _latents(seg, 2 * K)
    decode = lambda: (seg.decode(x), sync())  # noqa: E731
    decode()
    reset_peak_memory(DEVICE)
    benchmark.pedantic(decode, rounds=3, iterations=1)
    _record(benchmark, seg, batch=2 * K)
