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
  peak, predicted on meta tensors (memory.py), fits the free memory (ChunkPlan).

`FastPath` holds the state that must outlive one image (a compiled UNet guards on the
identity of the processors and of the prefix state); the segmenter keeps one and hands it
a `run.Run` per image.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch

from . import replay
from .attention import Modulation, RunState, SharedProcessor, installed, make_processors
from .batching import chunk_plan, decode_pairs, work_units
from .memory import MemoryModel, balanced_chunk
from .prefix import PrefixState, prefix_hooks
from .run import Run
from .sampling import Trajectory, denoise
from .timing import timed

log = logging.getLogger("emerdiff_fast")


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


def allocatable_bytes(device) -> int:
    """What the caching allocator can hand out: the driver's free memory plus the blocks it
    already holds but does not use. mem_get_info alone would count those held blocks as
    taken, so every image after the first would see less memory and pick a smaller chunk."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


@dataclass
class ChunkPlan:
    """The fast path's chunk (modulated runs per UNet call), decided once per (processing
    size, K) and kept for the segmenter's life: a chunk that changed from image to image
    would retrace a compiled UNet and make results depend on image order. After a CUDA
    out-of-memory error `back_off` halves it (balanced), for that image's retry and every
    later image."""

    unet_config: dict
    vae_config: dict
    dtype: torch.dtype
    device: torch.device
    modulated_layer: str
    max_batch: int | None = None     # the user's budget; None: all 2K on CPU, by memory on CUDA
    decode_batch: int | None = None  # the user's; None: min(chunk, DEFAULT_DECODE_BATCH)
    decode_dtype: torch.dtype | None = None  # the decoding VAE's own dtype; None: the UNet's

    def __post_init__(self):
        self.chunks: dict[tuple[tuple[int, int], int], int] = {}

    def memory_model(self, size: tuple[int, int]) -> MemoryModel:
        """The memory model at a processing size (H, W)."""
        return MemoryModel.of(self.unet_config, self.vae_config, size, self.dtype, self.modulated_layer,
                              self.decode_dtype)

    def auto_max_batch(self, num_members: int, size: tuple[int, int]) -> int:
        """All members at once on the CPU; on CUDA, the largest chunk whose predicted peak
        (memory.MemoryModel, traced on meta tensors) fits MEMORY_SAFETY of allocatable memory."""
        if self.device.type != "cuda":
            return num_members
        budget = MEMORY_SAFETY * allocatable_bytes(self.device)
        decode_batch = self.decode_batch or DEFAULT_DECODE_BATCH
        return max(2, self.memory_model(size).largest_chunk(budget, num_members, decode_batch))

    def chunk_size(self, size: tuple[int, int], num_masks: int) -> int:
        """The budget (max_batch, else auto_max_batch) balanced over the fewest calls
        (memory.balanced_chunk), even, in [2, 2K]; computed afresh (chunk() keeps it)."""
        two_k = 2 * num_masks
        return balanced_chunk(two_k, min(self.max_batch or self.auto_max_batch(two_k, size), two_k))

    def chunk(self, size: tuple[int, int], num_masks: int) -> int:
        key = (tuple(size), num_masks)
        if key not in self.chunks:
            self.chunks[key] = self.chunk_size(key[0], num_masks)
        return self.chunks[key]

    def decode_size(self, chunk: int) -> int:
        return self.decode_batch or min(chunk, DEFAULT_DECODE_BATCH)

    def back_off(self, size: tuple[int, int], num_masks: int) -> int | None:
        """The halved chunk, or None when it is already one +/- pair."""
        current = self.chunk(size, num_masks)
        if current <= 2:
            return None
        key = (tuple(size), num_masks)
        self.chunks[key] = balanced_chunk(2 * num_masks, current // 2)
        return self.chunks[key]


class FastPath:
    """The fast backend's state, one per segmenter: one RunState and processor set (a
    compiled UNet guards on processor identity, so reinstalling the same objects reuses its
    graphs across images), the step-0 prefix state, and the batch sizes already compiled.

    Under torch.compile the UNet traces two graphs, told apart by guards on two plain Python
    values the loop sets: step 0 (PrefixState.width = B, RunState.modulate_now = True) and
    the later steps (width 0, modulate_now False); modulate_steps > 1 adds a third (width 0,
    modulate_now True). Guards, not two named compiled functions: the step-0 difference
    lives in forward hooks and processors that a second compiled UNet would share anyway."""

    def __init__(self, unet, modulated_layer: str, options: FastOptions, compile_mode: str | None = None):
        self.options, self.compile_mode = options, compile_mode
        self.state = RunState(mode="shared", modulated_layer=modulated_layer)
        self.processors = make_processors(unet, SharedProcessor, self.state,
                                          reuse_cross=options.reuse_cross_attention,
                                          fused_modulation=options.triton_modulation,
                                          fused_attention=options.triton_attention)
        self.prefix = PrefixState()
        self.compiled_batches: set[int] = set()

    def compiling(self, batch: int):
        """Context for a UNet call batch: says so, and how long it took, when torch.compile
        traces a new shape (the first call only)."""
        if not self.compile_mode or batch in self.compiled_batches:
            return contextlib.nullcontext()
        self.compiled_batches.add(batch)
        log.info("compiling the UNet for batch %d (first call only; typically 1-3 min, longer with "
                 "max-autotune)", batch)

        @contextlib.contextmanager
        def report():
            start = time.perf_counter()
            yield
            log.info("first compiled chunk done in %.0f s (compile included)", time.perf_counter() - start)

        return report()

    def difference_maps(self, run: Run, traj: Trajectory, masks: torch.Tensor, timings: dict) -> torch.Tensor:
        if not self.options.share_attention:  # batching alone: the reference algorithm, wider batches
            return replay.difference_maps(run, traj, masks, timings)
        state, chunk = self.state, run.chunk
        plan = chunk_plan(masks.shape[0], chunk)
        run.progress.begin(work_units(plan, len(traj), run.decode_batch), "denoise+decode")
        out = []
        hooks = (prefix_hooks(run.unet, run.modulated_layer, self.prefix) if self.options.prefix_sharing
                 else contextlib.nullcontext(False))
        with installed(run.unet, self.processors), hooks as sharing:
            for index, sign in plan:
                # member 0: the reference run (coefficient 0), then the chunk's modulated members
                state.modulation = Modulation(
                    masks, torch.tensor([0] + index, device=run.device),
                    torch.tensor([0.0] + sign, device=run.device) * run.lam)
                with timed(timings, "denoise", run.device), self.compiling(chunk + 1):
                    x = denoise(run.unet_call, traj, traj.latents[0].expand(chunk + 1, -1, -1, -1),
                                traj.anchored_step, state, run.cond, run.dtype, run.modulate_steps,
                                on_step=run.progress.tick, prefix=self.prefix if sharing else None)
                with timed(timings, "decode", run.device):
                    out.append(decode_pairs(run, x[1:], sign))
        state.modulation = None
        return torch.cat(out)
