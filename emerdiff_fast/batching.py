"""Batches of modulated runs, shared by the fast path (engine.py) and its batching-only
mode (replay.py): which (mask, sign) members a UNet call holds, how their final latents
become difference maps, and how many progress units an image takes."""
from __future__ import annotations

import torch

from .maps import difference_map
from .run import Run


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


def decode_pairs(run: Run, x: torch.Tensor, sign: list[int]) -> torch.Tensor:
    """Final latents of (+, -) member pairs (padding members last) -> their difference maps."""
    n_real = sum(s != 0 for s in sign)
    lat, size = x[:n_real], run.decode_batch
    imgs = []
    for s in range(0, n_real, size):
        part = lat[s:s + size]
        if run.static_decode and part.shape[0] < size:  # one shape for a compiled decode
            pad = part[-1:].expand(size - part.shape[0], *part.shape[1:])
            imgs.append(run.decode(torch.cat([part, pad]))[:part.shape[0]])
        else:
            imgs.append(run.decode(part))
        run.progress.tick()
    imgs = torch.cat(imgs)
    return difference_map(imgs[1::2], imgs[0::2])


def work_units(plan: list, steps: int, decode_batch: int, extra_runs: int = 0) -> int:
    """Progress units of one image: UNet steps per chunk (plus `extra_runs` unbatched runs)
    and VAE decode calls."""
    decodes = sum(-(-sum(s != 0 for s in sign) // decode_batch) for _, sign in plan)
    return (len(plan) + extra_runs) * steps + decodes
