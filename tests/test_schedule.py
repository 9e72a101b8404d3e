import pytest
import torch

from emerdiff_fast import EmerDiffConfig
from emerdiff_fast.schedule import add_noise, build_sampler, make_scheduler

SHAPE = (4, 16, 16)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampler_matches_diffusers_step(tiny_pipe, sampler):
    """Each precomputed-coefficient step equals diffusers' scheduler.step when given the
    noise diffusers itself draws (DDPM draws torch.randn(shape, generator) per step)."""
    cfg = EmerDiffConfig(resolution=128, num_masks=4, sampler=sampler)
    noise = torch.stack([torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(100 + i),
                                     dtype=torch.float64) for i in range(15)])
    ours = build_sampler(tiny_pipe, cfg, SHAPE, noise)
    sched = make_scheduler(tiny_pipe, sampler, 50)
    assert ours.timesteps.tolist() == list(range(281, 0, -20))
    g = torch.Generator().manual_seed(3)
    x = torch.randn((1, *SHAPE), generator=g, dtype=torch.float64)
    for i, t in enumerate(ours.timesteps.tolist()):
        eps = torch.randn((1, *SHAPE), generator=g, dtype=torch.float64)
        kwargs = {"generator": torch.Generator().manual_seed(100 + i)} if sampler == "ddpm" else {"eta": 0.0}
        expected = sched.step(eps, t, x, **kwargs).prev_sample
        got = ours.step(i, eps, x)
        # diffusers keeps alpha_bar in float32; ours are float64 from the same values
        assert torch.allclose(got, expected, rtol=1e-6, atol=2e-6), (i, t, (got - expected).abs().max())
        x = expected


def test_add_noise_matches_scheduler(tiny_pipe):
    x0, eps = torch.randn(1, *SHAPE), torch.randn(1, *SHAPE)
    sched = make_scheduler(tiny_pipe, "ddpm", 50)
    expected = sched.add_noise(x0, eps, torch.tensor([281]))
    assert torch.allclose(add_noise(tiny_pipe.scheduler.config, x0, eps, 281), expected, atol=1e-6)
