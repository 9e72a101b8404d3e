"""Seconds per image, reference vs fast, on the tiny model (CPU, minutes) or, with
EMERDIFF_BENCH_FULL=1, a full-size random-init SD 2.1-base skeleton at 512 px.

    pytest benchmarks/bench_end_to_end.py --benchmark-only
"""
import os

import pytest
import torch

from emerdiff_fast import EmerDiff, EmerDiffConfig, load_pipeline

from .common import environment, skeleton_path, test_image
from .conftest import DEVICE

FULL = os.environ.get("EMERDIFF_BENCH_FULL") == "1"


@pytest.fixture(scope="module")
def pipe():
    if FULL:
        return load_pipeline(skeleton_path(None), random_init=True, device=DEVICE,
                             dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    return load_pipeline("tiny", device=DEVICE)


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("k", [8] if not FULL else [10, 30])
def test_seconds_per_image(benchmark, pipe, backend, k):
    cfg = EmerDiffConfig(num_masks=k, resolution=512 if FULL else 128)
    seg = EmerDiff(pipe, cfg, backend=backend)
    image = test_image()
    seg(image)  # warm-up (and compilation, if any) outside the timing
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(lambda: seg(image), rounds=3, iterations=1)
    benchmark.extra_info.update(environment(DEVICE), model="sd21-base random" if FULL else "tiny",
                                resolution=cfg.resolution, num_masks=k, backend=backend)
    if DEVICE == "cuda":
        benchmark.extra_info["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
