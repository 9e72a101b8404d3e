"""Seconds per image, reference vs fast (eager and torch.compile), K in {10, 30}: the tiny
model at 192 px on the CPU (minutes), or with EMERDIFF_BENCH_FULL=1 a full-size random-init
SD 2.1-base skeleton at 512 px in bf16 (GPU).

    pytest benchmarks/bench_end_to_end.py --benchmark-only
    EMERDIFF_BENCH_FULL=1 pytest benchmarks/bench_end_to_end.py --benchmark-only

The first call (and compilation) is untimed; its duration is extra_info["warmup_s"]. The
compiled variant runs on the CPU only with EMERDIFF_BENCH_COMPILE=1 (inductor's C++
compile of even the tiny UNet takes ~4 minutes on 2 cores).
"""
import os
import time

import pytest

from emerdiff_fast import EmerDiff, EmerDiffConfig

from .common import environment, peak_memory_gb, reset_peak_memory, test_image
from .conftest import DEVICE, FULL, bench_pipe, sync

RESOLUTION = 512 if FULL else 192  # 192 px: the smallest size whose 6x6 feature grid holds K = 30


@pytest.fixture(scope="module")
def pipe():
    return bench_pipe()


@pytest.mark.parametrize("backend", ["reference", "fast", "fast-compiled"])
@pytest.mark.parametrize("k", [10, 30])
def test_seconds_per_image(benchmark, pipe, backend, k):
    if backend == "fast-compiled" and DEVICE != "cuda" and os.environ.get("EMERDIFF_BENCH_COMPILE") != "1":
        pytest.skip("compiling on the CPU takes minutes per shape; EMERDIFF_BENCH_COMPILE=1 runs it")
    cfg = EmerDiffConfig(num_masks=k, resolution=RESOLUTION)
    seg = (EmerDiff(pipe, cfg, backend="fast", compile=True) if backend == "fast-compiled"
           else EmerDiff(pipe, cfg, backend=backend))
    image = test_image()
    t0 = time.perf_counter()
    seg(image)  # warm-up (and compilation) outside the timing
    warmup_s = time.perf_counter() - t0
    reset_peak_memory(DEVICE)
    benchmark.pedantic(lambda: (seg(image), sync()), rounds=3, iterations=1)
    benchmark.extra_info.update(environment(DEVICE), model="sd21-base random" if FULL else "tiny",
                                dtype=str(pipe.unet.dtype), resolution=RESOLUTION, num_masks=k,
                                backend=backend, warmup_s=warmup_s, peak_mem_gb=peak_memory_gb(DEVICE))
