"""Diffusion Hyperfeatures extraction (Luo et al., NeurIPS 2023): the decoder's resnet
features along a DDIM inversion (real images) or a DDIM sampling run (synthetic images).

Faithful to the authors' code (diffusion-hyperfeatures/diffusion_hyperfeatures):
* the decoder resnets, SD's 12 `up_blocks.{0..3}.resnets.{0..2}` (from the UNet's structure,
  so other UNets give theirs); what they save is the resnet's
  residual branch, the output of its `conv2` (before the shortcut is added), which a
  forward hook on `conv2` captures (no forward is replaced);
* DDIM (eta 0) on the grid 0, 20, ..., 980 (50 steps; DDIMScheduler's "leading" spacing,
  steps_offset 0), empty prompt, no guidance. Inversion starts from the clean latent at
  "t = -1" (alpha_bar = 1, the UNet called with timestep -1, as theirs) and its step i is
  saved under index S - 1 - i, so index 49 is the clean latent and 0 the noisiest; their
  "all steps" config saves [49, 45, 40, ..., 5, 0], the one-step config runs one step
  (S = 1, index 0: the UNet on the clean latent);
* the latent is a sample of the VAE posterior times the scaling factor (theirs unseeded;
  here seeded, so a run is reproducible); images resized to load_resolution (the model's:
  SD 512).

Memory (choice): features are kept at the resolution each block produces them (8x8 to
64x64 at 512 px) in bf16, and resized to output_resolution (64) only inside the
aggregation network. For SD 1.5 at 11 timesteps that is 157 MB per image (7.1 M values per
timestep) instead of 952 MB resized to 64x64 (1.9 GB in fp32); they live in the
extractor's output (and the on-disk cache of train.py), never in fp32 at 64x64 for all
layers at once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from .. import conditioning
from ..conditioning import Conditioning, empty_prompt
from ..config import vae_scale_factor
from ..images import load_image, to_model_input
from ..loading import expected_resolution, load_pipeline
from ..sampling import PREDICTIONS, alphas_cumprod, epsilon_from

ALL_STEPS = (49, 45, 40, 35, 30, 25, 20, 15, 10, 5, 0)  # the authors' "all steps" save_timestep
ONE_STEP = (0,)


@dataclass(frozen=True)
class ExtractConfig:
    num_timesteps: int = 50                     # DDIM steps (1 for the one-step variant)
    save_timestep: tuple[int, ...] = ALL_STEPS  # step indices whose features are kept
    load_resolution: int | None = None          # images are resized to this square; None: the model's
                                                # (loading.expected_resolution: SD 512, SDXL 1024, mini 64)
    output_resolution: int | None = None        # aggregation resolution (aggregation.py); None: the
                                                # latent grid (load_resolution / VAE factor: SD 64, mini 16)
    layers: tuple[tuple[int, int], ...] | None = None  # (up block, resnet); None: every decoder resnet
                                                        # of the UNet (decoder_layers: SD's 12, fewer elsewhere)
    storage_dtype: torch.dtype = torch.bfloat16
    seed: int = 0

    def __post_init__(self):
        if self.num_timesteps < 1 or 1000 % self.num_timesteps:
            raise ValueError(f"num_timesteps must divide 1000, got {self.num_timesteps}")
        bad = [t for t in self.save_timestep if not 0 <= t < self.num_timesteps]
        if bad or not self.save_timestep:
            raise ValueError(f"save_timestep must be step indices in [0, {self.num_timesteps}), got "
                             f"{list(self.save_timestep)}")

    @classmethod
    def one_step(cls, **kw) -> "ExtractConfig":
        return cls(num_timesteps=1, save_timestep=ONE_STEP, **kw)


@dataclass
class Features:
    """Per layer (in `layers` order) a tensor (B, S, C_l, h_l, w_l) in storage dtype, S the
    saved timesteps in `save_timestep` order; plus the final latent of the run."""

    maps: list[torch.Tensor]
    save_timestep: tuple[int, ...]
    latents: torch.Tensor

    @property
    def dims(self) -> list[int]:
        return [m.shape[2] for m in self.maps]

    def select(self, i: int) -> "Features":
        return Features([m[i:i + 1] for m in self.maps], self.save_timestep, self.latents[i:i + 1])


def decoder_layers(unet) -> tuple[tuple[int, int], ...]:
    """(up block, resnet) of every decoder resnet, from the UNet's own structure: SD 1.x/2.x's
    up_blocks.{0..3}.resnets.{0..2} (the authors' 12), the mini model's 9, SDXL's 9."""
    return tuple((i, j) for i, block in enumerate(unet.up_blocks) for j in range(len(block.resnets)))


def ddim_grid(num_timesteps: int) -> list[int]:
    """0, 20, ..., 980 for 50 steps (leading spacing, steps_offset 0, as the authors' scheduler)."""
    ratio = 1000 // num_timesteps
    return [i * ratio for i in range(num_timesteps)]


def ddim_step(x, eps, a_t, a_next):  # eps: the noise estimate (sampling.epsilon_from for v models)
    """DDIM, eta 0: x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t); x' = sqrt(a') x0 + sqrt(1 - a') eps."""
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps


class FeatureExtractor:
    """Runs DDIM inversion (or generation) in batches and captures the decoder features."""

    def __init__(self, pipe, config: ExtractConfig | None = None, compile: bool = False, compile_backend="inductor"):
        pipe = load_pipeline(pipe)  # checked, its VAE upcast where it must be
        self.pipe, self.config = pipe, config or ExtractConfig()
        self.unet, self.vae = pipe.unet, pipe.vae
        if self.config.layers is None:
            self.config = dataclasses.replace(self.config, layers=decoder_layers(self.unet))
        if self.config.load_resolution is None:
            self.config = dataclasses.replace(self.config, load_resolution=expected_resolution(pipe))
        if self.config.output_resolution is None:
            self.config = dataclasses.replace(
                self.config, output_resolution=self.config.load_resolution // vae_scale_factor(self.vae.config))
        self.device, self.dtype = self.unet.device, self.unet.dtype
        self.modules = [self.unet.up_blocks[i].resnets[j].conv2 for i, j in self.config.layers]
        a = alphas_cumprod(pipe.scheduler.config).to(torch.float32)
        # alpha_bar on the walk's timesteps, with t = -1 -> 1 (the clean end)
        grid = ddim_grid(self.config.num_timesteps)
        self.walk = [-1] + grid  # inversion goes left to right, generation right to left
        self.alpha = torch.stack([torch.ones(()) if t < 0 else a[t] for t in self.walk]).to(self.device)
        if (self.alpha == 0).any():  # DDIM's x0 = (x - sqrt(1 - a) eps) / sqrt(a)
            raise ValueError(f"alpha_bar is 0 at t = {grid[-1]} on this checkpoint's schedule (zero terminal SNR): "
                             f"num_timesteps={self.config.num_timesteps} reaches it; use fewer")
        self.prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"the checkpoint predicts {self.prediction!r}; DDIM inversion needs epsilon or "
                             "v_prediction")
        r = self.config.load_resolution
        self.cond = empty_prompt(pipe, self.device, self.dtype, (r, r))  # conditioning.py: SDXL's extras too
        # the hooks inside the compiled UNet always capture, into a list cleared before each
        # call: which timestep keeps them is decided outside, so every step is one graph
        self.unet_call = torch.compile(self.unet, dynamic=False, backend=compile_backend) if compile else self.unet

    @property
    def context(self) -> torch.Tensor:
        """The text encoder states of `cond` (all of SD 1.x/2.x's conditioning; SDXL's UNet
        needs cond.kwargs)."""
        return self.cond.context

    @property
    def dims(self) -> list[int]:
        return [m.out_channels for m in self.modules]

    def encode(self, images) -> torch.Tensor:
        """Images (paths, PIL, arrays, or a (B, 3, H, W) tensor in [-1, 1]) -> latents."""
        if not isinstance(images, torch.Tensor):
            r = self.config.load_resolution
            images = torch.stack([to_model_input(load_image(im), r, Image.BILINEAR) for im in images])
        with torch.inference_mode():  # the VAE in its own dtype: an fp32 VAE under a 16-bit UNet
            # is the usual cure for VAE overflow
            dist = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist
            # every image the same seeded posterior draw, so a batch gives what single images give
            g = torch.Generator().manual_seed(self.config.seed)
            noise = torch.randn((1, *dist.mean.shape[1:]), generator=g).expand_as(dist.mean)
            noise = noise.to(dist.mean.device, dist.mean.dtype)
            return ((dist.mean + dist.std * noise) * self.vae.config.scaling_factor).to(self.device)

    def _run(self, x: torch.Tensor, inversion: bool, cond: Conditioning | None = None) -> Features:
        cfg = self.config
        n = cfg.num_timesteps
        order = list(range(n))
        saved = {t: k for k, t in enumerate(cfg.save_timestep)}
        b = x.shape[0]
        maps: list = [[None] * len(saved) for _ in self.modules]
        step_maps: list = []  # this UNet call's conv2 outputs, in module order

        def hook(module, args, out):
            step_maps.append(out)

        handles = [m.register_forward_hook(hook) for m in self.modules]
        kwargs = (self.cond if cond is None else cond).kwargs(b)
        x = x.float()
        try:
            with torch.inference_mode():
                for i in order:
                    if inversion:  # from walk[i] to walk[i + 1]; saved under index n - 1 - i
                        cur, nxt, index = i, i + 1, n - 1 - i
                    else:  # generation: from walk[n - i] down to walk[n - i - 1]; index i
                        cur, nxt, index = n - i, n - i - 1, i
                    t = torch.full((b,), self.walk[cur], device=self.device)
                    step_maps.clear()
                    out = self.unet_call(x.to(self.dtype), t, **kwargs).sample.float()
                    a = self.alpha[cur]
                    eps = epsilon_from(self.prediction, out, x, a.sqrt(), (1 - a).sqrt())
                    k = saved.get(index)
                    if k is not None:
                        for layer, out in enumerate(step_maps):
                            maps[layer][k] = out.to(cfg.storage_dtype)
                    x = ddim_step(x, eps, self.alpha[cur], self.alpha[nxt])
        finally:
            for h in handles:
                h.remove()
        captured = [t is not None for per_t in maps for t in per_t]
        if any(captured) and not all(captured):
            raise RuntimeError("some decoder features were not captured (a layer was skipped?)")
        stacked = [torch.stack(per_t, dim=1) for per_t in maps] if all(captured) else []  # (B, S, C, h, w)
        return Features(stacked, cfg.save_timestep, x)

    def extract(self, images) -> Features:
        """Real images: DDIM inversion from their latents."""
        return self._run(self.encode(images), inversion=True)

    def generate(self, batch: int, prompt: str = "", seed: int | None = None) -> tuple[Features, list[Image.Image]]:
        """Synthetic images: text-to-image DDIM sampling from seeded noise (no guidance, as
        the authors' default guidance_scale -1); the features along the way and the images."""
        r = self.config.load_resolution
        side = r // vae_scale_factor(self.vae.config)
        g = torch.Generator().manual_seed(self.config.seed if seed is None else seed)
        noise = torch.randn((batch, self.unet.config.in_channels, side, side), generator=g).to(self.device)
        # the empty prompt is extract()'s own (SDXL's zeros where force_zeros_for_empty_prompt)
        cond = conditioning.prompt(self.pipe, prompt, self.device, self.dtype, (r, r)) if prompt else self.cond
        feats = self._run(noise, inversion=False, cond=cond)
        with torch.inference_mode():
            lat = feats.latents / self.vae.config.scaling_factor
            imgs = self.vae.decode(lat.to(self.vae.device, self.vae.dtype)).sample
        arr = ((imgs.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return feats, [Image.fromarray(a) for a in arr]


def resize_to(maps: torch.Tensor, resolution: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, R, R) bilinear, as the authors' collect_and_resize_feats."""
    if maps.shape[-1] == resolution and maps.shape[-2] == resolution:
        return maps
    return F.interpolate(maps, size=resolution, mode="bilinear")
