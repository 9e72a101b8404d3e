"""Fused modulation vs its PyTorch fallback and the compiled fallback. Shape: SD's
modulated layer at 512 px (N = 16*16 positions, C = 1280), 2K+1 = 61 members.

    pytest benchmarks/kernels/bench_modulate.py --benchmark-only
"""
import pytest
import torch

from emerdiff_fast.kernels import modulate, modulate_torch

from ..common import bench_info, reset_peak_memory
from ..conftest import DEVICE, sync, variants


@pytest.mark.parametrize("name, fn", variants(modulate, modulate_torch), ids=lambda v: v if isinstance(v, str) else "")
def test_modulate(benchmark, name, fn):
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    g = torch.Generator(device=DEVICE).manual_seed(0)
    shared = torch.randn(256, 1280, device=DEVICE, generator=g).to(dtype)
    masks = (torch.rand(30, 256, device=DEVICE, generator=g) > 0.5).to(dtype)
    index = torch.arange(61, device=DEVICE) % 30
    coef = torch.randn(61, device=DEVICE, generator=g).to(dtype)
    run = lambda: (fn(shared, masks, index, coef), sync())  # noqa: E731
    run()
    reset_peak_memory(DEVICE)
    benchmark(run)
    benchmark.extra_info.update(bench_info(DEVICE, dtype=str(dtype), variant=name))
