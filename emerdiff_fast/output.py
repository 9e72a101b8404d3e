"""Writing results: palette label PNGs, overlays, npz, legends, COCO RLE and per-segment
masks, all written atomically."""
from __future__ import annotations

import colorsys
import io
import json
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


def tile_grid(rows: list[list[np.ndarray]], pad: int = 2, scale: int = 3) -> Image.Image:
    """Figure of (H, W, 3) uint8 tiles: each row's tiles side by side, rows stacked, every
    tile in a white border of `pad` px, the whole enlarged `scale` x without smoothing."""
    grid = np.concatenate([np.concatenate([np.pad(t, ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
                                           for t in row], 1) for row in rows], 0)
    return Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, then rename: a crash never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class CheckpointError(ValueError):
    """A run folder's checkpoint that cannot be read as plain tensors and containers."""


def read_checkpoint(path: Path):
    """torch.load with weights_only=True: tensors, numbers, strings and plain containers, so a
    run folder written by someone else never runs code when it is resumed or shipped."""
    import pickle
    import re

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))  # torch's message names the culprit
        what = f" (it names {found.group(1)})" if found else ""
        raise CheckpointError(f"{path}: refused, it holds more than tensors and plain containers{what}, "
                              "and loading it could run code") from None


def settings_differ(run_file: Path, settings: dict) -> str | None:
    """What differs between the settings a resumable run recorded in `run_file` and
    `settings` ("key: old there, new now", ...); None when they agree or none were recorded."""
    if not run_file.exists():
        return None
    old = json.loads(run_file.read_text())
    if old == settings:
        return None
    return ", ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now"
                     for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k))


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


def boundaries(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour has another label."""
    edge = np.zeros(labels.shape, bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


# Overlays of images smaller than this on their short side are drawn at an integer upscale
# (nearest neighbour) that reaches it, so a 64 px scene can be looked at without zooming.
OVERLAY_MIN_SIDE = 256


def overlay_scale(shape: tuple[int, int], scale: int | None = None) -> int:
    """The overlay's integer upscale for labels of `shape` (H, W): `scale` when given, else
    the smallest that brings the short side to OVERLAY_MIN_SIDE (1 for larger images)."""
    if scale is not None:
        if scale < 1:
            raise ValueError(f"overlay scale must be at least 1, got {scale}")
        return int(scale)
    return max(1, -(-OVERLAY_MIN_SIDE // max(1, min(shape))))


def _fitted_font(draw, names, width: int, height: int):
    """The largest default-font size (at most 1/12 of the short side, at least 8 px) at which
    the longest name fits the picture's width; Pillow's bitmap font where sizes are unsupported."""
    from PIL import ImageFont

    longest = max(names, key=len)
    size = max(8, min(width, height) // 12)
    while True:
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: one bitmap size
            return ImageFont.load_default()
        box = draw.textbbox((0, 0), longest, font=font, stroke_width=1)
        if box[2] - box[0] <= width - 2 or size <= 6:
            return font
        size -= 1


def _place(box, width: int, height: int, taken: list) -> tuple[int, int]:
    """Shift a text box (x0, y0, x1, y1) inside the picture, then down or up by its height
    until it overlaps no box placed before (or no free place is found): the (dx, dy) shift."""
    w, h = box[2] - box[0], box[3] - box[1]
    dx = min(max(0, -box[0]), width - box[2]) if w <= width else -box[0]
    dy = min(max(0, -box[1]), height - box[3])
    for step in (0, 1, -1, 2, -2, 3, -3):
        y0 = box[1] + dy + step * (h + 1)
        if y0 < 0 or y0 + h > height:
            continue
        cand = (box[0] + dx, y0, box[2] + dx, y0 + h)
        if not any(cand[0] < t[2] and t[0] < cand[2] and cand[1] < t[3] and t[1] < cand[3] for t in taken):
            return dx, dy + step * (h + 1)
    return dx, dy


def overlay(photo: Image.Image, labels: np.ndarray, alpha: float = 0.5,
            names: dict[int, str] | None = None, scale: int | None = None) -> Image.Image:
    """Segment colours blended over the photo, segment boundaries drawn in white, at the
    integer upscale overlay_scale(labels.shape, scale) (nearest neighbour: labels stay crisp);
    with `names` (segment id -> name) each segment's name written at its pixels' median
    point, in a font sized to the picture, kept whole inside it and off the names before."""
    k = overlay_scale(labels.shape, scale)
    base = np.asarray(photo.convert("RGB").resize((labels.shape[1], labels.shape[0])), dtype=np.float32)
    if k > 1:
        labels = labels.repeat(k, 0).repeat(k, 1)
        base = base.repeat(k, 0).repeat(k, 1)
    out = (base * (1 - alpha) + palette()[labels] * alpha).round().astype(np.uint8)
    out[boundaries(labels)] = 255
    im = Image.fromarray(out, "RGB")
    if names:
        from PIL import ImageDraw

        draw = ImageDraw.Draw(im)
        width, height = im.size
        font = _fitted_font(draw, list(names.values()), width, height)
        taken = []
        for i, name in names.items():
            ys, xs = np.nonzero(labels == i)
            if not len(xs):
                continue
            at = (int(np.median(xs)), int(np.median(ys)))
            box = draw.textbbox(at, name, font=font, anchor="mm", stroke_width=1)
            dx, dy = _place(box, width, height, taken)
            taken.append((box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy))
            draw.text((at[0] + dx, at[1] + dy), name, font=font, fill=(255, 255, 255), anchor="mm",
                      stroke_width=1, stroke_fill=(0, 0, 0))
    return im


def rle_encode(mask: np.ndarray) -> dict:
    """COCO run-length encoding of a binary (H, W) mask, pycocotools' convention: runs over
    the column-major (Fortran) order starting with a run of zeros, the counts compressed
    into a string as pycocotools' rleToString does (from the fourth count on, each count is
    stored as its difference to the count two before; 5-bit groups with a continuation
    bit, offset by 48 into printable ASCII). tests/test_output.py checks it against
    pycocotools."""
    flat = np.asarray(mask, bool).flatten(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    chars = []
    for i, c in enumerate(counts):
        x = c - counts[i - 2] if i > 2 else c
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = not ((ch & 0x10 == 0 and x == 0) or (ch & 0x10 and x == -1))
            if more:
                ch |= 0x20
            chars.append(chr(ch + 48))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": "".join(chars)}


def colour_hex(i: int) -> str:
    """Palette entry i as #rrggbb (the label PNGs' colour of id i)."""
    r, g, b = palette()[i].tolist()
    return f"#{r:02x}{g:02x}{b:02x}"


