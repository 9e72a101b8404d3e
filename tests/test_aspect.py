"""Aspect ratio kept (issue 18 item 7): the authors' notebook's load_img(resize_to_512=False),
non-square latents and feature grids through both paths, the memory model and the kernels."""
import math
from collections import Counter

import numpy as np
import pytest
import torch

from emerdiff_fast import EmerDiff, EmerDiffConfig
from emerdiff_fast.config import ConfigError, size_multiple
from emerdiff_fast.engine import FastOptions
from emerdiff_fast.images import processing_size
from emerdiff_fast.kernels._dispatch import LAUNCHES

from conftest import rel_err


def _notebook_size(w, h, res=512):
    """The notebook's load_img, line for line: (W, H)."""
    fac = math.sqrt(res * res / w / h)
    w, h = int(w * fac), int(h * fac)
    return tuple(x - x % 64 for x in (w + 63, h + 63))


@pytest.mark.parametrize("w, h", [(640, 480), (480, 640), (1024, 683), (512, 512), (333, 1000), (2000, 97)])
def test_processing_size_is_the_notebooks(w, h):
    nw, nh = _notebook_size(w, h)
    assert processing_size((w, h), 512, 64, keep_aspect=True) == (nh, nw)
    assert processing_size((w, h), 512, 64, keep_aspect=False) == (512, 512)


def test_a_strip_keeps_one_multiple():
    # the notebook's formula gives a side of 0 here; a side is at least one multiple
    assert processing_size((5000, 2), 512, 64, keep_aspect=True)[0] == 64


def test_tiny_model_multiple(tiny_pipe):
    assert size_multiple(tiny_pipe.unet.config, tiny_pipe.vae.config) == 64  # 8 (VAE) x 2^3 (UNet)


@pytest.fixture(scope="module")
def wide_pair(tiny_pipe):
    """A 90x40 (W x H) image with keep_aspect at 64: processed at 128x64, feature grid 4x2."""
    image = torch.rand(3, 40, 90, generator=torch.Generator().manual_seed(11))
    cfg = EmerDiffConfig(num_masks=3, resolution=64, seed=11, keep_aspect=True, kmeans_restarts=2)
    ref = EmerDiff(tiny_pipe, cfg, backend="reference")(image)
    before = Counter(LAUNCHES)
    fast = EmerDiff(tiny_pipe, cfg, backend="fast", max_batch=4)(image)
    return image, cfg, ref, fast, LAUNCHES - before


def test_non_square_shapes(wide_pair):
    _, _, ref, fast, _ = wide_pair
    for r in (ref, fast):
        assert r.labels.shape == (40, 90)              # back at the input size
        assert r.low_res_labels.shape == (2, 4)         # (H, W) feature grid of 64 x 128 pixels
        assert r.difference_maps.shape == (3, 64, 128)


def test_non_square_fast_matches_reference(wide_pair):
    _, _, ref, fast, _ = wide_pair
    assert np.array_equal(fast.low_res_labels, ref.low_res_labels)
    assert rel_err(fast.difference_maps, ref.difference_maps) < 1e-4
    assert (fast.labels == ref.labels).mean() >= 0.999


def test_non_square_runs_the_kernels(wide_pair):
    """The fast path's Triton kernels, not their fallbacks, ran on the non-square grid."""
    launched = wide_pair[4]
    for op in ("modulate", "kmeans_assign", "kmeans_update"):
        assert launched[op] > 0, op


def test_shared_attention_kernel_non_square(tiny_pipe, rand_image, triton_ran):
    """The shared-P attention op (off by default) on a non-square grid, against the reference."""
    cfg = EmerDiffConfig(num_masks=2, resolution=64, seed=3, keep_aspect=True, kmeans_restarts=1,
                         kmeans_iterations=5, num_inference_steps=10, t_modulate=301)  # 4 steps: the interpreter is slow
    image = rand_image(3, 90, 40)  # 64 wide, 128 high
    ref = EmerDiff(tiny_pipe, cfg, backend="reference")(image)
    before = LAUNCHES["shared_attention"]
    fast = EmerDiff(tiny_pipe, cfg, backend="fast", options=FastOptions(triton_attention=True))(image)
    assert LAUNCHES["shared_attention"] > before
    assert fast.difference_maps.shape == (2, 128, 64)
    assert rel_err(fast.difference_maps, ref.difference_maps) < 1e-4


