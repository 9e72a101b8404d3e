"""The reference path: SPEC 1.5-1.7 written out literally.

One unmodulated reference run records every attention layer's Q and K at every step (not
the probability matrices themselves, which would not fit in memory at 512 px); then, for
each mask i, one run with +lam and one with -lam (batched together, as a pair) start from
the same noisy latent, recompute each layer's probabilities from the recorded Q and K,
modulate the modulated layer at the first `modulate_steps` steps, and are decoded.
"""
from __future__ import annotations

import torch

from .attention import Modulation, ReferenceProcessor, RunState, installed, make_processors
from .maps import difference_map
from .timing import timed


def reference_and_modulated(seg, x_tm: torch.Tensor, masks: torch.Tensor, sampler, timings: dict):
    """Yields (i, final latents of [+lam, -lam] for mask i), after the reference run whose
    final latent is yielded first as (-1, latent)."""
    cfg = seg.config
    state = RunState(mode="record", modulated_layer=cfg.modulated_layer)
    with installed(seg.unet, make_processors(seg.unet, ReferenceProcessor, state)):
        with timed(timings, "denoise", seg.device):
            ref = seg.denoise(x_tm, state, sampler)
        yield -1, ref
        state.mode = "inject"
        coef = torch.tensor([cfg.lam, -cfg.lam], device=seg.device)
        for i in range(masks.shape[0]):
            state.modulation = Modulation(masks, torch.tensor([i, i], device=seg.device), coef)
            with timed(timings, "denoise", seg.device):
                x = seg.denoise(x_tm.expand(2, -1, -1, -1), state, sampler)
            yield i, x


def difference_maps(seg, x_tm: torch.Tensor, masks: torch.Tensor, sampler, timings: dict) -> torch.Tensor:
    """(K, R, R) float32: ||I- - I+||_2 over RGB for each mask."""
    out = []
    for i, latents in reference_and_modulated(seg, x_tm, masks, sampler, timings):
        if i < 0:
            continue
        with timed(timings, "decode", seg.device):
            img = seg.decode(latents)
            out.append(difference_map(img[1:2], img[0:1]))
    return torch.cat(out)
