"""An independent oracle of SPEC section 1, written the literal way (as the authors' notebook
does it), against the reference path; and the reconstruction property of both paths.

The oracle shares no code with the library beyond the model: its own 50-step edit-friendly
inversion pass, an unmodulated run that records Q and K, a per-mask loop of (-lam, +lam)
runs whose attention processors overwrite Q and K with the recorded ones (scaled dot-product
attention, as the notebook), diffusers' own DDIMScheduler.step(eta=1, variance_noise=z) as
the reverse step, and a 3x3 Gaussian blur (sigma 0.8, reflect) of the decoded images. It
runs in float64, so what is compared is the algorithm, not rounding.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emerdiff_fast import EmerDiff, EmerDiffConfig, load_pipeline

from conftest import rel_err


class _OracleControl:
    def __init__(self, modulated_layer, t_modulate):
        self.mode, self.t, self.store = "plain", None, {}
        self.modulated_layer, self.t_modulate = modulated_layer, t_modulate
        self.mask = self.lams = None


class _OracleProcessor:
    def __init__(self, name, ctl):
        self.name, self.ctl = name, ctl

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        ctl, b = self.ctl, hidden_states.shape[0]
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        if ctl.mode == "record":
            ctl.store[(ctl.t, self.name)] = (q, k)
        elif ctl.mode == "replay":
            q0, k0 = ctl.store[(ctl.t, self.name)]
            q, k = q0.expand(b, -1, -1), k0.expand(b, -1, -1)
        d = q.shape[-1] // attn.heads

        def heads(t):
            return t.reshape(b, -1, attn.heads, d).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        out = attn.to_out[0](out.transpose(1, 2).reshape(b, -1, attn.heads * d))
        if ctl.mode == "replay" and self.name == ctl.modulated_layer and ctl.t == ctl.t_modulate:
            out = out + ctl.lams[:, None, None] * ctl.mask[None, :, None]
        return attn.to_out[1](out)


def _blur3x3(img):
    w1 = torch.exp(-0.5 * (torch.tensor([-1.0, 0.0, 1.0], dtype=img.dtype) / 0.8) ** 2)
    w1 = w1 / w1.sum()
    kernel = (w1[:, None] * w1[None, :]).expand(img.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(img, (1, 1, 1, 1), mode="reflect"), kernel, groups=img.shape[1])


@torch.no_grad()
def oracle_difference_maps(pipe, pixels, low_res_labels, cfg):
    """pixels (1, 3, H, W) in [-1, 1]; low_res_labels (N,) -> (K, H, W) difference maps."""
    from diffusers import DDIMScheduler

    unet, vae = pipe.unet, pipe.vae
    sched = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=False)
    sched.set_timesteps(cfg.num_inference_steps)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.final_alpha_cumprod = sched.alphas_cumprod[0]
    ac, ts = sched.alphas_cumprod, [int(t) for t in sched.timesteps]
    ctx = pipe.encode_prompt("", "cpu", 1, False)[0]
    x0 = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    # edit-friendly inversion: an independent noisy latent per timestep, then solve every z_t
    g = torch.Generator().manual_seed(cfg.seed)
    xs = {t: ac[t].sqrt() * x0 + (1 - ac[t]).sqrt() * torch.randn(x0.shape, generator=g).double()
          for t in reversed(ts)}
    chain = [xs[t] for t in ts] + [x0]
    zs = {}
    for i, t in enumerate(ts):  # all 50 steps, like the notebook
        eps = unet(chain[i], t, encoder_hidden_states=ctx).sample
        mu = sched.step(eps, t, chain[i], eta=1.0, variance_noise=torch.zeros_like(x0)).prev_sample
        prev = t - 1000 // cfg.num_inference_steps
        std = math.sqrt(float(sched._get_variance(t, prev)))
        zs[t] = (chain[i + 1] - mu) / std
    tail = [t for t in ts if t <= cfg.t_modulate]
    ctl = _OracleControl(cfg.modulated_layer, cfg.t_modulate)
    original = unet.attn_processors
    unet.set_attn_processor({k: _OracleProcessor(k.removesuffix(".processor"), ctl) for k in original})
    try:
        ctl.mode, x = "record", xs[cfg.t_modulate]
        for t in tail:  # the unmodulated run from x_{t_m} with the z_t, recording Q and K
            ctl.t = t
            eps = unet(x, t, encoder_hidden_states=ctx).sample
            x = sched.step(eps, t, x, eta=1.0, variance_noise=zs[t]).prev_sample
        ctl.mode, maps = "replay", []
        ctl.lams = torch.tensor([-cfg.lam, cfg.lam], dtype=x0.dtype)
        for i in range(cfg.num_masks):
            ctl.mask = (low_res_labels == i).to(x0.dtype)
            x = xs[cfg.t_modulate].expand(2, -1, -1, -1)
            for t in tail:
                ctl.t = t
                eps = unet(x, t, encoder_hidden_states=ctx.expand(2, -1, -1)).sample
                x = sched.step(eps, t, x, eta=1.0, variance_noise=zs[t].expand(2, -1, -1, -1)).prev_sample
            imgs = _blur3x3(vae.decode(x / vae.config.scaling_factor).sample)
            maps.append(torch.linalg.norm(imgs[0] - imgs[1], dim=0))
    finally:
        unet.set_attn_processor(original)
    return torch.stack(maps)


@pytest.fixture(scope="module")
def pipe64():
    return load_pipeline("tiny", dtype=torch.float64)


@pytest.mark.parametrize("seed, k", [(0, 3), (1, 6), (2, 6), (3, 3)])
def test_reference_path_matches_the_oracle(pipe64, rand_image, seed, k):
    from emerdiff_fast.images import load_image, to_model_input

    cfg = EmerDiffConfig(num_masks=k, resolution=128, seed=seed)
    image = rand_image(seed, 128, 128)
    ref = EmerDiff(pipe64, cfg, backend="reference")(image)
    pixels = to_model_input(load_image(image), cfg.resolution)[None].double()
    expected = oracle_difference_maps(pipe64, pixels, torch.from_numpy(ref.low_res_labels).flatten(), cfg).numpy()
    assert rel_err(ref.difference_maps, expected) <= 1e-5
    assert (ref.labels == expected.argmax(0)).mean() >= 0.999


def test_reference_path_matches_the_oracle_non_square(pipe64, rand_image):
    """keep_aspect: the notebook's load_img(resize_to_512=False) size, computed here on its own."""
    from emerdiff_fast.images import load_image, to_model_input

    cfg = EmerDiffConfig(num_masks=4, resolution=128, seed=5, keep_aspect=True)
    image = rand_image(5, 100, 140)  # (H, W)
    fac = math.sqrt(128 * 128 / 140 / 100)
    w, h = (x - x % 64 for x in (int(140 * fac) + 63, int(100 * fac) + 63))
    assert (h, w) == (128, 192)
    ref = EmerDiff(pipe64, cfg, backend="reference")(image)
    pixels = to_model_input(load_image(image), (h, w))[None].double()
    expected = oracle_difference_maps(pipe64, pixels, torch.from_numpy(ref.low_res_labels).flatten(), cfg).numpy()
    assert expected.shape == (4, 128, 192)
    assert rel_err(ref.difference_maps, expected) <= 1e-5
    assert (ref.labels == F.interpolate(torch.from_numpy(expected.argmax(0))[None, None].float(), size=(100, 140),
                                        mode="nearest-exact")[0, 0].numpy()).mean() >= 0.999


