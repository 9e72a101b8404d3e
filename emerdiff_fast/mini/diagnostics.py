"""What the mini model has learned, in the terms EmerDiff needs (tracked during training,
written to the model card):

* `attention_stats`: for each self-attention layer, at t = 281 on noised scene latents, the
  entropy of its probabilities over log N (1 = uniform), and the attention mass that a
  query on an object puts on the same object's tokens, beside the object's share of the
  tokens (equal when attention ignores objects; an injected uniform P spreads a local
  modulation over the whole image).
* `segment_scores`: per-image instance scores (metrics.instance_scores) of EmerDiff and of
  the naive baseline (the same k-means masks, upsampled) on generated scenes.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..attention import attention_probs
from ..config import EmerDiffConfig
from ..metrics import instance_scores
from ..scenes import make_scene


def _token_instances(instances: np.ndarray, grid: int) -> torch.Tensor:
    """The instance at each cell centre of a grid x grid tiling."""
    step = instances.shape[0] // grid
    return torch.from_numpy(instances[step // 2::step, step // 2::step].astype(np.int64)).flatten()


@torch.inference_mode()
def attention_stats(pipe, seeds, t: int = 281, seed: int = 0) -> dict[str, dict[str, float]]:
    from ..conditioning import empty_prompt
    from ..images import to_model_input
    from ..sampling import alphas_cumprod, noise_to

    unet, vae = pipe.unet, pipe.vae
    scenes = [make_scene(int(s)) for s in seeds]
    size = scenes[0].image.shape[0]
    from PIL import Image

    pixels = torch.stack([to_model_input(Image.fromarray(s.image), size) for s in scenes]).to(unet.device, unet.dtype)
    x0 = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
    x = noise_to(x0, noise, alphas_cumprod(pipe.scheduler.config)[t])
    cond = empty_prompt(pipe, unet.device, unet.dtype, (size, size)).kwargs(len(scenes))
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in unet.named_modules():
        if name.endswith("attn1"):
            def hook(mod, args, kwargs, name=name):
                h = args[0] if args else kwargs["hidden_states"]
                q, k = mod.head_to_batch_dim(mod.to_q(h)), mod.head_to_batch_dim(mod.to_k(h))
                p = attention_probs(mod, q, k).float()
                captured[name] = p.view(h.shape[0], -1, *p.shape[1:]).mean(1)  # (B, N, N), heads averaged
            hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        unet(x, torch.tensor(t, device=unet.device), **cond)
    finally:
        for h in hooks:
            h.remove()
    stats = {}
    for name, p in captured.items():
        n = p.shape[-1]
        entropy = float((-(p * p.clamp_min(1e-12).log()).sum(-1)).mean() / math.log(n))
        grid = int(round(n ** 0.5))
        masses, shares = [], []
        for b, scene in enumerate(scenes):
            tok = _token_instances(scene.instances, grid)
            for j in tok.unique().tolist():
                if j == 0:
                    continue
                on = tok == j
                masses.append(float(p[b][on][:, on].sum(-1).mean()))
                shares.append(float(on.float().mean()))
        stats[name] = {"entropy": entropy, "object_mass": float(np.mean(masses)) if masses else float("nan"),
                       "object_share": float(np.mean(shares)) if shares else float("nan")}
    return stats


def segment_scores(pipe, seeds, config: EmerDiffConfig, backends=("fast", "naive"),
                   keep_labels: bool = False) -> dict:
    """Mean instance scores per backend over the scenes of `seeds` (and, with keep_labels,
    each scene's label map)."""
    from PIL import Image

    from ..segmenter import EmerDiff

    scenes = [make_scene(int(s)) for s in seeds]
    images = [Image.fromarray(s.image) for s in scenes]
    out = {}
    for backend in backends:
        seg = EmerDiff(pipe, config, backend=backend)
        results = seg(images)
        per_image = [instance_scores(r.labels, s.instances) for r, s in zip(results, scenes)]
        out[backend] = {k: float(np.mean([p[k] for p in per_image])) for k in per_image[0]}
        if keep_labels:
            out[backend]["labels"] = [r.labels for r in results]
            out[backend]["per_image"] = per_image
    return out
