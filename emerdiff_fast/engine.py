"""The fast path: the same function as reference.py, computed the way the hardware wants.

* All 2K (mask, sign) runs advance as one batch (chunked to `max_batch`), with batch
  member 0 being the unmodulated reference run itself, so nothing is recorded or replayed.
* Attention injection shares P: each layer computes softmax(QK^T/sqrt(d)) once, from
  member 0, and applies it to all members' V in one product; cross-attention outputs are
  member-independent and computed once (attention.SharedProcessor says why this is exact).
* Modulation is one fused Triton launch (kernels/modulate.py); k-means runs on the Triton
  assign/update ops (segmenter.py passes use_triton for this backend).
* Chunks are padded to a fixed size, so every UNet call has the same shape and a compiled
  UNet is traced once; the loop reads no tensor values on the host.
"""
from __future__ import annotations

import torch

from .attention import Modulation, RunState, SharedProcessor, installed, make_processors
from .maps import difference_map
from .timing import timed

# Rough activation memory of one extra batch member in a UNet call at 512 px in 16-bit
# (choice; benchmarks/ measure the real figure). Scales with pixels and element size.
_MEMBER_BYTES_512_16BIT = 0.6e9


def auto_max_batch(seg, num_members: int) -> int:
    """All members at once on the CPU; on CUDA, as many as 80% of free memory allows."""
    if seg.device.type != "cuda":
        return num_members
    free, _ = torch.cuda.mem_get_info(seg.device)
    scale = (seg.config.resolution / 512) ** 2 * seg.dtype.itemsize / 2
    fits = int(0.8 * free / (_MEMBER_BYTES_512_16BIT * scale))
    return max(2, min(num_members, fits - fits % 2))


def _state(seg) -> RunState:
    """One RunState and processor set per segmenter: a compiled UNet guards on processor
    identity, so reinstalling the same objects reuses its graphs across images."""
    if seg._fast_state is None:
        state = RunState(mode="shared", modulated_layer=seg.config.modulated_layer)
        seg._fast_state = state
        seg._fast_procs = make_processors(seg.unet, SharedProcessor, state)
    return seg._fast_state


def chunk_plan(num_masks: int, chunk: int) -> list[tuple[list[int], list[int]]]:
    """Members ordered (mask 0, +), (mask 0, -), (mask 1, +), ...; split into chunks of
    `chunk` (even), the last padded with mask 0 at coefficient 0. Returns per chunk the mask
    index and the sign (+1, -1, or 0 for padding) of each member."""
    idx = [i for i in range(num_masks) for _ in (0, 1)]
    sign = [s for _ in range(num_masks) for s in (1, -1)]
    plans = []
    for start in range(0, len(idx), chunk):
        ci, cs = idx[start:start + chunk], sign[start:start + chunk]
        pad = chunk - len(ci)
        plans.append((ci + [0] * pad, cs + [0] * pad))
    return plans


def difference_maps(seg, x_tm: torch.Tensor, masks: torch.Tensor, sampler, timings: dict) -> torch.Tensor:
    cfg = seg.config
    k = masks.shape[0]
    chunk = seg.max_batch or auto_max_batch(seg, 2 * k)
    chunk = max(2, min(chunk - chunk % 2, 2 * k))
    decode_batch = seg.decode_batch or chunk
    state = _state(seg)
    out = []
    with installed(seg.unet, seg._fast_procs):
        for index, sign in chunk_plan(k, chunk):
            # member 0: the reference run (coefficient 0), then the chunk's modulated members
            state.modulation = Modulation(
                masks, torch.tensor([0] + index, device=seg.device),
                torch.tensor([0.0] + sign, device=seg.device) * cfg.lam)
            with timed(timings, "denoise", seg.device):
                x = seg.denoise(x_tm.expand(chunk + 1, -1, -1, -1), state, sampler, unet=seg.unet_call)
            with timed(timings, "decode", seg.device):
                n_real = sum(s != 0 for s in sign)
                lat = x[1:1 + n_real]
                imgs = torch.cat([seg.decode(lat[s:s + decode_batch]) for s in range(0, n_real, decode_batch)])
                out.append(difference_map(imgs[1::2], imgs[0::2]))
    state.modulation = None
    return torch.cat(out)
