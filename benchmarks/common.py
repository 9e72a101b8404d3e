"""Helpers shared by the benchmark scripts: model choice, test image, environment record."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

DEFAULT_SKELETON = Path(__file__).resolve().parents[1].parent / "shared" / "model-skeletons" / "sd21-base"


def skeleton_path(arg: str | None) -> Path:
    """--skeleton, else $EMERDIFF_SKELETONS/sd21-base, else ../shared/model-skeletons/sd21-base."""
    if arg:
        return Path(arg)
    env = os.environ.get("EMERDIFF_SKELETONS")
    return Path(env) / "sd21-base" if env else DEFAULT_SKELETON


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
