import torch
import pytest

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def variants(triton_fn, torch_fn):
    """(name, fn) pairs to time: Triton only where it runs natively (CUDA), the fallback,
    and torch.compile of the fallback expression."""
    out = [("torch", torch_fn)]
    if DEVICE == "cuda":
        out = [("triton", triton_fn)] + out + [("compiled", torch.compile(torch_fn))]
    return out


@pytest.fixture
def device():
    return DEVICE