def test_squashed_differs_from_kept(tiny_pipe, wide_pair):
    image, cfg, ref, _, _ = wide_pair
    squashed = EmerDiff(tiny_pipe, cfg.replace(keep_aspect=False), backend="naive")(image)
    assert squashed.low_res_labels.shape == (2, 2) and squashed.labels.shape == (40, 90)


def test_mixed_sizes_equal_single_calls(tiny_pipe):
    cfg = EmerDiffConfig(num_masks=3, resolution=64, seed=2, keep_aspect=True, kmeans_restarts=2)
    seg = EmerDiff(tiny_pipe, cfg, backend="fast")
    images = [torch.rand(3, h, w, generator=torch.Generator().manual_seed(i))
              for i, (h, w) in enumerate([(40, 90), (90, 40), (41, 88)])]
    together = seg(images)
    assert [r.difference_maps.shape[1:] for r in together] == [(64, 128), (128, 64), (64, 128)]
    for img, res in zip(images, together):
        single = EmerDiff(tiny_pipe, cfg, backend="fast")(img)
        assert res.labels.shape == tuple(img.shape[1:])
        assert rel_err(res.difference_maps, single.difference_maps) < 1e-4  # batched encode: fp32 rounding
    # one chunk decision per processing size
    assert sorted(size for size, _ in seg.chunk_plan.chunks) == [(64, 128), (128, 64)]


def test_naive_non_square(tiny_pipe):
    cfg = EmerDiffConfig(num_masks=3, resolution=64, seed=2, keep_aspect=True)
    r = EmerDiff(tiny_pipe, cfg, backend="naive")(torch.rand(3, 40, 90))
    assert r.labels.shape == (40, 90) and r.low_res_labels.shape == (2, 4)


def test_too_few_positions_for_k():
    """K above a kept-aspect image's own grid (rounding can leave fewer positions than the
    square's): a clear error, or a skipped image."""
    from emerdiff_fast import load_pipeline

    cfg = EmerDiffConfig(num_masks=64, resolution=64, keep_aspect=True)  # the mini model: 8x8 = 64 at 64x64
    seg = EmerDiff(load_pipeline("mini"), cfg, backend="naive")
    strip = torch.rand(3, 241, 17)  # processed at 16x240: a 2x30 grid, 60 positions
    with pytest.raises(ConfigError, match="num_masks=64 exceeds the 60 low-resolution positions at 16x240"):
        seg(strip)
    assert seg([strip], errors="skip") == [None]


def test_memory_model_non_square(tiny_pipe):
    seg = EmerDiff(tiny_pipe, EmerDiffConfig(num_masks=4, resolution=128))
    small, wide, large = (seg.chunk_plan.memory_model(s) for s in ((128, 128), (128, 192), (192, 192)))
    assert wide.size == (128, 192)
    for f in (lambda m: m.unet_call(3), lambda m: m.decode(2)):
        assert f(small) < f(wide) < f(large)


def test_compiled_shapes_are_bounded_and_the_rest_run_eager(tiny_pipe, monkeypatch, our_log):
    """keep_aspect with compile: every processing size traces 2 UNet graphs, and past dynamo's
    recompile limit torch.compile would run eager silently after minutes of compiling. The
    segmenter compiles at most limit // 2 shapes and runs the rest eager, saying so. A
    stand-in for torch.compile records the latent sizes its calls see."""
    import torch._dynamo

    seen = Counter()

    def fake_compile(fn, **kwargs):
        def call(x, *args, **kw):
            seen[tuple(x.shape[-2:])] += 1
            return fn(x, *args, **kw)
        return call

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = EmerDiffConfig(num_masks=2, resolution=64, keep_aspect=True, feature_samples=1, kmeans_restarts=1)
    images = [torch.rand(3, h, w, generator=torch.Generator().manual_seed(h)) for h, w in ((64, 64), (40, 90), (90, 40))]
    # torch's own context manager: a monkeypatched config option can vanish when undone
    with torch._dynamo.config.patch(recompile_limit=5):  # room for 2 shapes of 2 graphs
        seg = EmerDiff(tiny_pipe, cfg, compile=True)
        compiled = seg(images)
    assert len(seg.compiled_shapes) == 2 and len(seg.eager_shapes) == 1
    assert set(seen) == {(8, 8), (8, 16)}  # the UNet's and the decode's latents; (16, 8) ran eager
    assert "(chunk 4) runs eager: 2 shapes are compiled already" in our_log.text
    eager = EmerDiff(tiny_pipe, cfg)(images)
    for c, e in zip(compiled, eager):
        np.testing.assert_array_equal(c.labels, e.labels)
