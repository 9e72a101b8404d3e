"""The trajectory both paths walk (SPEC 1.2, 1.5, 1.6): edit-friendly DDPM inversion of the
input latent, the reverse step, and the denoising loop.

Edit-friendly DDPM inversion (Huberman-Spiegelglas et al., arXiv 2304.06140), as the
authors' notebook uses it: every grid timestep gets its *own*, independently noised copy of
the input latent, x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) n_t, and the noise map z_t of each
reverse step is solved so that the step from the sampled x_t lands exactly on the sampled
x_prev. An unmodulated run with these z_t walks through the sampled latents and ends on x_0
itself: the photo is reconstructed, not regenerated, and the modulated runs are
perturbations of the real photo.

Only the steps from t_modulate to the end are inverted: z_t depends on the sampled x_t and
x_prev alone (each x_t is drawn independently, not by running the chain), and every run
starts at t_modulate, so the notebook's noise maps for the 35 steps above t_modulate are
never used. Their noise draws are still made, in the notebook's order (t = 1, 21, ..., 981,
one CPU generator seeded with `seed`), so a seed gives the notebook's sampled latents for
the same `ddpm_seed`.

Everything here is tensor arithmetic with per-step coefficients precomputed in float64:
the loop reads no tensor values on the host, and a batched run uses one z_t for all members.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .config import ConfigError, EmerDiffConfig, follows_model
from .conditioning import Conditioning

PREDICTIONS = ("epsilon", "v_prediction")  # model outputs the reverse step can use ("sample" is refused)


def epsilon_from(prediction: str, out: torch.Tensor, x: torch.Tensor, sqrt_alpha, sqrt_one_minus) -> torch.Tensor:
    """The noise estimate the reverse step and the inversion need, from the model's output:
    itself for epsilon models; for v models (v = sqrt(a_t) eps - sqrt(1 - a_t) x_0),
    eps = sqrt(a_t) v + sqrt(1 - a_t) x_t."""
    if prediction == "epsilon":
        return out
    return sqrt_alpha * out + sqrt_one_minus * x


def _scheduler(scheduler_config, num_inference_steps: int):
    """The checkpoint's noise schedule on DDIM's grid (the authors' scheduler class)."""
    from diffusers import DDIMScheduler

    if is_edm(scheduler_config):  # DDIMScheduler.from_config would silently take default betas
        raise ConfigError("this checkpoint's scheduler is an EDM one (sigma_data; Playground v2.5, CosXL): "
                          "EmerDiff's inversion needs the DDPM noise schedule (betas) of SD and SDXL")
    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(num_inference_steps)
    return sched


def inference_grid(scheduler_config, num_inference_steps: int) -> tuple[int, ...]:
    """The checkpoint's inference timesteps, largest first, as its scheduler config spaces
    them: SD's leading with steps_offset 1 gives 981, 961, ..., 1; without the offset
    980, ..., 0; trailing (zero-terminal-SNR and few-step models) 999, 979, ..., 19."""
    return tuple(int(t) for t in _scheduler(scheduler_config, num_inference_steps).timesteps)


def grid_text(grid: tuple[int, ...]) -> str:
    """A grid for messages: "981, 961, ..., 1" (or all of a short one)."""
    return ", ".join(map(str, grid)) if len(grid) <= 3 else f"{grid[0]}, {grid[1]}, ..., {grid[-1]}"


def modulation_start(grid: tuple[int, ...], t_modulate: int) -> int:
    """t_modulate on the grid: the default (config.follows_model) becomes the grid's nearest
    step; a value the user gave must be on it."""
    if t_modulate in grid:
        return int(t_modulate)
    near = sorted((t for t in grid if t > 0), key=lambda t: (abs(t - t_modulate), t))[:2]
    if follows_model(t_modulate) and near:
        return near[0]
    raise ConfigError(f"t_modulate={t_modulate} is not on this checkpoint's {len(grid)}-step schedule "
                      f"({grid_text(grid)}); the nearest steps are {' and '.join(map(str, sorted(near))) or 'none'}")


def is_edm(scheduler_config) -> bool:
    """EDM (Karras) schedulers, e.g. Playground v2.5's and CosXL's: a sigma schedule where
    EmerDiff's inversion needs the DDPM betas (only EDM schedulers carry sigma_data)."""
    return "sigma_data" in scheduler_config or str(scheduler_config.get("_class_name", "")).startswith("EDM")


def alphas_cumprod(scheduler_config) -> torch.Tensor:
    """alpha_bar(t) for t = 0 .. T-1, float64 (from the float32 values diffusers computes)."""
    return _scheduler(scheduler_config, 1).alphas_cumprod.double()


def noise_to(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0): sqrt(a_t) x_0 + sqrt(1 - a_t) n, in float64, returned in x0's dtype."""
    return (alpha_bar.sqrt() * x0.double() + (1 - alpha_bar).sqrt() * noise.double()).to(x0.dtype)


@dataclass(frozen=True)
class ReverseSchedule:
    """The grid and the reverse step's coefficients (SPEC 1.2) from t_modulate to the end."""

    grid: tuple[int, ...]       # every timestep of the inference grid, largest first (SD: 981, ..., 1)
    timesteps: torch.Tensor     # (S,) int64: t_modulate, ..., the last step above 0
    alpha: torch.Tensor         # (S,) float64 a_t
    alpha_prev: torch.Tensor    # (S,) a_p: a at the next grid step, or alpha_bar(0) after the last
    var: torch.Tensor           # (S,) (1 - a_p) / (1 - a_t) * (1 - a_t / a_p), > 0
    prediction: str = "epsilon"  # what the model outputs: "epsilon" or "v_prediction"

    def __len__(self) -> int:
        return int(self.timesteps.numel())

    @classmethod
    def build(cls, scheduler_config, config: EmerDiffConfig) -> "ReverseSchedule":
        prediction = scheduler_config.get("prediction_type", "epsilon")
        if prediction not in PREDICTIONS:
            raise ConfigError(f"the checkpoint predicts {prediction!r}; EmerDiff's reverse step needs a model "
                              "that predicts the noise (epsilon: SD 1.x, SD 2.x-base, SDXL) or v (v_prediction: "
                              "SD 2.x at 768 px)")
        sched = _scheduler(scheduler_config, config.num_inference_steps)
        grid = tuple(int(t) for t in sched.timesteps)
        start = modulation_start(grid, config.t_modulate)
        if scheduler_config.get("set_alpha_to_one", False):
            # SD's configs say false; with alpha_bar_prev = 1 the last step has zero variance and
            # z_t is undefined, so the last step uses alpha_bar(0) as SD does (SPEC 1.2).
            warnings.warn("scheduler config has set_alpha_to_one=True; EmerDiff uses alpha_bar(0) at the "
                          "last step, as Stable Diffusion's schedulers do", stacklevel=3)
        ac = sched.alphas_cumprod.double()
        # a_p: alpha_bar at the next grid step, alpha_bar(0) after the last. A grid's t = 0 step
        # (no steps_offset) would go from alpha_bar(0) to alpha_bar(0): it moves nothing and has
        # zero variance (no z_t to solve), so the walk ends before it.
        after = dict(zip(grid, grid[1:]))
        steps = [t for t in grid if 0 < t <= start]
        a_t = ac[steps]
        a_p = torch.stack([ac[after[t]] if after.get(t, 0) > 0 else ac[0] for t in steps])
        if (a_t == 0).any():  # zero terminal SNR: x_0 = (x - sqrt(1 - a) eps) / sqrt(a) divides by 0
            raise ConfigError(f"t_modulate={start}: this checkpoint's alpha_bar is 0 there (a zero-terminal-SNR "
                              "schedule) and the inversion divides by its root: give a lower t_modulate")
        if not 1 <= config.modulate_steps <= len(steps):
            raise ConfigError(f"modulate_steps must lie in [1, {len(steps)}] on this checkpoint's schedule from "
                              f"t_modulate={start}, got {config.modulate_steps}")
        var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        return cls(grid, torch.tensor(steps), a_t, a_p, var, prediction)


@dataclass
class Trajectory:
    """One image's sampled latents and the reverse step on them, on the run's device.

    mean(i, x, eps) is the reverse step without its noise term (mu_t);
    step(i, x, eps, z) = mu_t + sqrt(var_t) z (DDIM with eta = 1, SPEC 1.2).
    """

    timesteps: torch.Tensor       # (S,) int64
    latents: torch.Tensor         # (S + 1, 1, C, h, w): sampled x_t of each step, then x_0
    sqrt_alpha: torch.Tensor      # (S,)
    sqrt_one_minus: torch.Tensor  # (S,)
    sqrt_alpha_prev: torch.Tensor
    direction: torch.Tensor       # sqrt(1 - a_p - var)
    std: torch.Tensor             # sqrt(var)
    prediction: str = "epsilon"   # the model's output (ReverseSchedule.prediction)

    def __len__(self) -> int:
        return int(self.timesteps.numel())

    def epsilon(self, i: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The model's output at step i turned into the noise estimate (epsilon_from)."""
        return epsilon_from(self.prediction, out, x, self.sqrt_alpha[i], self.sqrt_one_minus[i])

    def mean(self, i: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        x0 = (x - self.sqrt_one_minus[i] * eps) / self.sqrt_alpha[i]
        return self.sqrt_alpha_prev[i] * x0 + self.direction[i] * eps

    def step(self, i: int, x: torch.Tensor, eps: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.mean(i, x, eps) + self.std[i] * z

    def solve_noise(self, i: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z_t such that step(i, x, eps, z_t) lands on the next sampled latent (SPEC 1.5)."""
        return (self.latents[i + 1] - self.mean(i, x, eps)) / self.std[i]

    def anchored_step(self, i: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The fast path's step, for a batch whose member 0 is the reference run at latents[i].

        With z_t = (x_prev_s - mu(x_ref, eps_ref)) / std (solve_noise), every member's step is
        mu(x_b, eps_b) + std z_t = x_prev_s + mu(x_b, eps_b) - mu(x_ref, eps_ref): the same
        function as the reference path, without dividing by std and multiplying back. Member
        0 gets x_prev_s + (mu_0 - mu_0) = x_prev_s exactly, so it stays on the sampled latents
        and its attention is the reference run's at every step.
        """
        mu = self.mean(i, x, eps)
        return self.latents[i + 1] + (mu - mu[:1])


def trajectory_noise(seed: int, latent_shape: tuple[int, ...], grid: tuple[int, ...]) -> torch.Tensor:
    """(G, 1, *latent_shape): one independent draw per grid timestep, in `grid` order, drawn
    on the CPU in the notebook's order (smallest t first) so results depend on the seed alone."""
    g = torch.Generator().manual_seed(seed)
    draws = {t: torch.randn((1, *latent_shape), generator=g) for t in sorted(grid)}
    return torch.stack([draws[t] for t in grid])


def feature_noise(seed: int, latent_shape: tuple[int, ...], samples: int) -> torch.Tensor:
    """(samples, *latent_shape) noise for the feature run (SPEC 1.3), drawn on the CPU from
    `seed` (the notebook seeds this generator with the same ddpm_seed as the inversion)."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn((1, *latent_shape), generator=g) for _ in range(samples)])


def latent_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """Latents and the reverse step stay in float32 (float64 for a float64 model)."""
    return torch.float64 if model_dtype == torch.float64 else torch.float32


def sample_trajectory(schedule: ReverseSchedule, x0: torch.Tensor, noise: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> Trajectory:
    """x0 (1, C, h, w), noise from trajectory_noise -> the sampled latents from t_modulate
    down, then x_0 itself (SPEC 1.5), with the step coefficients, on x0's device."""
    first = schedule.grid.index(int(schedule.timesteps[0]))
    a = schedule.alpha.to(x0.device)[:, None, None, None, None]  # the walk's steps: grid[first:first + S]
    sampled = noise_to(x0.double()[None], noise[first:first + len(schedule)].to(x0.device), a)
    latents = torch.cat([sampled, x0.double()[None]])

    def cast(t):
        return t.to(device=x0.device, dtype=dtype)

    return Trajectory(schedule.timesteps.to(x0.device), cast(latents), cast(schedule.alpha.sqrt()),
                      cast((1 - schedule.alpha).sqrt()), cast(schedule.alpha_prev.sqrt()),
                      cast((1 - schedule.alpha_prev - schedule.var).sqrt()), cast(schedule.var.sqrt()),
                      schedule.prediction)


Update = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def denoise(unet, traj: Trajectory, x: torch.Tensor, update: Update, state, cond: Conditioning,
            model_dtype: torch.dtype, modulate_steps: int, on_step: Callable[[], None] | None = None,
            prefix=None) -> torch.Tensor:
    """Walk the trajectory from t_modulate to the end: x <- update(i, x, eps) per step, eps
    the model's output as a noise estimate (Trajectory.epsilon); cond: the empty prompt.

    `state` (attention.RunState) learns the step index and whether to modulate now. The loop
    body reads no tensor values on the host, and every UNet call has the same shapes.
    `on_step` (a progress tick) is called after each step's launches, without a sync.
    `prefix` (prefix.PrefixState, fast path): at step 0, where every member's input is the
    same, the UNet runs on member 0 and its hooks widen the batch at the modulated block.
    """
    batch, one = cond.kwargs(x.shape[0]), cond.kwargs(1)
    for i in range(len(traj)):
        state.step = i
        state.modulate_now = state.modulation is not None and i < modulate_steps
        if prefix is not None and i == 0:
            prefix.width = x.shape[0]
            try:
                out = unet(x[:1].to(model_dtype), traj.timesteps[i], **one).sample
            finally:
                prefix.width = 0
        else:
            out = unet(x.to(model_dtype), traj.timesteps[i], **batch).sample
        x = update(i, x, traj.epsilon(i, x, out.to(x.dtype)))
        if on_step is not None:
            on_step()
    return x


def reference_run(unet, traj: Trajectory, state, cond: Conditioning, model_dtype: torch.dtype,
                  on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """The unmodulated run of SPEC 1.5: the UNet at each sampled x_t (the processors in
    `state` record what injection needs), and the noise maps z_t: (S, 1, C, h, w)."""
    zs = []

    def update(i, x, eps):
        zs.append(traj.solve_noise(i, x, eps))
        return traj.latents[i + 1]

    denoise(unet, traj, traj.latents[0], update, state, cond, model_dtype, modulate_steps=0, on_step=on_step)
    return torch.stack(zs)
