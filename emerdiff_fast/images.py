"""Turning user inputs (paths, PIL images, arrays, tensors) into model-ready tensors."""
from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
log = logging.getLogger("emerdiff_fast")
_said_animated = False


class ImageError(ValueError):
    """An input image is missing, unreadable or malformed."""


def set_max_pixels(limit: int | None) -> None:
    """Raise (or lower) the largest image, in pixels, that will be opened (Pillow's
    decompression-bomb limit, default 89.5 M). None keeps Pillow's default."""
    if limit is not None:
        if limit < 1:
            raise ValueError(f"max pixels must be at least 1, got {limit}")
        Image.MAX_IMAGE_PIXELS = limit


def to_rgb(im: Image.Image, orient: bool = True) -> Image.Image:
    """The picture as displayed, in 8-bit RGB: EXIF orientation applied, high bit depths
    scaled rather than clipped. 16-bit integer modes (I;16*) are scaled by their dtype
    range (v / 257, as a viewer shows them); 32-bit integer ("I") images whose values fit
    0..65535 likewise (Pillow opens some 16-bit files as "I"); other "I" and float ("F")
    images by their own min..max range. orient=False keeps the stored orientation (data
    sets, whose label maps are aligned with the stored pixels)."""
    if orient:
        im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if im.mode != "F" and lo >= 0 and hi <= 65535:
            lo, hi = 0.0, 65535.0
        scaled = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        im = Image.fromarray(np.clip(scaled.round(), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def _open(path: Path, orient: bool = True) -> Image.Image:
    global _said_animated
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                w, h = im.size
                if limit and w * h > limit:  # Pillow itself only refuses above 2x its limit
                    raise Image.DecompressionBombError(f"{w}x{h} = {w * h / 1e6:.0f} M pixels")
                if getattr(im, "n_frames", 1) > 1 and not _said_animated:
                    _said_animated = True
                    log.warning("%s is animated: using its first frame (said once per run)", path)
                im.load()
                return to_rgb(im, orient)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image {str(path)!r} is too large ({exc}; the limit is {limit / 1e6:.0f} M pixels, "
                         "raise it with --max-pixels)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"cannot read image {str(path)!r}: not an image or corrupt ({exc})") from None


def load_image(image, orient: bool = True) -> Image.Image:
    """Any supported input -> an 8-bit RGB PIL image as displayed (see to_rgb)."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"image {str(path)!r} not found")
        return _open(path, orient)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
            raise ImageError(f"tensor images must be CHW with 1, 3 or 4 channels, got shape {tuple(image.shape)}")
        if not torch.isfinite(image).all():
            raise ImageError("tensor image contains NaN or infinite values")
        arr = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        return load_image(arr if arr.shape[2] != 1 else arr[:, :, 0])
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint16:  # 16-bit: scaled by the dtype range, as a viewer does
            image = (image.astype(np.float64) / 257).round().astype(np.uint8)
        if image.dtype != np.uint8:
            raise ImageError(f"numpy images must be uint8 or uint16 HxW or HxWx{{3,4}}, got dtype {image.dtype}")
        if image.ndim == 2:
            return Image.fromarray(image, "L").convert("RGB")
        if image.ndim == 3 and image.shape[2] in (3, 4):
            return Image.fromarray(image, "RGB" if image.shape[2] == 3 else "RGBA").convert("RGB")
        raise ImageError(f"numpy images must be HxW or HxWx{{3,4}}, got shape {image.shape}")
    raise ImageError(f"unsupported image type {type(image).__name__}")


def processing_size(image_size: tuple[int, int], resolution: int, multiple: int,
                    keep_aspect: bool) -> tuple[int, int]:
    """(H, W) the model sees for an image of PIL size (W, H): resolution x resolution, or
    with keep_aspect the authors' notebook's load_img(resize_to_512=False): scaled to about
    resolution^2 pixels with the aspect ratio kept, each side rounded up to `multiple` (at
    least one multiple: an extreme strip still has a row of latents)."""
    if not keep_aspect:
        return resolution, resolution
    w, h = image_size
    if min(w, h) < 1:
        raise ImageError(f"image has an empty size {image_size}")
    fac = math.sqrt(resolution * resolution / w / h)
    w, h = (max(multiple, -(-int(s * fac) // multiple) * multiple) for s in (w, h))
    return h, w


def to_model_input(image: Image.Image, size: int | tuple[int, int], resample=Image.LANCZOS) -> torch.Tensor:
    """RGB PIL -> (3, H, W) float in [-1, 1]; size: R (R x R) or (H, W). Lanczos resize
    (the EmerDiff notebook's; the Hyperfeatures authors use bilinear)."""
    if min(image.size) < 1:
        raise ImageError(f"image has an empty size {image.size}")
    h, w = (size, size) if isinstance(size, int) else size
    im = image.resize((w, h), resample)
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    return arr.permute(2, 0, 1).contiguous()


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w) integer map -> (H, W) by nearest neighbour; size is (H, W)."""
    if tuple(labels.shape) == tuple(size):
        return labels
    out = F.interpolate(labels[None, None].float(), size=size, mode="nearest-exact")
    return out[0, 0].to(labels.dtype)


def list_images(paths, recursive: bool = False) -> list[Path]:
    """Expand folders into their image files (sorted; with `recursive`, sub-folders too,
    hidden ones skipped); plain files are kept as given. The same file named twice is
    listed once."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = p.rglob("*") if recursive else p.iterdir()
            out.extend(sorted(q for q in found if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file()
                              and not any(part.startswith(".") for part in q.relative_to(p).parts)))
        else:
            out.append(p)
    seen: set[str] = set()
    return [q for q in out if not (str(q.absolute()) in seen or seen.add(str(q.absolute())))]
