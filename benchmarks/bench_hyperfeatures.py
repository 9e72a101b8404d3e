"""Diffusion Hyperfeatures extraction, seconds per image: the 50-step DDIM inversion with
the 11 saved timesteps ("all steps") and the one-step variant, and one aggregation-network
forward. Tiny model at 256 px on the CPU (batch 2); EMERDIFF_BENCH_FULL=1: SD 2.1-base
skeleton at 512 px (bf16 on CUDA).

    pytest benchmarks/bench_hyperfeatures.py --benchmark-only
"""
import pytest
import torch

from emerdiff_fast.hyperfeatures import ExtractConfig, Hyperfeatures

from .common import environment, peak_memory_gb, reset_peak_memory
from .conftest import DEVICE, FULL, bench_pipe, sync

RESOLUTION = 512 if FULL else 256
BATCH = 2


@pytest.fixture(scope="module")
def pipe():
    return bench_pipe()


@pytest.mark.parametrize("variant", ["all-steps", "one-step"])
def test_extract(benchmark, pipe, variant):
    cfg = (ExtractConfig.one_step(load_resolution=RESOLUTION) if variant == "one-step"
           else ExtractConfig(load_resolution=RESOLUTION))
    hf = Hyperfeatures(pipe, cfg)
    images = torch.rand(BATCH, 3, RESOLUTION, RESOLUTION, device=hf.extractor.device) * 2 - 1
    run = lambda: (hf.extract(images), sync())  # noqa: E731
    run()
    reset_peak_memory(DEVICE)
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    feats = hf.extract(images)
    benchmark.extra_info.update(environment(DEVICE), variant=variant, batch=BATCH, resolution=RESOLUTION,
                                seconds_per_image=benchmark.stats.stats.median / BATCH,
                                feature_mb_per_image=sum(m.numel() * m.element_size() for m in feats.maps) / BATCH / 1e6,
                                peak_mem_gb=peak_memory_gb(DEVICE))


def test_aggregate(benchmark, pipe):
    hf = Hyperfeatures(pipe, ExtractConfig(load_resolution=RESOLUTION))
    feats = hf.extract(torch.rand(1, 3, RESOLUTION, RESOLUTION, device=hf.extractor.device) * 2 - 1)
    with torch.no_grad():
        run = lambda: (hf.net(feats), sync())  # noqa: E731
        run()
        benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(environment(DEVICE), resolution=RESOLUTION, projection_dim=hf.net.config.projection_dim)
