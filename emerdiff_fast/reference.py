"""The reference path: SPEC 1.5-1.7 written out literally.

The unmodulated reference run evaluates the UNet at each sampled latent of the inversion
(sampling.py), recording every attention layer's Q and K per step (not the probability
matrices themselves, which would not fit in memory at 512 px) and solving the noise maps
z_t. Then, for each mask i, one run with +lam and one with -lam (batched together, as a
pair) start from the sampled x_{t_m}, recompute each layer's probabilities from the
recorded Q and K, modulate the modulated layer at the first `modulate_steps` steps, take
the reverse step with the recorded z_t, and are decoded; d_i is the distance between the
two decoded images.
"""
from __future__ import annotations

import torch

from .attention import Modulation, ReferenceProcessor, RunState, installed, make_processors
from .maps import difference_map
from .run import Run
from .sampling import Trajectory, denoise, reference_run
from .timing import timed


def difference_maps(run: Run, traj: Trajectory, masks: torch.Tensor, timings: dict) -> torch.Tensor:
    """(K, H, W) float32 difference maps d_i (SPEC 1.7), one per mask."""
    k = masks.shape[0]
    state = RunState(mode="record", modulated_layer=run.modulated_layer)
    run.progress.begin((k + 1) * len(traj) + k, "denoise+decode")  # K + 1 runs, K decodes
    plus_minus = torch.tensor([1.0, -1.0], device=run.device) * run.lam
    maps = []
    with installed(run.unet, make_processors(run.unet, ReferenceProcessor, state)):
        with timed(timings, "denoise", run.device):
            z = reference_run(run.unet, traj, state, run.cond, run.dtype, on_step=run.progress.tick)
        state.mode = "inject"
        for i in range(k):
            state.modulation = Modulation(masks, torch.tensor([i, i], device=run.device), plus_minus)
            with timed(timings, "denoise", run.device):
                x = denoise(run.unet, traj, traj.latents[0].expand(2, -1, -1, -1),
                            lambda j, x, eps: traj.step(j, x, eps, z[j]), state, run.cond, run.dtype,
                            run.modulate_steps, on_step=run.progress.tick)
            with timed(timings, "decode", run.device):
                images = run.decode(x)  # (I+, I-)
                run.progress.tick()
            maps.append(difference_map(images[1:], images[:1]))
    return torch.cat(maps)
