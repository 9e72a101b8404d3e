"""Fused modulation vs its PyTorch fallback (and compiled fallback on CUDA).
Shape: SD's modulated layer at 512 px (N = 16*16 positions, C = 1280), 2K+1 = 61 members.

    pytest benchmarks/kernels/bench_modulate.py --benchmark-only
"""
import pytest
import torch

from emerdiff_fast.kernels import modulate, modulate_torch

from ..conftest import DEVICE, sync, variants


@pytest.mark.parametrize("name, fn", variants(modulate, modulate_torch), ids=lambda v: v if isinstance(v, str) else "")
def test_modulate(benchmark, name, fn):
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    shared = torch.randn(256, 1280, device=DEVICE, dtype=dtype)
    masks = (torch.rand(30, 256, device=DEVICE) > 0.5).to(dtype)
    index = torch.arange(61, device=DEVICE) % 30
    coef = torch.randn(61, device=DEVICE).to(dtype)

    def run():
        fn(shared, masks, index, coef)
        sync()

    benchmark.extra_info.update(device=DEVICE, dtype=str(dtype))
    benchmark(run)
