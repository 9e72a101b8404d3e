"""The inversion trajectory and the reverse step (SPEC 1.2, 1.5) against diffusers and by hand."""
import pytest
import torch

from emerdiff_fast import ConfigError, EmerDiffConfig
from emerdiff_fast.sampling import ReverseSchedule, alphas_cumprod, sample_trajectory, trajectory_noise

SHAPE = (4, 8, 8)
CFG = EmerDiffConfig(resolution=128, num_masks=4)


def _ddim(config):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(config, set_alpha_to_one=False)  # SD's setting (SPEC 1.2)
    sched.set_timesteps(50)
    sched.alphas_cumprod = sched.alphas_cumprod.double()  # float64 tables: compare the formula, not rounding
    sched.final_alpha_cumprod = sched.alphas_cumprod[0]
    return sched


def _trajectory(config, seed=0):
    schedule = ReverseSchedule.build(config, CFG)
    x0 = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    return schedule, sample_trajectory(schedule, x0, trajectory_noise(seed, SHAPE, schedule.grid), torch.float64), x0


def test_grid_and_last_step(tiny_pipe):
    schedule = ReverseSchedule.build(tiny_pipe.scheduler.config, CFG)
    assert schedule.grid[:2] == (981, 961) and schedule.grid[-1] == 1 and len(schedule.grid) == 50
    assert schedule.timesteps.tolist() == list(range(281, 0, -20))
    ac = alphas_cumprod(tiny_pipe.scheduler.config)
    # the tiny model's DDPMScheduler config does not say set_alpha_to_one: it must behave like SD
    assert schedule.alpha_prev[-1] == ac[0] and (schedule.var > 0).all()


def test_reverse_step_matches_diffusers_ddim_eta_one(tiny_pipe):
    sched = _ddim(tiny_pipe.scheduler.config)
    _, traj, _ = _trajectory(tiny_pipe.scheduler.config)
    g = torch.Generator().manual_seed(3)
    x = torch.randn((1, *SHAPE), generator=g, dtype=torch.float64)
    for i, t in enumerate(traj.timesteps.tolist()):
        eps = torch.randn((1, *SHAPE), generator=g, dtype=torch.float64)
        z = torch.randn((1, *SHAPE), generator=g, dtype=torch.float64)
        expected = sched.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
        got = traj.step(i, x, eps, z)
        assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12), (i, t, (got - expected).abs().max())
        x = expected


