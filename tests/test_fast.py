"""The fast path computes the reference path's function (issue 3's equivalence contract)."""
import numpy as np
import pytest
import torch

from emerdiff_fast import EmerDiff, EmerDiffConfig
from emerdiff_fast.batching import chunk_plan
from emerdiff_fast.engine import FastOptions

from conftest import rel_err


def _pair(pipe, cfg, image, **fast_kwargs):
    ref = EmerDiff(pipe, cfg, backend="reference")(image)
    fast = EmerDiff(pipe, cfg, backend="fast", **fast_kwargs)(image)
    return ref, fast


@pytest.mark.parametrize("seed, k, res, max_batch, size", [
    (0, 8, 128, 6, (100, 140)),   # 16 members in chunks of 6: K does not divide the chunk
    (1, 5, 128, None, (128, 128)),
    (2, 3, 64, 4, (50, 37)),
    (3, 4, 128, 2, (90, 90)),     # one +/- pair per chunk
])
def test_fast_matches_reference(tiny_pipe, rand_image, seed, k, res, max_batch, size):
    cfg = EmerDiffConfig(num_masks=k, resolution=res, seed=seed)
    ref, fast = _pair(tiny_pipe, cfg, rand_image(seed, *size), max_batch=max_batch)
    assert np.array_equal(fast.low_res_labels, ref.low_res_labels)
    assert rel_err(fast.difference_maps, ref.difference_maps) < 1e-4
    assert (fast.labels == ref.labels).mean() >= 0.999
    assert np.allclose(fast.mask_embeddings, ref.mask_embeddings, atol=1e-5)


@pytest.mark.parametrize("options", [
    FastOptions(share_attention=False, reuse_cross_attention=False),   # batching alone (replay)
    FastOptions(reuse_cross_attention=False),                          # + shared P, per-member cross-attn
    FastOptions(triton_modulation=False, triton_kmeans=False),         # plain-PyTorch modulation/k-means
    FastOptions(triton_attention=True),                                # shared-P attention op
    FastOptions(prefix_sharing=False),                                 # step 0 at full batch
], ids=["replay", "no-cross-reuse", "no-triton", "triton-attention", "no-prefix"])
def test_every_technique_subset_matches_reference(tiny_pipe, rand_image, options):
    """The waterfall's intermediate rows compute the same function as the reference path.
    The interpreted shared-P kernel runs on a 10-step grid (4 denoising steps from t = 301):
    every attention call goes through it, so the point holds at any step count."""
    cfg = EmerDiffConfig(num_masks=3, resolution=64, seed=4)
    if options.triton_attention:
        cfg = cfg.replace(num_inference_steps=10, t_modulate=301)
    ref, fast = _pair(tiny_pipe, cfg, rand_image(4, 64, 64), max_batch=4, options=options)
    assert rel_err(fast.difference_maps, ref.difference_maps) < 1e-4
    assert (fast.labels == ref.labels).mean() >= 0.999


@pytest.mark.usefixtures("triton_off")  # the memory format: not the kernels (conftest)
def test_channels_last_matches_reference(rand_image):
    from emerdiff_fast import load_pipeline

    pipe = load_pipeline("tiny")  # channels_last converts the modules in place: own copy
    cfg = EmerDiffConfig(num_masks=3, resolution=64, seed=6)
    ref = EmerDiff(pipe, cfg, backend="reference")(rand_image(6, 64, 64))
    fast = EmerDiff(pipe, cfg, backend="fast", options=FastOptions(channels_last=True))(rand_image(6, 64, 64))
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(fast.difference_maps, ref.difference_maps) < 1e-4


@pytest.mark.usefixtures("triton_off")  # the decode's slices: not the kernels (conftest)
def test_decode_batch_splitting_pairs_changes_nothing(tiny_pipe, rand_image):
    """Decoding in slices that cut a (+, -) pair apart gives the same maps."""
    cfg = EmerDiffConfig(num_masks=3, resolution=64, seed=7)
    whole = EmerDiff(tiny_pipe, cfg, backend="fast", decode_batch=6)(rand_image(7, 64, 64))
    sliced = EmerDiff(tiny_pipe, cfg, backend="fast", decode_batch=3)(rand_image(7, 64, 64))
    assert rel_err(sliced.difference_maps, whole.difference_maps) < 1e-4
    with pytest.raises(ValueError, match="decode_batch"):
        EmerDiff(tiny_pipe, cfg, backend="fast", decode_batch=0)


def test_options_need_the_fast_backend(tiny_pipe):
    with pytest.raises(ValueError, match="fast"):
        EmerDiff(tiny_pipe, EmerDiffConfig(num_masks=3, resolution=64), backend="reference", options=FastOptions())
    with pytest.raises(ValueError, match="share_attention"):
        FastOptions(share_attention=False)


def test_fast_with_triton_killed_matches(tiny_pipe, rand_image, monkeypatch):
    cfg = EmerDiffConfig(num_masks=4, resolution=64)
    with_triton = EmerDiff(tiny_pipe, cfg, backend="fast")(rand_image(5, 64, 64))
    monkeypatch.setenv("EMERDIFF_DISABLE_TRITON", "1")
    without = EmerDiff(tiny_pipe, cfg, backend="fast")(rand_image(5, 64, 64))
    assert rel_err(with_triton.difference_maps, without.difference_maps) < 1e-5


