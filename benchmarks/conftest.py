import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FULL = os.environ.get("EMERDIFF_BENCH_FULL") == "1"  # full-size SD 2.1-base skeleton (GPU)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def bench_pipe():
    """The tiny model in fp32, or with EMERDIFF_BENCH_FULL=1 the random-init SD 2.1-base
    skeleton (bf16 on CUDA)."""
    from .common import bench_pipeline

    return bench_pipeline(FULL, DEVICE, torch.bfloat16 if FULL and DEVICE == "cuda" else torch.float32)


def variants(triton_fn, torch_fn):
    """(name, fn) pairs to time: the op (its Triton kernel where it runs natively, CUDA), the
    plain-PyTorch fallback, and torch.compile of the fallback expression."""
    out = [("torch", torch_fn), ("compiled", torch.compile(torch_fn))]
    if DEVICE == "cuda":
        out = [("triton", triton_fn)] + out
    return out


@pytest.fixture
def device():
    return DEVICE