def test_sampled_latents_are_independent_draws_in_the_notebooks_order(tiny_pipe):
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) n_t with n_t the draws of one CPU generator taken for
    t = 1, 21, ..., 981 in that order; the trajectory ends on x0 itself."""
    schedule, traj, x0 = _trajectory(tiny_pipe.scheduler.config, seed=5)
    ac = alphas_cumprod(tiny_pipe.scheduler.config)
    g = torch.Generator().manual_seed(5)
    draws = {t: torch.randn((1, *SHAPE), generator=g) for t in range(1, 1000, 20)}
    assert traj.latents.shape == (16, 1, *SHAPE)
    for i, t in enumerate(traj.timesteps.tolist()):
        expected = ac[t].sqrt() * x0 + (1 - ac[t]).sqrt() * draws[t].double()
        assert torch.allclose(traj.latents[i], expected, atol=1e-12)
    assert torch.equal(traj.latents[-1], x0)


def test_solved_noise_lands_on_the_next_sample_and_anchored_step_is_the_same(tiny_pipe):
    _, traj, x0 = _trajectory(tiny_pipe.scheduler.config)
    g = torch.Generator().manual_seed(7)
    x = traj.latents[0]
    members = traj.latents[0] + 0.1 * torch.randn((3, *SHAPE), generator=g, dtype=torch.float64)
    for i in range(len(traj)):
        eps = torch.randn((1, *SHAPE), generator=g, dtype=torch.float64)  # the reference run's
        z = traj.solve_noise(i, x, eps)
        assert torch.allclose(traj.step(i, x, eps, z), traj.latents[i + 1], atol=1e-10)
        eps_b = torch.randn((3, *SHAPE), generator=g, dtype=torch.float64)
        batch = torch.cat([x, members])
        anchored = traj.anchored_step(i, batch, torch.cat([eps, eps_b]))
        assert torch.equal(anchored[:1], traj.latents[i + 1])  # member 0 stays on the samples exactly
        assert torch.allclose(anchored[1:], traj.step(i, members, eps_b, z), atol=1e-10)
        x, members = traj.latents[i + 1], anchored[1:]
    assert torch.equal(x, x0)


def test_checkpoints_that_do_not_fit(tiny_pipe):
    config = dict(tiny_pipe.scheduler.config)
    with pytest.raises(ConfigError, match="predicts 'sample'"):
        ReverseSchedule.build({**config, "prediction_type": "sample"}, CFG)
    with pytest.warns(UserWarning, match="set_alpha_to_one"):
        schedule = ReverseSchedule.build({**config, "set_alpha_to_one": True}, CFG)
    assert (schedule.var > 0).all()
    with pytest.raises(ConfigError, match="not on this checkpoint's 50-step schedule .* nearest steps are 261 and 281"):
        ReverseSchedule.build(config, CFG.replace(t_modulate=280))  # a value the user gave
    with pytest.raises(ConfigError, match=r"modulate_steps must lie in \[1, 15\]"):
        ReverseSchedule.build(config, CFG.replace(modulate_steps=16))
    from diffusers import EDMEulerScheduler

    with pytest.raises(ConfigError, match="EDM"):  # Playground v2.5, CosXL: not DDIM with default betas
        ReverseSchedule.build(dict(EDMEulerScheduler().config), CFG)


@pytest.mark.parametrize("extra, start", [
    ({"steps_offset": 0}, 280),                                   # grid 980, ..., 0
    ({"timestep_spacing": "trailing"}, 279),                      # 999, 979, ..., 19
    ({"timestep_spacing": "linspace"}, 285),                      # 999, 979, 958, ..., 0 (uneven)
    ({"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}, 279),
])
def test_default_t_modulate_follows_the_checkpoints_grid(tiny_pipe, extra, start):
    """Trailing spacing (zero-terminal-SNR, Lightning/Turbo-style configs) or no steps_offset:
    the default t_modulate becomes the grid's nearest step, and the inversion still lands
    exactly on every sampled latent (no zero variance, no division by zero)."""
    # (as the checkpoint's own file says them: not among the keys diffusers filled by default)
    config = {**{k: v for k, v in tiny_pipe.scheduler.config.items() if k != "_use_default_values"}, **extra}
    schedule, traj, x0 = _trajectory(config)
    assert int(schedule.timesteps[0]) == start and int(schedule.timesteps[-1]) > 0
    assert (schedule.alpha > 0).all() and (schedule.var > 0).all()
    nxt = {t: u for t, u in zip(schedule.grid, schedule.grid[1:])}
    for t, a_p in zip(schedule.timesteps.tolist(), schedule.alpha_prev):  # a_p: the next grid step's alpha
        expected = alphas_cumprod(config)[nxt[t] if nxt.get(t, 0) > 0 else 0]
        assert torch.isclose(a_p, expected)
    x, g = traj.latents[0], torch.Generator().manual_seed(1)
    for i in range(len(traj)):
        eps = torch.randn((1, *SHAPE), generator=g, dtype=torch.float64)
        z = traj.solve_noise(i, x, eps)
        assert torch.isfinite(z).all()
        assert torch.allclose(traj.step(i, x, eps, z), traj.latents[i + 1], atol=1e-10)
        x = traj.latents[i + 1]
    assert torch.equal(x, x0)
    if extra.get("rescale_betas_zero_snr"):  # alpha_bar(999) = 0: refused by name, not NaN
        with pytest.raises(ConfigError, match="alpha_bar is 0"):
            ReverseSchedule.build(config, CFG.replace(t_modulate=999))


def test_the_segmenter_says_once_where_t_modulate_moved(tiny_pipe, our_log, monkeypatch):
    from diffusers import DDIMScheduler

    from emerdiff_fast import EmerDiff, load_pipeline, segmenter

    monkeypatch.setattr(segmenter, "_SAID", set())  # the once-only messages, fresh for this test

    pipe = load_pipeline("tiny")
    own = {k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"}
    pipe.scheduler = DDIMScheduler.from_config({**own, "timestep_spacing": "trailing", "set_alpha_to_one": False})
    for _ in range(2):
        seg = EmerDiff(pipe, resolution=128, num_masks=4)
    assert seg.config.t_modulate == 279 and seg.schedule.timesteps[0] == 279
    assert our_log.text.count("t_modulate 281 is not on this checkpoint's 50-step schedule") == 1


def test_sd_skeleton_schedule_is_the_papers():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared" / "model-skeletons" / "sd15" / "scheduler" / "scheduler_config.json"
    if not path.exists():
        pytest.skip("../shared/model-skeletons not present")
    import json

    config = json.loads(path.read_text())
    schedule = ReverseSchedule.build(config, CFG)
    assert schedule.timesteps.tolist() == list(range(281, 0, -20))
    from diffusers import DDIMScheduler

    assert config["set_alpha_to_one"] is False  # so diffusers' own final_alpha_cumprod is alpha_bar(0)
    assert schedule.alpha_prev[-1] == DDIMScheduler.from_config(config).final_alpha_cumprod.double()
