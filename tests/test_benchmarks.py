"""The measurement helpers the benchmark runner's numbers rest on."""
from types import SimpleNamespace

import pytest
import torch

from benchmarks.common import count_flops, floor_flops, peak_memory_gb, reset_peak_memory, skeleton_path

pytestmark = pytest.mark.usefixtures("triton_off")  # the kernels are not the point here (conftest)


def test_count_flops_of_a_matmul():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    flops, out = count_flops(lambda: a @ b)
    assert flops == 2 * 8 * 16 * 4 and out.shape == (8, 4)


def test_floor_composition_and_scaling(tiny_pipe):
    f64 = floor_flops(tiny_pipe, 64, num_masks=3, n_steps=15)
    u, dec, enc = (f64[k] * 1e9 for k in ("unet_gflop", "vae_decode_gflop", "vae_encode_gflop"))
    assert min(u, dec, enc) > 0
    expected = 2 * 3 * 15 * u + 2 * 3 * dec + 15 * u + u + enc  # SPEC section 3's formula
    assert abs(f64["floor_tflop"] * 1e12 - expected) <= 1e-6 * expected
    # convolutions dominate: 4x the pixels is at least ~4x the FLOPs (attention adds more)
    f128 = floor_flops(tiny_pipe, 128, num_masks=3, n_steps=15)
    assert 3.9 < f128["unet_gflop"] / f64["unet_gflop"] < 6
    assert 3.9 < f128["vae_decode_gflop"] / f64["vae_decode_gflop"] < 4.5


def test_peak_memory_is_reported_on_cpu():
    import mmap

    reset_peak_memory("cpu")
    before = peak_memory_gb("cpu")
    # 64 MiB of fresh pages, touched: memory an earlier test freed but the allocator kept
    # resident would not raise the high-water mark (so the check depended on test order)
    pages = mmap.mmap(-1, 64 * 2 ** 20)
    pages.write(b"\1" * (64 * 2 ** 20))
    after = peak_memory_gb("cpu")
    pages.close()
    assert before is not None and after >= before + 0.05


def test_floor_reproduces_spec_section_3_on_the_real_config():
    """Counted on SD 2.1-base's real config (meta tensors: shapes only, no weights, seconds):
    SPEC section 3 lists 803 / 2515 / 1117 GFLOP and ~888 TFLOP per image at K = 30."""
    root = skeleton_path(None)
    if not (root / "unet" / "config.json").exists():
        pytest.skip(f"no SD 2.1-base skeleton at {root} (set EMERDIFF_SKELETONS)")
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root, subfolder="vae"))
    f = floor_flops(SimpleNamespace(unet=unet, vae=vae), 512, num_masks=30, n_steps=15)
    assert abs(f["unet_gflop"] - 803) < 5 and abs(f["vae_decode_gflop"] - 2515) < 5
    assert abs(f["vae_encode_gflop"] - 1117) < 5 and abs(f["floor_tflop"] - 888) < 2


def test_executed_flops_leave_out_the_memory_models_traces(tiny_pipe, monkeypatch):
    """On CUDA the fast path's chunk comes from the memory model, which runs the UNet on meta
    tensors: deciding it inside the waterfall's FLOP counter added those traces to the
    row's executed TFLOP. CUDA's memory query mocked: the same count as on the CPU."""
    from emerdiff_fast import EmerDiff, EmerDiffConfig, engine, memory

    from benchmarks.waterfall import warm_up

    cfg = EmerDiffConfig(num_masks=3, resolution=64, feature_samples=1)
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    _, cpu_tflop = warm_up(EmerDiff(tiny_pipe, cfg), image, count=True)
    traced, largest = [], memory.MemoryModel.largest_chunk
    monkeypatch.setattr(engine, "allocatable_bytes", lambda device: 10 ** 12)
    monkeypatch.setattr(memory.MemoryModel, "largest_chunk", lambda self, *a: traced.append(1) or largest(self, *a))
    memory._unet_call_bytes.cache_clear()
    memory._decode_bytes.cache_clear()
    seg = EmerDiff(tiny_pipe, cfg)
    seg.chunk_plan.device = SimpleNamespace(type="cuda")  # the plan's only CUDA question
    _, cuda_tflop = warm_up(seg, image, count=True)
    assert traced and cuda_tflop == cpu_tflop
