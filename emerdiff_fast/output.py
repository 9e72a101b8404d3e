"""Writing results: palette label PNGs, overlays, npz, all written atomically."""
from __future__ import annotations

import colorsys
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .result import SegmentationResult


def palette(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 well-separated colours (golden-ratio hues), the same every run."""
    cols = [colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65 + 0.35 * (i % 2), 0.95 - 0.25 * (i % 3 == 2))
            for i in range(n)]
    return (np.array(cols) * 255).round().astype(np.uint8)


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, then rename: a crash never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def label_png(labels: np.ndarray) -> Image.Image:
    """Palette ("P") PNG whose pixel values are the segment ids."""
    if labels.max(initial=0) > 255:
        raise ValueError("palette PNGs hold at most 256 segments")
    im = Image.fromarray(labels.astype(np.uint8), "P")
    im.putpalette(palette().flatten().tolist())
    return im


def overlay(photo: Image.Image, labels: np.ndarray, alpha: float = 0.5) -> Image.Image:
    colours = palette()[labels]
    base = np.asarray(photo.convert("RGB").resize((labels.shape[1], labels.shape[0])), dtype=np.float32)
    return Image.fromarray((base * (1 - alpha) + colours * alpha).round().astype(np.uint8), "RGB")


def save_result(result: SegmentationResult, photo: Image.Image, out_dir: Path, name: str,
                difference_maps: bool = False) -> list[Path]:
    """NAME.labels.png, NAME.overlay.png, NAME.npz under out_dir; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"labels": result.labels, "low_res_labels": result.low_res_labels,
              "mask_embeddings": result.mask_embeddings}
    if difference_maps and result.difference_maps is not None:
        arrays["difference_maps"] = result.difference_maps
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    files = {f"{name}.labels.png": _png(label_png(result.labels)),
             f"{name}.overlay.png": _png(overlay(photo, result.labels)),
             f"{name}.npz": buf.getvalue()}
    for fname, data in files.items():
        atomic_write(out_dir / fname, data)
    return [out_dir / f for f in files]
