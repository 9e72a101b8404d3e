"""k-means assignment and update steps, and whole k-means runs, vs the PyTorch fallbacks
and their torch.compile. Issue-4 shape on CUDA: 1000 problems (images) x 256 points x 1280
dims, K = 30; a 20-problem slice (4 for whole runs) on the CPU.

    pytest benchmarks/kernels/bench_kmeans_step.py --benchmark-only
"""
import pytest
import torch

from emerdiff_fast.kernels import kmeans_assign, kmeans_assign_torch, kmeans_update, kmeans_update_torch
from emerdiff_fast.kmeans import kmeans

from ..common import bench_info, reset_peak_memory
from ..conftest import DEVICE, sync, variants

B = 1000 if DEVICE == "cuda" else 20
IDS = dict(ids=lambda v: v if isinstance(v, str) else "")


def _gen():
    return torch.Generator(device=DEVICE).manual_seed(0)


@pytest.mark.parametrize("name, fn", variants(kmeans_assign, kmeans_assign_torch), **IDS)
def test_assign(benchmark, name, fn):
    x = torch.randn(B, 256, 1280, device=DEVICE, generator=_gen())
    c = torch.randn(B, 30, 1280, device=DEVICE, generator=_gen())
    fn(x, c)
    reset_peak_memory(DEVICE)
    benchmark(lambda: (fn(x, c), sync()))
    benchmark.extra_info.update(bench_info(DEVICE, problems=B, variant=name))


@pytest.mark.parametrize("name, fn", variants(kmeans_update, kmeans_update_torch), **IDS)
def test_update(benchmark, name, fn):
    x = torch.randn(B, 256, 1280, device=DEVICE, generator=_gen())
    labels = torch.randint(30, (B, 256), device=DEVICE, generator=_gen())
    fn(x, labels, 30)
    reset_peak_memory(DEVICE)
    benchmark(lambda: (fn(x, labels, 30), sync()))
    benchmark.extra_info.update(bench_info(DEVICE, problems=B, variant=name))


@pytest.mark.parametrize("use_triton", [True, False], ids=["ops", "torch"])
def test_kmeans_whole(benchmark, use_triton):
    """The segmenter's k-means (10 restarts of k-means++ and up to 100 Lloyd iterations)."""
    n = B if DEVICE == "cuda" else 4
    x = torch.randn(n, 256, 1280, device=DEVICE, generator=_gen())
    run = lambda: (kmeans(x, 30, restarts=10, max_iter=100, seed=0, use_triton=use_triton), sync())  # noqa: E731
    run()
    reset_peak_memory(DEVICE)
    benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info.update(bench_info(DEVICE, problems=n, variant="ops" if use_triton else "torch"))
