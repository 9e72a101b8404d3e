"""Timesteps, forward noising and the sampler, as plain tensor arithmetic.

The sampler is written out instead of calling `scheduler.step` because EmerDiff needs the
*same* stochastic noise for the reference run and every modulated run (SPEC 1.2), and a
batched run must not draw a different noise per batch member. Coefficients are
precomputed per step, so a step is four multiply-adds with no host synchronisation.
`tests/test_schedule.py` checks each step against diffusers' DDPMScheduler/DDIMScheduler.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ConfigError, EmerDiffConfig


def make_scheduler(pipe, sampler: str, num_inference_steps: int):
    """The checkpoint's noise schedule with a DDPM or DDIM update rule."""
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
    sched = cls.from_config(pipe.scheduler.config)
    sched.set_timesteps(num_inference_steps)
    return sched


@dataclass
class Sampler:
    """x_prev = c_x0 * x0_hat + c_xt * x + c_eps * eps + std * noise[i], x0_hat = (x - b eps) / a."""

    timesteps: torch.Tensor       # (S,) int64, t_modulate first
    sqrt_alpha: torch.Tensor      # (S,) sqrt(alpha_bar_t)
    sqrt_one_minus: torch.Tensor  # (S,) sqrt(1 - alpha_bar_t)
    c_x0: torch.Tensor
    c_xt: torch.Tensor
    c_eps: torch.Tensor
    std: torch.Tensor
    noise: torch.Tensor           # (S, 1, C, h, w): one draw per step, shared by all runs

    def __len__(self) -> int:
        return int(self.timesteps.numel())

    def step(self, i: int, eps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x0 = (x - self.sqrt_one_minus[i] * eps) / self.sqrt_alpha[i]
        return self.c_x0[i] * x0 + self.c_xt[i] * x + self.c_eps[i] * eps + self.std[i] * self.noise[i]

    def to(self, device, dtype) -> "Sampler":
        def cast(t):
            return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
        return Sampler(**{k: cast(v) for k, v in self.__dict__.items()})


def modulation_timesteps(sched, config: EmerDiffConfig) -> list[int]:
    """The checkpoint's timesteps from t_modulate to the end (281, 261, ..., 1 for SD)."""
    all_t = [int(t) for t in sched.timesteps]
    if config.t_modulate not in all_t:
        raise ConfigError(f"t_modulate={config.t_modulate} is not on this checkpoint's schedule "
                          f"({all_t[0]}, {all_t[1]}, ..., {all_t[-1]})")
    return [t for t in all_t if t <= config.t_modulate]


def build_sampler(pipe, config: EmerDiffConfig, latent_shape: tuple[int, ...], noise: torch.Tensor) -> Sampler:
    """Steps from t_modulate to the end of the schedule. `noise` is (S, 1, *latent_shape)."""
    sched = make_scheduler(pipe, config.sampler, config.num_inference_steps)
    ts = modulation_timesteps(sched, config)
    ac = sched.alphas_cumprod.double()
    ratio = sched.config.num_train_timesteps // config.num_inference_steps
    # the value diffusers uses for alpha_bar at t < 0: 1 for DDPM, `final_alpha_cumprod` for DDIM
    final = ac.new_tensor(1.0) if config.sampler == "ddpm" else sched.final_alpha_cumprod.double()
    rows = []
    for t in ts:
        a_t = ac[t]
        a_prev = ac[t - ratio] if t - ratio >= 0 else final
        if config.sampler == "ddpm":
            beta_t = 1 - a_t
            cur_alpha = a_t / a_prev
            cur_beta = 1 - cur_alpha
            c_x0 = a_prev.sqrt() * cur_beta / beta_t
            c_xt = cur_alpha.sqrt() * (1 - a_prev) / beta_t
            var = ((1 - a_prev) / beta_t * cur_beta).clamp(min=1e-20)  # "fixed_small", as diffusers
            rows.append((a_t.sqrt(), (1 - a_t).sqrt(), c_x0, c_xt, 0.0, var.sqrt() if t > 0 else 0.0))
        else:  # DDIM, eta = 0: deterministic, noise unused
            rows.append((a_t.sqrt(), (1 - a_t).sqrt(), a_prev.sqrt(), 0.0, (1 - a_prev).sqrt(), 0.0))
    cols = [torch.tensor([float(r[j]) for r in rows], dtype=torch.float64) for j in range(6)]
    if noise.shape[0] != len(ts) or tuple(noise.shape[2:]) != tuple(latent_shape):
        raise ValueError(f"noise must be ({len(ts)}, 1, {latent_shape}), got {tuple(noise.shape)}")
    return Sampler(torch.tensor(ts), *cols, noise=noise.double())


def add_noise(pipe_scheduler_config, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
    """q(x_t | x_0) with the checkpoint's alpha_bar, like scheduler.add_noise."""
    from diffusers import DDPMScheduler

    ac = DDPMScheduler.from_config(pipe_scheduler_config).alphas_cumprod[t].double()
    return (ac.sqrt() * x0.double() + (1 - ac).sqrt() * noise.double()).to(x0.dtype)


def seeded_noise(seed: int, latent_shape: tuple[int, ...], num_steps: int):
    """(feature noise, modulation-start noise, per-step sampler noise), drawn on the CPU from
    `seed` in a fixed order, so results depend on the seed alone, not on device or batch."""
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn((1, *latent_shape), generator=g)
    start = torch.randn((1, *latent_shape), generator=g)
    steps = torch.randn((num_steps, 1, *latent_shape), generator=g)
    return feat, start, steps
