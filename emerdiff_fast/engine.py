"""The fast path: the same function as reference.py, computed the way the hardware wants.

* All 2K (mask, sign) runs advance as one batch (chunked to `max_batch`), with batch
  member 0 being the unmodulated reference run itself, so nothing is recorded or replayed:
  member 0 walks the sampled latents of the inversion, and every member's reverse step is
  anchored to it (sampling.Trajectory.anchored_step says why that is the reference path's
  step with the inversion's z_t), so the inversion costs no UNet call of its own.
* Attention injection shares P: each layer computes softmax(QK^T/sqrt(d)) once, from
  member 0, and applies it to all members' V in one product; cross-attention outputs are
  member-independent and computed once (attention.SharedProcessor says why this is exact).
* Modulation is one fused Triton launch (kernels/modulate.py); k-means runs on the Triton
  assign/update ops (segmenter.py passes use_triton for this backend). FastOptions turns
  each technique off for comparison (benchmarks/waterfall.py).
* Step 0 runs the UNet on member 0 alone up to the modulated block (prefix.py): every
  member's input is the same there.
* Chunks are balanced (memory.balanced_chunk) and padded to one size, so every UNet call
  has the same shape and a compiled UNet is traced once per case (step 0, later steps);
  the loop reads no tensor values on the host. On CUDA the chunk is the largest whose
  peak, predicted on meta tensors (memory.py), fits the free memory.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from . import reference
from .attention import Modulation, RunState, SharedProcessor, installed, make_processors
from .memory import MemoryModel, balanced_chunk
from .prefix import prefix_hooks
from .reference import chunk_plan, decode_pairs, work_units
from .sampling import Trajectory, denoise
from .timing import timed


@dataclass(frozen=True)
class FastOptions:
    """The fast path's techniques, all on by default except channels_last and
    triton_attention (choice: neither has a GPU measurement yet). benchmarks/waterfall.py
    switches them on one at a time. Every combination computes the same function
    (tests/test_fast.py checks each)."""

    share_attention: bool = True        # member 0 is the reference run, its P applied to all
                                        # (False: record Q/K once, replay into batched runs)
    reuse_cross_attention: bool = True  # cross-attention output computed once, broadcast
    triton_modulation: bool = True      # fused modulate op instead of the PyTorch expression
    triton_kmeans: bool = True          # fused k-means assign/update ops
    triton_attention: bool = False      # (choice) shared-P attention op: off until GPU-measured
    channels_last: bool = False         # UNet and VAE convolutions in NHWC (set on the modules)
    prefix_sharing: bool = True         # step 0: the UNet up to the modulated block once (prefix.py;
                                        # applies with share_attention)

    def __post_init__(self):
        if self.reuse_cross_attention and not self.share_attention:
            raise ValueError("reuse_cross_attention needs share_attention")


# VAE decodes per call (choice). One 512 px decode is ~2.5 TFLOP, enough to fill a GPU at
# batch 1, while its activations (0.40 GB per image in 16-bit, memory.py's trace) grow with
# the batch: decoding a 60-member chunk at once would need ~24 GB for no expected speed-up.
DEFAULT_DECODE_BATCH = 8

# Share of free device memory the predicted peak may use (choice): the memory model counts
# tensors only, so allocator rounding and fragmentation and library workspaces (cuDNN,
# cuBLAS) must fit in the rest.
MEMORY_SAFETY = 0.85


def memory_model(seg) -> MemoryModel:
    return MemoryModel.of(seg.unet.config, seg.vae.config, seg.config.resolution, seg.dtype,
                          seg.config.modulated_layer)


def allocatable_bytes(device) -> int:
    """What the caching allocator can hand out: the driver's free memory plus the blocks it
    already holds but does not use. mem_get_info alone would count those held blocks as
    taken, so every image after the first would see less memory and pick a smaller chunk."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def auto_max_batch(seg, num_members: int) -> int:
    """All members at once on the CPU; on CUDA, the largest chunk whose predicted peak
    (memory.MemoryModel, traced on meta tensors) fits MEMORY_SAFETY of allocatable memory."""
    if seg.device.type != "cuda":
        return num_members
    decode_batch = seg.decode_batch or DEFAULT_DECODE_BATCH
    budget = MEMORY_SAFETY * allocatable_bytes(seg.device)
    return max(2, memory_model(seg).largest_chunk(budget, num_members, decode_batch))


