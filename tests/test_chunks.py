"""The fast path's chunk on CUDA (queries mocked): counted from what the caching allocator
can hand out, decided once per (processing size, K), halved after an out-of-memory error."""
from pathlib import Path

import numpy as np
import pytest
import torch

from emerdiff_fast import EmerDiff, EmerDiffConfig, engine
from emerdiff_fast.memory import MemoryModel

pytestmark = pytest.mark.usefixtures("triton_off")  # the kernels are not the point here (conftest)

GB = 2 ** 30
SD15 = Path(__file__).resolve().parents[2] / "shared" / "model-skeletons" / "sd15"


def _mock_cuda(monkeypatch, free, reserved, allocated, total=80 * GB):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)


def _cuda_plan(unet_config, vae_config, dtype=torch.bfloat16):
    return engine.ChunkPlan(unet_config, vae_config, dtype, torch.device("cuda", 0), EmerDiffConfig().modulated_layer)


def test_chunk_is_the_same_for_image_1_and_image_2(tiny_pipe, monkeypatch):
    seg = _cuda_plan(dict(tiny_pipe.unet.config), dict(tiny_pipe.vae.config), dtype=torch.float32)
    size = (256, 256)
    model = seg.memory_model(size)
    budget = int(model.unet_call(21) / engine.MEMORY_SAFETY) + 2 ** 20  # some but not all 60 members fit
    expected = model.largest_chunk(engine.MEMORY_SAFETY * budget, 60, 8)
    assert 2 < expected < 60
    _mock_cuda(monkeypatch, free=budget + GB, reserved=0, allocated=GB)  # before image 1
    first = seg.chunk_size(size, 30)
    # after image 1 the allocator keeps its blocks: the driver reports 3 GB less free memory
    _mock_cuda(monkeypatch, free=budget - 2 * GB, reserved=3 * GB, allocated=GB)
    assert seg.chunk_size(size, 30) == first == expected
    plan = _cuda_plan(dict(tiny_pipe.unet.config), dict(tiny_pipe.vae.config), dtype=torch.float32)
    assert plan.chunk(size, 30) == expected
    _mock_cuda(monkeypatch, free=GB // 4, reserved=0, allocated=GB)  # whatever happens later,
    assert plan.chunk(size, 30) == expected                         # the plan holds


@pytest.mark.skipif(not (SD15 / "unet/config.json").exists(), reason="../shared/model-skeletons/sd15 not present")
@pytest.mark.parametrize("card_gb, others_gb, expected", [(24, 0, 60), (80, 0, 60), (24, 19, 6)])
def test_expected_chunk_at_sd_size(monkeypatch, card_gb, others_gb, expected):
    """SD 1.5, 512 px, K = 30, bf16, weights (2 GB) resident: every member fits one call on a
    free 24 or 80 GB card (the memory table's rows); with 19 GB held by another process the
    chunk shrinks, and its predicted peak fits the budget while the next size does not."""
    import json

    unet_cfg, vae_cfg = (json.loads((SD15 / f"{m}/config.json").read_text()) for m in ("unet", "vae"))
    seg = _cuda_plan(unet_cfg, vae_cfg)
    weights = MemoryModel.of(unet_cfg, vae_cfg, 512, torch.bfloat16, seg.modulated_layer).weights()
    free = card_gb * GB - weights - others_gb * GB
    _mock_cuda(monkeypatch, free=free, reserved=weights, allocated=weights, total=card_gb * GB)
    chunk = seg.chunk_size((512, 512), 30)
    assert chunk == expected
    model, budget = seg.memory_model((512, 512)), engine.MEMORY_SAFETY * free
    assert model.peak(chunk, min(chunk, 8)) <= budget
    if chunk < 60:
        assert model.peak(chunk + 2, 8) > budget


def test_out_of_memory_halves_the_chunk_and_keeps_it(tiny_pipe, rand_image, monkeypatch, our_log):
    real = engine.denoise
    widths = []

    def tight(unet, traj, x, *args, **kwargs):  # a "GPU" that fits at most 5 members per call
        widths.append(x.shape[0])
        if x.shape[0] > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(unet, traj, x, *args, **kwargs)

    monkeypatch.setattr(engine, "denoise", tight)
    cfg = EmerDiffConfig(num_masks=4, resolution=64, seed=3, feature_samples=2)
    seg = EmerDiff(tiny_pipe, cfg)
    image = rand_image(3, 64, 64)
    first = seg(image)
    assert widths == [9, 5, 5]                      # 8 members + reference, then 2 chunks of 4 + 1
    assert "retrying with 4" in our_log.text
    widths.clear()
    second = seg(image)
    assert widths == [5, 5]                          # kept for later images: no second failure
    monkeypatch.setattr(engine, "denoise", real)
    expected = EmerDiff(tiny_pipe, cfg, max_batch=4)(image)
    assert np.array_equal(first.labels, expected.labels) and np.array_equal(second.labels, expected.labels)


def test_out_of_memory_at_one_pair_gives_up_clearly(tiny_pipe, rand_image, monkeypatch):
    def never(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(engine, "denoise", never)
    seg = EmerDiff(tiny_pipe, EmerDiffConfig(num_masks=4, resolution=64, feature_samples=1))
    with pytest.raises(torch.cuda.OutOfMemoryError, match="even at 2 modulated runs"):
        seg(rand_image(0, 64, 64))
    assert seg.chunk_plan.chunk((64, 64), 4) == 2


class _StaticBuffers:
    """What a CUDA-graph replay does to outputs: every call returns the same buffer, so an
    output kept from an earlier call is overwritten by the next one."""

    def __init__(self, fn, **kwargs):
        self.fn, self.buffers, self.calls = fn, {}, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        out = self.fn(*args, **kwargs)
        buf = self.buffers.setdefault(tuple(out.sample.shape), torch.empty_like(out.sample))
        buf.copy_(out.sample)
        out.sample = buf
        return out


def test_cudagraph_modes_copy_kept_outputs_and_mark_steps(tiny_pipe, rand_image, monkeypatch):
    """On the CPU, a stand-in for torch.compile that reuses its output buffers like a CUDA
    graph replay; with it, reduce-overhead must still give the eager result. What only a GPU
    can confirm: real cudagraph trees accept these calls without 'overwritten by a subsequent
    run' errors and without re-recording per image (benchmarks/gpu_session.sh)."""
    from emerdiff_fast import segmenter

    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    monkeypatch.setattr(segmenter.torch, "compile", _StaticBuffers)
    cfg = EmerDiffConfig(num_masks=4, resolution=64, seed=1, feature_samples=1)
    image = rand_image(1, 64, 64)
    eager = EmerDiff(tiny_pipe, cfg, max_batch=4, decode_batch=2)(image)
    seg = EmerDiff(tiny_pipe, cfg, max_batch=4, decode_batch=2, compile="reduce-overhead")
    graphed = seg(image)
    assert np.allclose(graphed.difference_maps, eager.difference_maps, rtol=1e-5, atol=1e-6)
    unet_calls, decode_calls = 2 * 15, 4  # 2 chunks x 15 steps; 8 images in decodes of 2
    assert len(marks) == unet_calls + decode_calls
    monkeypatch.setattr(segmenter, "CUDAGRAPH_MODES", ())  # without the copies, the test can fail
    broken = EmerDiff(tiny_pipe, cfg, max_batch=4, decode_batch=2, compile="reduce-overhead")(image)
    assert not np.allclose(broken.difference_maps, eager.difference_maps, rtol=1e-5, atol=1e-6)
