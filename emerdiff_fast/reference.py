"""The reference path: SPEC 1.5-1.7 written out literally.

The unmodulated reference run evaluates the UNet at each sampled latent of the inversion
(sampling.py), recording every attention layer's Q and K per step (not the probability
matrices themselves, which would not fit in memory at 512 px) and solving the noise maps
z_t. Then, for each mask i, one run with +lam and one with -lam (batched together, as a
pair) start from the sampled x_{t_m}, recompute each layer's probabilities from the
recorded Q and K, modulate the modulated layer at the first `modulate_steps` steps, take
the reverse step with the recorded z_t, and are decoded.
"""
from __future__ import annotations

import torch

from .attention import Modulation, ReferenceProcessor, RunState, installed, make_processors
from .maps import difference_map
from .sampling import Trajectory, denoise, reference_run
from .timing import timed


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


def decode_pairs(seg, x: torch.Tensor, sign: list[int], decode_batch: int) -> torch.Tensor:
    """Final latents of (+, -) member pairs (padding members last) -> their difference maps."""
    n_real = sum(s != 0 for s in sign)
    lat = x[:n_real]
    imgs = []
    for s in range(0, n_real, decode_batch):
        part = lat[s:s + decode_batch]
        if seg.static_decode and part.shape[0] < decode_batch:  # one shape for a compiled decode
            pad = part[-1:].expand(decode_batch - part.shape[0], *part.shape[1:])
            imgs.append(seg.decode(torch.cat([part, pad]))[:part.shape[0]])
        else:
            imgs.append(seg.decode(part))
        seg.tick()
    imgs = torch.cat(imgs)
    return difference_map(imgs[1::2], imgs[0::2])


def work_units(plan: list, steps: int, decode_batch: int, extra_runs: int = 0) -> int:
    """Progress units of one image: UNet steps per chunk (plus `extra_runs` unbatched runs)
    and VAE decode calls."""
    decodes = sum(-(-sum(s != 0 for s in sign) // decode_batch) for _, sign in plan)
    return (len(plan) + extra_runs) * steps + decodes


def difference_maps(seg, traj: Trajectory, masks: torch.Tensor, timings: dict,
                    chunk: int = 2, decode_batch: int = 2) -> torch.Tensor:
    """(K, R, R) float32 difference maps d_i (SPEC 1.7), one per mask. `chunk` modulated runs
    share a denoising batch: 2 (each mask's +/- pair) is the reference path; the fast
    backend's batching-only mode (FastOptions(share_attention=False)) passes more."""
    cfg = seg.config
    state = RunState(mode="record", modulated_layer=cfg.modulated_layer)
    plan = chunk_plan(masks.shape[0], chunk)
    seg.begin_work(work_units(plan, len(traj), decode_batch, extra_runs=1), "denoise+decode")
    out = []
    with installed(seg.unet, make_processors(seg.unet, ReferenceProcessor, state)):
        with timed(timings, "denoise", seg.device):
            z = reference_run(seg.unet, traj, state, seg.context, seg.dtype, on_step=seg.tick)

        def update(i, x, eps):
            return traj.step(i, x, eps, z[i])

        state.mode = "inject"
        for index, sign in plan:
            state.modulation = Modulation(masks, torch.tensor(index, device=seg.device),
                                          torch.tensor(sign, device=seg.device, dtype=torch.float32) * cfg.lam)
            with timed(timings, "denoise", seg.device):
                x = denoise(seg.unet, traj, traj.latents[0].expand(chunk, -1, -1, -1), update, state,
                            seg.context, seg.dtype, cfg.modulate_steps, on_step=seg.tick)
            with timed(timings, "decode", seg.device):
                out.append(decode_pairs(seg, x, sign, decode_batch))
    return torch.cat(out)
