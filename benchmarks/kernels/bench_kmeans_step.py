"""k-means assignment and update vs their PyTorch fallbacks. Issue-4 shape on CUDA: 1000
problems x 256 points x 1280 dims, K = 30; a 20-problem slice on CPU.

    pytest benchmarks/kernels/bench_kmeans_step.py --benchmark-only
"""
import pytest
import torch

from emerdiff_fast.kernels import kmeans_assign, kmeans_assign_torch, kmeans_update, kmeans_update_torch

from ..conftest import DEVICE, sync, variants

B = 1000 if DEVICE == "cuda" else 20


@pytest.mark.parametrize("name, fn", variants(kmeans_assign, kmeans_assign_torch), ids=lambda v: v if isinstance(v, str) else "")
def test_assign(benchmark, name, fn):
    x = torch.randn(B, 256, 1280, device=DEVICE)
    c = torch.randn(B, 30, 1280, device=DEVICE)
    benchmark.extra_info.update(device=DEVICE, problems=B)
    benchmark(lambda: (fn(x, c), sync()))


@pytest.mark.parametrize("name, fn", variants(kmeans_update, kmeans_update_torch), ids=lambda v: v if isinstance(v, str) else "")
def test_update(benchmark, name, fn):
    x = torch.randn(B, 256, 1280, device=DEVICE)
    labels = torch.randint(30, (B, 256), device=DEVICE)
    benchmark.extra_info.update(device=DEVICE, problems=B)
    benchmark(lambda: (fn(x, labels, 30), sync()))