def segments(labels: np.ndarray) -> list[dict]:
    """One record per segment present: id, area, bbox [x, y, w, h] (COCO), colour."""
    out = []
    for i in np.unique(labels).tolist():
        m = labels == i
        ys, xs = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        out.append({"id": int(i), "area": int(m.sum()),
                    "bbox": [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)],
                    "color": colour_hex(i)})
    return out


FORMATS = ("labels", "overlay", "npz", "legend", "rle", "masks")
DEFAULT_FORMATS = ("labels", "overlay", "npz", "legend")


# the file each single-file format writes, NAME + suffix ("masks" writes a folder of PNGs)
SUFFIXES = {"labels": ".labels.png", "overlay": ".overlay.png", "npz": ".npz", "legend": ".legend.json",
            "rle": ".rle.json"}
CLASSES_SUFFIX = ".classes.png"  # named segments, with the labels format: per-pixel index into class_names


def npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def output_files(name: str, formats, labels: np.ndarray | None = None) -> list[str]:
    """File names (relative to the output folder) that `formats` give for image `name`.
    Per-segment masks go to NAME.masks/ID.png; without `labels` that folder is listed."""
    files = [name + SUFFIXES[f] for f in formats if f in SUFFIXES]
    if "masks" in formats:
        files += ([f"{name}.masks/{i}.png" for i in np.unique(labels).tolist()] if labels is not None
                  else [f"{name}.masks"])
    return files


def save_result(result: SegmentationResult, photo: Image.Image, out_dir: Path, name: str,
                difference_maps: bool = False, formats=DEFAULT_FORMATS, overlay_scale: int | None = None) -> list[Path]:
    """The chosen formats for one image under out_dir (name may hold sub-folders):
    NAME.labels.png (palette PNG, pixel value = segment id), NAME.overlay.png, NAME.npz,
    NAME.legend.json (id -> colour, area, bbox), NAME.rle.json (COCO RLE records) and
    NAME.masks/ID.png (binary masks). The npz is written last, so its presence marks a
    complete set. Returns the paths."""
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown output formats {sorted(unknown)}; choose from {list(FORMATS)}")
    labels = result.labels
    records = segments(labels)
    named = result.segment_labels is not None
    if named:
        for r in records:
            r["label"] = result.class_names[int(result.segment_labels[r["id"]])]
    files: dict[str, bytes] = {}
    if "labels" in formats:
        files[name + SUFFIXES["labels"]] = _png(label_png(labels))
        if named:
            files[name + CLASSES_SUFFIX] = _png(label_png(result.class_map))
    if "overlay" in formats:
        names = {r["id"]: r["label"] for r in records} if named else None
        files[name + SUFFIXES["overlay"]] = _png(overlay(photo, labels, names=names, scale=overlay_scale))
    if "legend" in formats:
        legend = {"segments": records}
        if named:  # the classes PNG's palette: index -> name and colour
            legend["classes"] = [{"id": i, "name": n, "color": colour_hex(i)} for i, n in enumerate(result.class_names)]
        files[name + SUFFIXES["legend"]] = json.dumps(legend, indent=1).encode()
    if "rle" in formats:
        coco = [{**r, "segmentation": rle_encode(labels == r["id"])} for r in records]
        files[name + SUFFIXES["rle"]] = json.dumps(coco).encode()
    if "masks" in formats:
        for r in records:
            files[f"{name}.masks/{r['id']}.png"] = _png(Image.fromarray((labels == r["id"]).astype(np.uint8) * 255, "L"))
    if "npz" in formats:  # last: its presence marks a complete set
        arrays = {"labels": labels, "low_res_labels": result.low_res_labels,
                  "mask_embeddings": result.mask_embeddings}
        if difference_maps and result.difference_maps is not None:
            arrays["difference_maps"] = result.difference_maps
        if named:
            arrays["class_names"] = np.array(result.class_names)
            arrays["segment_labels"] = result.segment_labels
        files[name + SUFFIXES["npz"]] = npz_bytes(arrays)
    for fname, data in files.items():
        (out_dir / fname).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / fname, data)
    return [out_dir / f for f in files]
