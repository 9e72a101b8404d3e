"""Fused modulation (SPEC 1.6): out[b] = shared + coef[b] * masks[index[b]], broadcast over
channels, for every batch member in one launch. `shared` is the cross-attention output that
all members have in common (see emerdiff_fast/attention.py), so this one kernel both
broadcasts it to the batch and adds each member's +/-lam * M_i."""
import torch

from ._dispatch import HAVE_TRITON, LAUNCHES, launch_guard, triton_enabled

BLOCKS = {"BLOCK_N": 32, "BLOCK_C": 64}  # launch config (kernels/aot.py compiles the same)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _modulate_kernel(shared_ptr, masks_ptr, index_ptr, coef_ptr, out_ptr, N, C,
                         BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)  # b * N * C passes 2^31 at large batches and sizes
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_n = offs_n < N
        tile_mask = mask_n[:, None] & (offs_c[None, :] < C)
        idx = tl.load(index_ptr + b)
        coef = tl.load(coef_ptr + b).to(tl.float32)
        m = tl.load(masks_ptr + idx * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tile = offs_n[:, None] * C + offs_c[None, :]
        s = tl.load(shared_ptr + tile, mask=tile_mask, other=0.0).to(tl.float32)
        out = s + coef * m[:, None]
        tl.store(out_ptr + b * N * C + tile, out.to(out_ptr.dtype.element_ty), mask=tile_mask)


def modulate_torch(shared: torch.Tensor, masks: torch.Tensor, index: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    add = coef.float()[:, None] * masks.float()[index]  # (B, N)
    return (shared.float()[None] + add[:, :, None]).to(shared.dtype)


@torch.library.custom_op("emerdiff::modulate", mutates_args=())
def modulate(shared: torch.Tensor, masks: torch.Tensor, index: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """shared (N, C), masks (K, N), index (B,) int64, coef (B,) -> (B, N, C) in shared's dtype."""
    if not triton_enabled(shared):
        return modulate_torch(shared, masks, index, coef)
    shared, masks, index, coef = shared.contiguous(), masks.contiguous(), index.contiguous(), coef.contiguous()
    n, c = shared.shape
    out = torch.empty((index.shape[0], n, c), dtype=shared.dtype, device=shared.device)
    grid = (index.shape[0], triton.cdiv(n, BLOCKS["BLOCK_N"]), triton.cdiv(c, BLOCKS["BLOCK_C"]))
    with launch_guard(shared):
        _modulate_kernel[grid](shared, masks, index, coef, out, n, c, **BLOCKS)
    LAUNCHES["modulate"] += 1
    return out


@modulate.register_fake
def _(shared, masks, index, coef):
    return shared.new_empty((index.shape[0], *shared.shape))
