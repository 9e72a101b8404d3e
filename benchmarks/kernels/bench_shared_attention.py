"""Shared-P attention: one self-attention layer applying member 0's probabilities to every
member's values, as the fast path does (attention.SharedProcessor), against the ways it
could otherwise be computed:

* shared-triton   - the same with the shared_attention op (CUDA only): no permute copies
* shared-bmm      - the fast path's default: P once, one (heads, N, N) x (heads, N, B*d) product
* shared-compiled - torch.compile of the same expression
* repeated-P      - the replay path: P materialised once, repeated per member, batched bmm
* sdpa-per-member - flash/efficient attention per member with member 0's Q and K
                    broadcast: never materialises P but recomputes Q K^T for every member

Shape on CUDA: SD's 64x64 layers at 512 px (N = 4096, C = 320, 5 heads), B = 61 members,
bf16. On the CPU: N = 1024 (256 px), B = 9, fp32.

    pytest benchmarks/kernels/bench_shared_attention.py --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F

from emerdiff_fast.kernels import shared_attention

from ..common import bench_info, reset_peak_memory
from ..conftest import DEVICE, sync

CUDA = DEVICE == "cuda"
N, C, HEADS, B = (4096, 320, 5, 61) if CUDA else (1024, 320, 5, 9)
D = C // HEADS
DTYPE = torch.bfloat16 if CUDA else torch.float32


def _probs(q0, k0):
    return torch.softmax(torch.bmm(q0, k0.transpose(1, 2)) * D ** -0.5, -1)  # (heads, N, N)


def shared_triton(q0, k0, v):
    return shared_attention(_probs(q0, k0), v)


def shared_bmm(q0, k0, v):
    probs = _probs(q0, k0)
    vv = v.view(B, N, HEADS, D).permute(2, 1, 0, 3).reshape(HEADS, N, B * D)
    return torch.bmm(probs, vv).view(HEADS, N, B, D).permute(2, 1, 0, 3).reshape(B, N, C)


def repeated_p(q0, k0, v):
    probs = _probs(q0, k0).repeat(B, 1, 1)
    vv = v.view(B, N, HEADS, D).permute(0, 2, 1, 3).reshape(B * HEADS, N, D)
    return torch.bmm(probs, vv).view(B, HEADS, N, D).permute(0, 2, 1, 3).reshape(B, N, C)


def sdpa_per_member(q0, k0, v):
    q = q0[None].expand(B, -1, -1, -1)
    k = k0[None].expand(B, -1, -1, -1)
    vv = v.view(B, N, HEADS, D).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, vv).transpose(1, 2).reshape(B, N, C)


VARIANTS = {**({"shared-triton": shared_triton} if CUDA else {}), "shared-bmm": shared_bmm, "shared-compiled": torch.compile(shared_bmm),
            "repeated-P": repeated_p, "sdpa-per-member": sdpa_per_member}


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.inference_mode()
def test_shared_attention(benchmark, name):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q0 = torch.randn(HEADS, N, D, device=DEVICE, generator=g).to(DTYPE)
    k0 = torch.randn(HEADS, N, D, device=DEVICE, generator=g).to(DTYPE)
    v = torch.randn(B, N, C, device=DEVICE, generator=g).to(DTYPE)
    fn = VARIANTS[name]
    out = fn(q0, k0, v)
    # every variant computes the same thing: check against the plain one before timing
    torch.testing.assert_close(out.float(), shared_bmm(q0, k0, v).float(), atol=2e-2 if CUDA else 1e-4, rtol=0)
    reset_peak_memory(DEVICE)
    benchmark.pedantic(lambda: (fn(q0, k0, v), sync()), rounds=10 if CUDA else 5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(bench_info(DEVICE, variant=name, n=N, members=B, heads=HEADS, dtype=str(DTYPE)))