def _final_latents(seg, image):
    """(input latent, the final latent of every modulated run) from one call."""
    seen = {"final": []}
    encode, decode = seg.encode, seg.decode
    seg.encode = lambda px: seen.setdefault("x0", encode(px))
    seg.decode = lambda lat: (seen["final"].append(lat.clone()), decode(lat))[1]
    result = seg(image)
    return seen["x0"], torch.cat(seen["final"]), result


@pytest.mark.parametrize("backend, max_batch", [("reference", None), ("fast", None), ("fast", 4)])
def test_lambda_zero_reconstructs_the_input_latent(tiny_pipe, rand_image, backend, max_batch):
    """Inversion, not regeneration: with lam = 0 every run ends on the photo's own latent."""
    cfg = EmerDiffConfig(num_masks=4, resolution=128, lam=0.0, seed=3)
    seg = EmerDiff(tiny_pipe, cfg, backend=backend, **({"max_batch": max_batch} if backend == "fast" else {}))
    x0, finals, result = _final_latents(seg, rand_image(3, 90, 120))
    assert finals.shape[0] == 2 * cfg.num_masks
    for run in finals:
        assert float((run - x0[0]).norm() / x0[0].norm()) <= 1e-5
    # identical inputs give identical images: exactly in the reference path's (+/-) pairs; in
    # the fast path up to the rounding of member-batched products (members sit in different
    # columns of one GEMM), far below the lam = 10 maps' scale (~1)
    tol = 0.0 if backend == "reference" else 1e-4
    assert np.abs(result.difference_maps).max() <= tol


def test_lambda_nonzero_moves_away_from_the_input(tiny_pipe, rand_image):
    seg = EmerDiff(tiny_pipe, EmerDiffConfig(num_masks=4, resolution=128, seed=3), backend="fast")
    x0, finals, result = _final_latents(seg, rand_image(3, 90, 120))
    assert min(float((run - x0[0]).norm() / x0[0].norm()) for run in finals) > 1e-3
    assert result.difference_maps.max() > 0.1
