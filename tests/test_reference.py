"""The reference path on the tiny model: SPEC section 1 behaviour."""
import numpy as np
import pytest
import torch

from emerdiff_fast import EmerDiff, EmerDiffConfig
from emerdiff_fast.attention import (Modulation, ReferenceProcessor, RunState, SharedProcessor, find_module,
                                     installed, make_processors)

CFG = EmerDiffConfig(num_masks=4, resolution=128)


@pytest.fixture(scope="module")
def ref_result(tiny_pipe):
    return EmerDiff(tiny_pipe, CFG, backend="reference")(torch.rand(3, 70, 90, generator=torch.Generator().manual_seed(0)))


def test_shapes_dtypes_ranges(ref_result):
    r = ref_result
    assert r.labels.shape == (70, 90) and r.labels.dtype == np.int32
    assert r.low_res_labels.shape == (4, 4) and set(np.unique(r.low_res_labels)) <= set(range(4))
    assert 0 <= r.labels.min() and r.labels.max() < 4
    assert r.difference_maps.shape == (4, 128, 128) and r.difference_maps.dtype == np.float32
    assert (r.difference_maps >= 0).all() and r.difference_maps.max() > 0
    assert r.mask_embeddings.shape == (4, 64)
    assert r.pixel_embeddings().shape == (70, 90, 64)
    assert {"encode", "features", "kmeans", "denoise", "decode", "postprocess"} <= set(r.timings)


def test_same_seed_same_output(tiny_pipe, ref_result):
    again = EmerDiff(tiny_pipe, CFG, backend="reference")(torch.rand(3, 70, 90, generator=torch.Generator().manual_seed(0)))
    assert np.array_equal(again.labels, ref_result.labels)
    assert np.array_equal(again.difference_maps, ref_result.difference_maps)


def _attn_inputs(attn, cross, batch=2, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, n, attn.to_q.in_features, generator=g)
    ctx = torch.randn(1, 77, attn.to_k.in_features, generator=g).expand(batch, -1, -1) if cross else None
    return h, ctx