class ChunkPlan:
    """The fast path's chunk, decided once per (resolution, K) and kept for the segmenter's
    life: a chunk that changed from image to image would retrace a compiled UNet and make
    results depend on image order. After a CUDA out-of-memory error `back_off` halves it
    (balanced), for that image's retry and every later image."""

    def __init__(self):
        self.chunks: dict[tuple[int, int], int] = {}

    def chunk(self, seg) -> int:
        key = (seg.config.resolution, seg.config.num_masks)
        if key not in self.chunks:
            self.chunks[key] = chunk_size(seg)
        return self.chunks[key]

    def back_off(self, seg) -> int | None:
        """The halved chunk, or None when it is already one +/- pair."""
        key, two_k = (seg.config.resolution, seg.config.num_masks), 2 * seg.config.num_masks
        current = self.chunk(seg)
        if current <= 2:
            return None
        self.chunks[key] = balanced_chunk(two_k, current // 2)
        return self.chunks[key]


def _state(seg) -> RunState:
    """One RunState and processor set per segmenter: a compiled UNet guards on processor
    identity, so reinstalling the same objects reuses its graphs across images."""
    if seg._fast_state is None:
        opts = seg.options
        state = RunState(mode="shared", modulated_layer=seg.config.modulated_layer)
        seg._fast_state = state
        seg._fast_procs = make_processors(seg.unet, SharedProcessor, state,
                                          reuse_cross=opts.reuse_cross_attention,
                                          fused_modulation=opts.triton_modulation,
                                          fused_attention=opts.triton_attention)
    return seg._fast_state


def chunk_size(seg) -> int:
    """Modulated runs per denoising batch: the budget (max_batch, else auto_max_batch)
    balanced over the fewest calls (memory.balanced_chunk), even, in [2, 2K]."""
    two_k = 2 * seg.config.num_masks
    return balanced_chunk(two_k, min(seg.max_batch or auto_max_batch(seg, two_k), two_k))


def difference_maps(seg, traj: Trajectory, masks: torch.Tensor, timings: dict) -> torch.Tensor:
    cfg = seg.config
    k = masks.shape[0]
    chunk = seg.chunk_plan.chunk(seg)
    decode_batch = seg.decode_batch or min(chunk, DEFAULT_DECODE_BATCH)
    if not seg.options.share_attention:  # batching alone: the reference algorithm, wider batches
        return reference.difference_maps(seg, traj, masks, timings, chunk, decode_batch)
    state = _state(seg)
    plan = chunk_plan(k, chunk)
    seg.begin_work(work_units(plan, len(traj), decode_batch), "denoise+decode")
    out = []
    prefix_on = seg.options.prefix_sharing
    hooks = prefix_hooks(seg.unet, cfg.modulated_layer, seg._prefix) if prefix_on else contextlib.nullcontext(False)
    with installed(seg.unet, seg._fast_procs), hooks as sharing:
        for index, sign in plan:
            # member 0: the reference run (coefficient 0), then the chunk's modulated members
            state.modulation = Modulation(
                masks, torch.tensor([0] + index, device=seg.device),
                torch.tensor([0.0] + sign, device=seg.device) * cfg.lam)
            with timed(timings, "denoise", seg.device), seg.compiling(chunk + 1):
                x = denoise(seg.unet_call, traj, traj.latents[0].expand(chunk + 1, -1, -1, -1),
                            traj.anchored_step, state, seg.context, seg.dtype, cfg.modulate_steps, on_step=seg.tick,
                            prefix=seg._prefix if sharing else None)
            with timed(timings, "decode", seg.device):
                out.append(decode_pairs(seg, x[1:], sign, decode_batch))
    state.modulation = None
    return torch.cat(out)
