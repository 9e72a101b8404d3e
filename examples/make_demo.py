"""Rebuild examples/mini-demo.png, the README's picture of its first command:

    python examples/make_demo.py

runs `emerdiff-fast segment examples/scenes/ --out TMP` (the built-in mini model at its
recommended settings) and lays out, per scene: input, the written overlay, the ground-truth
instances (scene-SEED.png is scenes.make_scene(SEED)).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from emerdiff_fast.cli import main
from emerdiff_fast.output import palette, tile_grid
from emerdiff_fast.scenes import make_scene

HERE = Path(__file__).parent


def demo(scale: int = 3) -> Path:
    inputs = sorted((HERE / "scenes").glob("scene-*.png"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if main(["segment", str(HERE / "scenes"), "--out", tmp, "--quiet", "--overlay-scale", "1"]) != 0:
            raise SystemExit("segment failed")
        for path in inputs:
            scene = make_scene(int(path.stem.split("-")[1]))
            overlay = np.asarray(Image.open(Path(tmp) / f"{path.stem}.overlay.png").convert("RGB"))
            rows.append([np.asarray(Image.open(path).convert("RGB")), overlay, palette()[scene.instances]])
    out = HERE / "mini-demo.png"
    tile_grid(rows, scale=scale).save(out)
    return out


if __name__ == "__main__":
    print(demo())