@pytest.mark.usefixtures("triton_off")  # batching images: not the kernels (conftest)
def test_batch_of_three_equals_three_calls(tiny_pipe, rand_image):
    cfg = EmerDiffConfig(num_masks=4, resolution=64)
    seg = EmerDiff(tiny_pipe, cfg, backend="fast")
    images = [rand_image(s, 64 + 8 * s, 70) for s in range(3)]
    together = seg(images)
    for img, res in zip(images, together):
        single = EmerDiff(tiny_pipe, cfg, backend="reference")(img)
        assert res.labels.shape == single.labels.shape
        assert rel_err(res.difference_maps, single.difference_maps) < 1e-4
        assert (res.labels == single.labels).mean() >= 0.999


def test_chunk_plan_pairs_and_pads():
    plans = chunk_plan(3, 4)
    assert plans == [([0, 0, 1, 1], [1, -1, 1, -1]), ([2, 2, 0, 0], [1, -1, 0, 0])]
    assert chunk_plan(2, 4) == [([0, 0, 1, 1], [1, -1, 1, -1])]


@pytest.mark.usefixtures("triton_off")  # the compiled graphs: not the kernels (conftest)
def test_compiled_unet_traces_once(tiny_pipe, rand_image):
    """Static shapes and no tensor-dependent branching: after the first image (one graph
    with modulation, one without), further chunks and images reuse the compiled graphs."""
    torch._dynamo.reset()
    cfg = EmerDiffConfig(num_masks=3, resolution=64)
    seg = EmerDiff(tiny_pipe, cfg, backend="fast", max_batch=4)
    seg.unet_call = torch.compile(tiny_pipe.unet, backend="eager", fullgraph=True, dynamic=False)
    from torch._dynamo.utils import counters

    counters.clear()
    first = seg(rand_image(0, 64, 64))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2  # step 0 (member 0 in, widened at the modulated block) and the later steps
    with torch._dynamo.config.patch(error_on_recompile=True):
        seg(rand_image(1, 64, 64))
    assert counters["stats"]["unique_graphs"] == graphs
    eager = EmerDiff(tiny_pipe, cfg, backend="fast", max_batch=4)(rand_image(0, 64, 64))
    assert rel_err(first.difference_maps, eager.difference_maps) < 1e-5


def test_prefix_sharing_runs_step_0_on_one_member(tiny_pipe, rand_image):
    """Step 0 calls the UNet with member 0 alone and still yields every member's output;
    the later steps run the whole chunk."""
    cfg = EmerDiffConfig(num_masks=3, resolution=64, seed=8)
    seg = EmerDiff(tiny_pipe, cfg, backend="fast", max_batch=6)
    batches, widened = [], []
    h1 = tiny_pipe.unet.register_forward_pre_hook(lambda m, a, k: batches.append(a[0].shape[0] if a else
                                                                                 k["sample"].shape[0]),
                                                  with_kwargs=True)
    h2 = tiny_pipe.unet.register_forward_hook(lambda m, a, o: widened.append(o.sample.shape[0]))
    try:
        fast = seg(rand_image(8, 64, 64))
    finally:
        h1.remove()
        h2.remove()
    steps = len(seg.schedule.timesteps)
    # one feature call (feature_samples members, stopped early: no output), then one chunk
    assert batches[1:] == [1] + [7] * (steps - 1) and widened == [7] * steps
    ref = EmerDiff(tiny_pipe, cfg, backend="reference")(rand_image(8, 64, 64))
    assert rel_err(fast.difference_maps, ref.difference_maps) < 1e-4


def test_prefix_sharing_steps_aside_for_other_layers(tiny_pipe, rand_image):
    """A modulated layer that is not its up block's last attention: no widening hooks
    (a later resnet would concatenate batch-1 skips); the result is still the method's."""
    from emerdiff_fast.prefix import supported

    layer = "up_blocks.1.attentions.1.transformer_blocks.0.attn2"
    assert supported(tiny_pipe.unet, layer) is None
    assert supported(tiny_pipe.unet, EmerDiffConfig().modulated_layer) == (1, 2)
    cfg = EmerDiffConfig(num_masks=3, resolution=64, seed=9, modulated_layer=layer)
    ref, fast = _pair(tiny_pipe, cfg, rand_image(9, 64, 64), max_batch=6)
    assert rel_err(fast.difference_maps, ref.difference_maps) < 1e-4


@pytest.mark.usefixtures("triton_off")  # the compiled decode: not the kernels (conftest)
def test_compiled_decode_one_static_batch(tiny_pipe, rand_image):
    """compile also compiles the VAE decode; a last slice smaller than decode_batch is
    padded, so the decode traces one graph, and the maps do not change."""
    torch._dynamo.reset()
    cfg = EmerDiffConfig(num_masks=3, resolution=64, seed=10)
    seg = EmerDiff(tiny_pipe, cfg, backend="fast", decode_batch=4)  # 6 images: slices of 4 and 2
    seg.vae_decode = torch.compile(tiny_pipe.vae.decode, backend="eager", fullgraph=True, dynamic=False)
    assert seg.static_decode
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = seg(rand_image(10, 64, 64))
    assert counters["stats"]["unique_graphs"] == 1
    eager = EmerDiff(tiny_pipe, cfg, backend="fast", decode_batch=4)(rand_image(10, 64, 64))
    assert rel_err(compiled.difference_maps, eager.difference_maps) < 1e-5
    assert EmerDiff(tiny_pipe, cfg, backend="fast", compile=True).static_decode
    assert not EmerDiff(tiny_pipe, cfg, backend="fast", compile=True, compile_decode=False).static_decode
    with pytest.raises(ValueError, match="compile_decode needs compile"):
        EmerDiff(tiny_pipe, cfg, backend="fast", compile_decode=True)
