"""Shared-P attention output: out[b, n, h*d + j] = sum_m P[h, n, m] * V[b, m, h*d + j].

The fast path computes one probability matrix per head (from the reference member) and
applies it to every batch member's values. In PyTorch that is one bmm after permuting V
from (B, M, heads*d) to (heads, M, B*d) and the result back, two full copies of the
members' activations per layer. This kernel is the same GEMM with the member/channel
column index addressed in place: it reads V and writes the output in their natural
(B, tokens, channels) layouts, so neither copy is made.

Expected gain, written before any GPU measurement: SD 2.1-base at 512 px with 61 members
in bf16 copies ~5.6 GB per denoising step through those permutes (16 self-attention
layers), ~2 ms at H100 bandwidth against a step of roughly 100 ms: about 2%. Hence opt-in
(FastOptions.triton_attention) until benchmarks/kernels/bench_shared_attention.py and the
waterfall have measured it on a GPU.
"""
import torch

from ._dispatch import HAVE_TRITON, LAUNCHES, launch_guard, triton_enabled

# Launch configs per input width (kernels/aot.py compiles the same): fp32 tiles at the
# 16-bit sizes spill registers on sm_80 (2.9 KB per thread, found by the AOT compile), so
# fp32 takes half-size M and J tiles (no spills on sm_80 or sm_90).
BLOCKS = {"16bit": {"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_J": 128},
          "fp32": {"BLOCK_N": 64, "BLOCK_M": 32, "BLOCK_J": 64}}

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _shared_pv_kernel(p_ptr, v_ptr, out_ptr, N, M, C, BD, stride_ph, stride_pn,
                          D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr):
        h = tl.program_id(0).to(tl.int64)  # h * N * M passes 2^31 at 1024 px (128x128 tokens)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)  # (member, channel) pairs
        member, chan = offs_j // D, offs_j % D
        mask_n, mask_j = offs_n < N, offs_j < BD
        v_cols = member.to(tl.int64) * M * C + h * D + chan
        acc = tl.zeros((BLOCK_N, BLOCK_J), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            p = tl.load(p_ptr + h * stride_ph + offs_n[:, None] * stride_pn + offs_m[None, :],
                        mask=mask_n[:, None] & mask_m[None, :], other=0.0)
            v = tl.load(v_ptr + offs_m[:, None] * C + v_cols[None, :],
                        mask=mask_m[:, None] & mask_j[None, :], other=0.0)
            if UPCAST:  # interpreter only (see below); bf16 products are exact in fp32
                p, v = p.to(tl.float32), v.to(tl.float32)
            if IEEE:  # fp32 inputs: full-precision products, like torch's fp32 bmm
                acc = tl.dot(p, v, acc, input_precision="ieee")
            else:
                acc = tl.dot(p, v.to(p.dtype), acc)
        out_cols = member.to(tl.int64) * N * C + h * D + chan
        tl.store(out_ptr + offs_n[:, None] * C + out_cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask_n[:, None] & mask_j[None, :])


def shared_attention_torch(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    heads, n, m = probs.shape
    batch, _, channels = v.shape
    d = channels // heads
    vv = v.view(batch, m, heads, d).permute(2, 1, 0, 3).reshape(heads, m, batch * d)
    return torch.bmm(probs, vv.to(probs.dtype)).view(heads, n, batch, d).permute(2, 1, 0, 3).reshape(batch, n, channels)


@torch.library.custom_op("emerdiff::shared_attention", mutates_args=())
def shared_attention(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs (heads, N, M), v (B, M, heads*d) -> (B, N, heads*d) in probs' dtype."""
    heads, n, m = probs.shape
    batch, m_v, channels = v.shape
    if m_v != m or channels % heads:
        raise ValueError(f"shared_attention: probs {tuple(probs.shape)} do not match values {tuple(v.shape)}")
    if not triton_enabled(probs):
        return shared_attention_torch(probs, v)
    probs, v = probs.contiguous(), v.contiguous()
    out = torch.empty((batch, n, channels), dtype=probs.dtype, device=probs.device)
    d = channels // heads
    blocks = BLOCKS["fp32" if probs.dtype == torch.float32 else "16bit"]
    grid = (heads, triton.cdiv(n, blocks["BLOCK_N"]), triton.cdiv(batch * d, blocks["BLOCK_J"]))
    # Triton's interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584,
    # "not supported"): under it, bf16 tiles are upcast to fp32 first. On the GPU the bf16
    # dot runs on tensor cores, which also form exact products and accumulate in fp32.
    upcast = not probs.is_cuda and probs.dtype == torch.bfloat16
    with launch_guard(probs):
        _shared_pv_kernel[grid](probs, v, out, n, m, channels, batch * d, probs.stride(0), probs.stride(1),
                                D=d, IEEE=probs.dtype == torch.float32 or upcast, UPCAST=upcast,
                                **blocks)
    LAUNCHES["shared_attention"] += 1
    return out


@shared_attention.register_fake
def _(probs, v):
    return probs.new_empty((v.shape[0], probs.shape[1], v.shape[2]))
