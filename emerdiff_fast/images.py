"""Turning user inputs (paths, PIL images, arrays, tensors) into model-ready tensors."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")


class ImageError(ValueError):
    """An input image is missing, unreadable or malformed."""


def load_image(image) -> Image.Image:
    """Any supported input -> an RGB PIL image (grayscale and RGBA converted)."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"image {str(path)!r} not found")
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ImageError(f"cannot read image {str(path)!r}: not an image or corrupt ({exc})") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
            raise ImageError(f"tensor images must be CHW with 1, 3 or 4 channels, got shape {tuple(image.shape)}")
        if not torch.isfinite(image).all():
            raise ImageError("tensor image contains NaN or infinite values")
        arr = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        return load_image(arr if arr.shape[2] != 1 else arr[:, :, 0])
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ImageError(f"numpy images must be uint8 HxW or HxWx{{3,4}}, got dtype {image.dtype}")
        if image.ndim == 2:
            return Image.fromarray(image, "L").convert("RGB")
        if image.ndim == 3 and image.shape[2] in (3, 4):
            return Image.fromarray(image, "RGB" if image.shape[2] == 3 else "RGBA").convert("RGB")
        raise ImageError(f"numpy images must be HxW or HxWx{{3,4}}, got shape {image.shape}")
    raise ImageError(f"unsupported image type {type(image).__name__}")


def to_model_input(image: Image.Image, resolution: int) -> torch.Tensor:
    """RGB PIL -> (3, R, R) float in [-1, 1]; Lanczos resize, aspect ratio not kept (the notebook's)."""
    if min(image.size) < 1:
        raise ImageError(f"image has an empty size {image.size}")
    im = image.resize((resolution, resolution), Image.LANCZOS)
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    return arr.permute(2, 0, 1).contiguous()


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w) integer map -> (H, W) by nearest neighbour; size is (H, W)."""
    if tuple(labels.shape) == tuple(size):
        return labels
    out = F.interpolate(labels[None, None].float(), size=size, mode="nearest-exact")
    return out[0, 0].to(labels.dtype)


def list_images(paths) -> list[Path]:
    """Expand folders into their image files (sorted); plain files are kept as given."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file()))
        else:
            out.append(p)
    return out
