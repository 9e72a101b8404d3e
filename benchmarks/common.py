"""Helpers shared by the benchmark scripts: model choice, test image, environment record."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from emerdiff_fast.attention import Modulation

DEFAULT_SKELETON = Path(__file__).resolve().parents[1].parent / "shared" / "model-skeletons" / "sd21-base"


def skeleton_path(arg: str | None) -> Path:
    """--skeleton, else $EMERDIFF_SKELETONS/sd21-base, else the sd21-base config skeleton in the
    shared model-skeletons folder beside this checkout (DEFAULT_SKELETON)."""
    if arg:
        return Path(arg)
    env = os.environ.get("EMERDIFF_SKELETONS")
    return Path(env) / "sd21-base" if env else DEFAULT_SKELETON


def skeleton_configs(model: str) -> tuple[dict, dict]:
    """(unet, vae) configs of a skeleton next to the default one (sd21-base, sd15)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    root = skeleton_path(None).parent / model
    return UNet2DConditionModel.load_config(root / "unet"), AutoencoderKL.load_config(root / "vae")


def bench_pipeline(full: bool, device, dtype=torch.float32, skeleton: str | None = None):
    """The full-size random-init SD 2.1-base from a skeleton folder, or (full=False) the
    built-in tiny model."""
    from emerdiff_fast import load_pipeline

    if full:
        return load_pipeline(skeleton_path(skeleton), random_init=True, device=device, dtype=dtype)
    return load_pipeline("tiny", device=device, dtype=dtype)


def test_image() -> torch.Tensor:
    """A real photograph (scikit-image's astronaut) when available, else seeded noise."""
    try:
        from skimage import data

        return torch.from_numpy(data.astronaut()).permute(2, 0, 1).float() / 255
    except ImportError:
        return torch.rand(3, 512, 512, generator=torch.Generator().manual_seed(0))


def environment(device) -> dict:
    import diffusers
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__,
            "diffusers": diffusers.__version__, "commit": commit}


# ---- measurement -------------------------------------------------------------------------
def bench_info(device, **info) -> dict:
    """extra_info for a pytest-benchmark record: device, versions, commit, peak memory since
    the last reset_peak_memory."""
    return {**environment(device), "peak_mem_gb": peak_memory_gb(device), **info}


def _vm_hwm_gb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            kb = next(line for line in f if line.startswith("VmHWM:")).split()[1]
        return int(kb) / 1e6
    except (OSError, StopIteration):
        return None


def reset_peak_memory(device) -> None:
    """CUDA: the allocator's peak. CPU: the process's peak resident set (Linux VmHWM,
    reset through /proc/self/clear_refs), which includes the weights, like the GPU figure."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_gb(device) -> float | None:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return _vm_hwm_gb()


def time_calls(fn, device, rounds: int) -> list[float]:
    """Seconds per call: CUDA events on the GPU (the call is timed on the device's clock),
    the host clock on the CPU. Warm up before calling this."""
    out = []
    for _ in range(rounds):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def peak_matmul_tflops(device) -> dict[str, float]:
    """Measured dense matmul rate per dtype (TFLOP/s): the MFU denominator is the fastest.
    An 8192^3 bf16 matmul measures about 800 TFLOP/s this way on an H100 (docs/gpu.md)."""
    dev = torch.device(device)
    n = 8192 if dev.type == "cuda" else 1024
    rates = {}
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        fn = lambda: torch.mm(a, b)  # noqa: E731
        for _ in range(3):
            fn()
        synchronize = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        synchronize()
        if dev.type == "cuda":
            import triton.testing

            sec = triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median") / 1e3
        else:
            sec = statistics.median(time_calls(fn, dev, 5))
        rates[str(dtype).removeprefix("torch.")] = 2 * n ** 3 / sec / 1e12
    return rates


def count_flops(fn) -> tuple[int, object]:
    """(FLOPs that fn() ran, its return value)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as mode:
        out = fn()
    return mode.get_total_flops(), out


def square_chunk(seg) -> int:
    """The fast path's chunk for a resolution x resolution image (decided once, then kept)."""
    return seg.chunk_plan.chunk((seg.config.resolution,) * 2, seg.config.num_masks)


def demo_modulation(seg, batch: int) -> Modulation:
    """Modulation for a fast-path UNet batch of `batch` members (member 0 the reference):
    K masks tiling the feature grid, members cycling (mask i, +lam), (mask i, -lam)."""
    k, dev = seg.config.num_masks, seg.device
    pos = torch.arange(seg.feature_grid[0] * seg.feature_grid[1], device=dev)
    masks = (pos[None] % k == torch.arange(k, device=dev)[:, None]).float()
    coef = torch.tensor([0.0] + [seg.config.lam * (-1) ** i for i in range(batch - 1)], device=dev)
    return Modulation(masks, torch.arange(batch, device=dev) // 2 % k, coef)


@torch.inference_mode()
def floor_flops(pipe, resolution: int, num_masks: int, n_steps: int) -> dict[str, float]:
    """The compute floor (docs/gpu.md), with each piece counted by torch.utils.flop_counter on this
    pipeline's own modules: 2K*S*unet + 2K*decode + S*unet + unet + encode (GFLOP).
    The UNet is counted with diffusers' plain AttnProcessor (explicit matmuls), because the
    counter has no formula for the CPU flash-attention kernel."""
    from diffusers.models.attention_processor import AttnProcessor

    from emerdiff_fast.conditioning import placeholder
    from emerdiff_fast.config import vae_scale_factor

    unet, vae = pipe.unet, pipe.vae
    dev, dt = unet.device, unet.dtype
    lat = resolution // vae_scale_factor(vae.config)
    x = torch.zeros(1, unet.config.in_channels, lat, lat, device=dev, dtype=dt)
    cond = placeholder(unet.config, (resolution, resolution), dt, dev).kwargs(1)
    img = torch.zeros(1, 3, resolution, resolution, device=dev, dtype=dt)
    original = unet.attn_processors
    unet.set_attn_processor(AttnProcessor())
    try:
        u, _ = count_flops(lambda: unet(x, 281, **cond))
    finally:
        unet.set_attn_processor(original)
    dec, _ = count_flops(lambda: vae.decode(x[:, :vae.config.latent_channels]))
    enc, _ = count_flops(lambda: vae.encode(img))
    two_k = 2 * num_masks
    total = two_k * n_steps * u + two_k * dec + n_steps * u + u + enc
    return {"unet_gflop": u / 1e9, "vae_decode_gflop": dec / 1e9, "vae_encode_gflop": enc / 1e9,
            "floor_tflop": total / 1e12}