@pytest.mark.parametrize("processor", [ReferenceProcessor, SharedProcessor])
def test_modulation_adds_exactly_c_times_mask(tiny_pipe, processor):
    name = CFG.modulated_layer
    attn = find_module(tiny_pipe.unet, name)
    h, ctx = _attn_inputs(attn, cross=True, batch=3)
    masks = (torch.rand(4, 16, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    mod = Modulation(masks, torch.tensor([0, 2, 3]), torch.tensor([0.0, 10.0, -10.0]))
    plain = processor(name, RunState(mode="record" if processor is ReferenceProcessor else "shared",
                                     modulated_layer=name))
    modded = processor(name, RunState(mode=plain.state.mode, modulated_layer=name, modulation=mod, modulate_now=True))
    with torch.inference_mode():
        base = plain(attn, h, ctx)
        out = modded(attn, h, ctx)
        expected = base + (mod.coef[:, None] * masks[mod.index])[:, :, None]
        assert torch.equal(out, expected)
        # not this layer, or not this step: unchanged
        other = processor("up_blocks.1.attentions.1.transformer_blocks.0.attn2", modded.state)
        assert torch.equal(other(attn, h, ctx), base)
        modded.state.modulate_now = False
        assert torch.equal(modded(attn, h, ctx), base)


def test_injection_changes_what_a_free_run_would_do(tiny_pipe):
    """Injection is active: a modulated run with injected P differs from one computing its
    own attention (otherwise the processors would not be installed where we think)."""
    seg = EmerDiff(tiny_pipe, CFG, backend="reference")
    with torch.inference_mode():
        x = torch.randn(2, 4, 16, 16)
        state = RunState(mode="record", modulated_layer=CFG.modulated_layer)
        with installed(tiny_pipe.unet, make_processors(tiny_pipe.unet, ReferenceProcessor, state)):
            tiny_pipe.unet(x[:1], 281, encoder_hidden_states=seg.context).sample
            state.mode = "inject"
            injected = tiny_pipe.unet(x[1:], 281, encoder_hidden_states=seg.context).sample
        free = tiny_pipe.unet(x[1:], 281, encoder_hidden_states=seg.context).sample
        assert not torch.allclose(injected, free, atol=1e-4)
        assert len(state.store) == len(tiny_pipe.unet.attn_processors)


@pytest.mark.parametrize("backend", ["reference", "naive"])
def test_inputs_of_every_kind(tiny_pipe, backend, photo_path):
    from PIL import Image

    seg = EmerDiff(tiny_pipe, CFG.replace(num_masks=3), backend=backend)
    rgba = np.random.default_rng(0).integers(0, 255, (50, 60, 4), dtype=np.uint8)
    gray = Image.open(photo_path).convert("L")
    outs = seg([str(photo_path), gray, rgba, torch.rand(1, 33, 47)])
    assert [o.labels.shape for o in outs] == [(80, 96), (80, 96), (50, 60), (33, 47)]


def test_bad_inputs(tiny_pipe, tmp_path):
    from emerdiff_fast import ImageError

    seg = EmerDiff(tiny_pipe, CFG, backend="naive")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    for item, words in [(bad, "not an image or corrupt"), (tmp_path / "missing.png", "not found"),
                        (torch.full((3, 8, 8), float("nan")), "NaN"), (np.zeros((4, 4, 3), np.float32), "uint8"),
                        (torch.rand(5, 8, 8), "CHW")]:
        with pytest.raises(ImageError, match=words):
            seg(item)


def test_naive_uses_the_same_low_res_masks(tiny_pipe, ref_result):
    naive = EmerDiff(tiny_pipe, CFG, backend="naive")(torch.rand(3, 70, 90, generator=torch.Generator().manual_seed(0)))
    assert np.array_equal(naive.low_res_labels, ref_result.low_res_labels)
    assert naive.difference_maps is None and naive.labels.shape == (70, 90)


def test_features_average_the_queries_of_every_noise_draw(tiny_pipe):
    """SPEC 1.3: one batched (partial) UNet call of `feature_samples` members, queries averaged."""
    from emerdiff_fast.sampling import feature_noise

    seg = EmerDiff(tiny_pipe, CFG.replace(feature_samples=3), backend="reference")
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    noise = feature_noise(0, (4, 16, 16), 3)
    batches = []
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    with torch.inference_mode():
        try:
            mean = seg.features(latent, noise)
        finally:
            hook.remove()
        singles = torch.stack([seg.features(latent, noise[i:i + 1]) for i in range(3)])
    assert batches == [3] and mean.shape == (16, 64)
    assert torch.allclose(mean, singles.mean(0), atol=1e-5)
    assert not torch.allclose(singles[0], singles[1], atol=1e-5)


def test_injected_probabilities_are_broadcast_not_copied_per_member():
    """SD 1.5's 64x64 self-attention at chunk 60: a per-member copy of P would hold
    60 x 8 x 4096 x 4096 bf16 values (16 GB); broadcasting holds P once (0.27 GB)."""
    from diffusers.models.attention_processor import Attention

    from emerdiff_fast.attention import ReferenceProcessor, RunState
    from emerdiff_fast.memory import peak_bytes

    batch, n, heads, d = 60, 4096, 8, 40
    with torch.device("meta"):
        attn = Attention(query_dim=heads * d, heads=heads, dim_head=d).to(torch.bfloat16)
        x = torch.empty(batch, n, heads * d, dtype=torch.bfloat16)
        q, k = torch.empty(heads, n, d, dtype=torch.bfloat16), torch.empty(heads, n, d, dtype=torch.bfloat16)
    state = RunState(mode="inject", store={("layer", 0): (q, k)})
    proc = ReferenceProcessor("layer", state)
    peak = peak_bytes(lambda: proc(attn, x), [*attn.parameters(), x, q, k])
    p_bytes = heads * n * n * 2
    assert peak < 4 * p_bytes, peak / p_bytes  # P, its softmax input, and member-sized activations


def test_attention_probabilities_never_read_an_uninitialised_input(monkeypatch):
    """diffusers' get_attention_scores is baddbmm(torch.empty(...), beta=0); inductor's matmul
    templates have read that uninitialised input (NaN rows under torch.compile). Emulated
    here by a baddbmm that does read it: both paths' processors must not call it, and must
    still give diffusers' own attention output."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    torch.manual_seed(0)
    self_attn = Attention(query_dim=32, heads=2, dim_head=16)
    cross_attn = Attention(query_dim=32, heads=2, dim_head=16, cross_attention_dim=24)
    x, ctx = torch.randn(3, 10, 32), torch.randn(1, 7, 24).expand(3, -1, -1)
    got = {}
    with torch.no_grad():
        want = {"self": self_attn(x[:1]), "cross": cross_attn(x[:1], encoder_hidden_states=ctx[:1])}
        real = torch.baddbmm
        monkeypatch.setattr(torch, "baddbmm", lambda inp, a, b, *, beta=1, alpha=1:
                            beta * torch.full_like(inp, float("nan")) + alpha * real(inp, a, b, beta=0))
        q = torch.randn(2, 10, 16)
        assert torch.isnan(self_attn.get_attention_scores(q, q)).all()  # the emulation bites
        for name, attn, context in (("self", self_attn, None), ("cross", cross_attn, ctx)):
            attn.set_processor(SharedProcessor(name, RunState(mode="shared", modulated_layer="none")))
            got[f"{name} shared"] = attn(x, encoder_hidden_states=context)[:1]
            attn.set_processor(ReferenceProcessor(name, RunState(mode="record", modulated_layer="none")))
            got[f"{name} reference"] = attn(x[:1], encoder_hidden_states=None if context is None else context[:1])
            attn.set_processor(AttnProcessor())
    for key, out in got.items():
        assert torch.isfinite(out).all(), key
        torch.testing.assert_close(out, want[key.split()[0]], rtol=1e-5, atol=1e-6)
