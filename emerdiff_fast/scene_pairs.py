"""Correspondence pairs of generated scenes with exact keypoints, in the SPair-71k layout
(hyperfeatures/datasets.spair_pairs reads them), for Diffusion Hyperfeatures on a model
that knows these scenes (the built-in `mini`).

A pair shows one annotated object, a disc, rectangle or triangle (its category), in two
scenes. Between source and target the object moves, is scaled (SCALE_RANGE) and, unless it
is a disc, rotated (up to MAX_ROTATION degrees); its colour, the background kind and
colours, and the distractors all change. Distractors are shapes of the other two kinds, so
the object is the only one of its kind in each image: matching by colour or by position
fails, only the object's kind and part can match. The object is drawn last, so its
keypoints are never occluded.

Keypoints are points of the object's own frame mapped into each image by that image's
placement, so the target keypoints are exactly the source ones under the pair's similarity
transform (`Placement`): rectangle corners and triangle vertices, each pulled in by
KEYPOINT_INSET toward the centre so they lie on the object's pixels, in an order the
rotation keeps (a rectangle's corners by its own axes, a triangle's vertices by their
index); a disc's centre and four points at (1 - KEYPOINT_INSET) of its radius.

Layout under ROOT:
    JPEGImages/<category>/<id>-src.png, <id>-trg.png  (PNG: exact colours; the reader takes
                                                       any file name the annotation gives)
    PairAnnotation/<split>/<id>-<category>.json        src_imname, trg_imname, category,
        src_kps, trg_kps ([x, y], pixel centres at +0.5), src_bndbox, trg_bndbox ([x1, y1,
        x2, y2] of the object's pixels, x2/y2 exclusive), src_imsize, trg_imsize ([w, h, 3]),
        and for checking: seed, transform {scale, rotation_deg, translation}
<id> is the seed, zero-padded to 8 digits. The split comes from the seed's range
(scenes.split_of): training seeds -> trn, validation seeds -> val, held-out seeds -> test.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .scenes import CLASSES, COLOURS, DEFAULT_SIZE, BACKGROUNDS, _background, split_of

SCALE_RANGE = (0.6, 1.5)
MAX_ROTATION = 30.0        # degrees, rectangles and triangles
OBJECT_EXTENT = (0.3, 0.5)  # source object's extent as a share of the image side
KEYPOINT_INSET = 0.15
CATEGORIES = CLASSES[1:]


@dataclass(frozen=True)
class Placement:
    """Where the object's frame lies in an image: p_image = centre + extent * R(angle) p_frame."""
    centre: tuple[float, float]
    extent: float   # pixels per frame unit (the object's diameter is one unit)
    angle: float    # radians

    @property
    def rotation(self) -> np.ndarray:
        c, s = np.cos(self.angle), np.sin(self.angle)
        return np.array([[c, -s], [s, c]])

    def apply(self, pts: np.ndarray) -> np.ndarray:
        return np.asarray(self.centre) + self.extent * pts @ self.rotation.T

    def invert(self, pts: np.ndarray) -> np.ndarray:
        return (pts - np.asarray(self.centre)) @ self.rotation / self.extent


@dataclass
class PairImage:
    image: np.ndarray        # (H, W, 3) uint8
    mask: np.ndarray         # (H, W) bool: the annotated object's pixels
    keypoints: np.ndarray    # (N, 2) x, y
    placement: Placement

    @property
    def bbox(self) -> list[float]:
        ys, xs = np.nonzero(self.mask)
        return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


@dataclass
class ScenePair:
    seed: int
    category: str
    src: PairImage
    trg: PairImage

    @property
    def id(self) -> str:
        return f"{self.seed:08d}"

    def transform(self) -> dict:
        """The similarity transform taking source pixels to target pixels."""
        s, t = self.src.placement, self.trg.placement
        turn = Placement((0.0, 0.0), 1.0, t.angle - s.angle)
        scale = t.extent / s.extent
        shift = np.asarray(t.centre) - scale * turn.rotation @ np.asarray(s.centre)
        return {"scale": scale, "rotation_deg": float(np.degrees(turn.angle)), "translation": shift.tolist()}


def frame_shape(rng: np.random.Generator, kind: str) -> np.ndarray:
    """The object's outline in its own frame (diameter 1): a rectangle's 4 corners, a
    triangle's 3 vertices, or (disc) nothing but its centre."""
    if kind == "disc":
        return np.zeros((1, 2))
    if kind == "rectangle":
        aspect = rng.uniform(0.45, 1.0)  # height / width; the diagonal is the diameter
        w = 1 / np.hypot(1, aspect)
        h = aspect * w
        return np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
    angles = np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.35, 0.35, 3) - np.pi / 2
    return 0.5 * np.stack([np.cos(angles), np.sin(angles)], 1)


def frame_keypoints(kind: str, outline: np.ndarray) -> np.ndarray:
    if kind == "disc":
        r = 0.5 * (1 - KEYPOINT_INSET)
        return np.array([[0, 0], [0, -r], [r, 0], [0, r], [-r, 0]], float)
    centre = outline.mean(0)
    return centre + (1 - KEYPOINT_INSET) * (outline - centre)


def _inside(kind: str, outline: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Which frame points lie on the object."""
    if kind == "disc":
        return np.hypot(pts[:, 0], pts[:, 1]) <= 0.5
    if kind == "rectangle":
        half = np.abs(outline).max(0)
        return (np.abs(pts[:, 0]) <= half[0]) & (np.abs(pts[:, 1]) <= half[1])
    sides = []
    for i in range(3):
        a, b = outline[i], outline[(i + 1) % 3]
        sides.append((b[0] - a[0]) * (pts[:, 1] - a[1]) - (b[1] - a[1]) * (pts[:, 0] - a[0]))
    sides = np.stack(sides)
    return np.all(sides >= 0, 0) | np.all(sides <= 0, 0)


def _pixel_centres(size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    return np.stack([xx.ravel(), yy.ravel()], 1)


def _object_mask(kind: str, outline: np.ndarray, placement: Placement, size: int) -> np.ndarray:
    return _inside(kind, outline, placement.invert(_pixel_centres(size))).reshape(size, size)


def _distractor_mask(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    outline = frame_shape(rng, kind)
    place = Placement(tuple(rng.uniform(0.1, 0.9, 2) * size), rng.uniform(0.15, 0.35) * size,
                      rng.uniform(0, 2 * np.pi))
    return _object_mask(kind, outline, place, size)


def _place(rng: np.random.Generator, extent: float, size: int) -> tuple[float, float]:
    """A centre that keeps the object's whole disc of diameter `extent` inside the image."""
    lo, hi = extent / 2 + 1, size - extent / 2 - 1
    return tuple(rng.uniform(lo, hi, 2)) if hi > lo else (size / 2, size / 2)


def _render(rng, kind, outline, placement, colour, background, size) -> PairImage:
    image = _background(rng, background, size)
    others = [k for k in CATEGORIES if k != kind]
    for _ in range(rng.integers(0, 4)):
        m = _distractor_mask(rng, others[rng.integers(len(others))], size)
        image[m] = COLOURS[list(COLOURS)[rng.integers(len(COLOURS))]]
    mask = _object_mask(kind, outline, placement, size)
    image[mask] = COLOURS[colour]
    return PairImage(image, mask, placement.apply(frame_keypoints(kind, outline)), placement)


def make_pair(seed: int, size: int = DEFAULT_SIZE) -> ScenePair:
    """The pair of `seed` (deterministic). Its random stream is separate from make_scene's."""
    rng = np.random.default_rng([seed, 1])
    kind = CATEGORIES[rng.integers(len(CATEGORIES))]
    outline = frame_shape(rng, kind)
    c_src, c_trg = rng.choice(len(COLOURS), 2, replace=False)
    b_src, b_trg = rng.choice(len(BACKGROUNDS), 2, replace=False)
    e_src = rng.uniform(*OBJECT_EXTENT) * size
    e_trg = float(np.clip(e_src * rng.uniform(*SCALE_RANGE), 0.2 * size, 0.65 * size))
    a_src = rng.uniform(0, 2 * np.pi) if kind != "disc" else 0.0
    turn = np.radians(rng.uniform(-MAX_ROTATION, MAX_ROTATION)) if kind != "disc" else 0.0
    src_place = Placement(_place(rng, e_src, size), e_src, a_src)
    trg_place = Placement(_place(rng, e_trg, size), e_trg, a_src + turn)
    names = list(COLOURS)
    src = _render(rng, kind, outline, src_place, names[c_src], list(BACKGROUNDS)[b_src], size)
    trg = _render(rng, kind, outline, trg_place, names[c_trg], list(BACKGROUNDS)[b_trg], size)
    return ScenePair(seed, kind, src, trg)


def pair_record(pair: ScenePair) -> dict:
    size = pair.src.image.shape[1], pair.src.image.shape[0]
    return {"src_imname": f"{pair.id}-src.png", "trg_imname": f"{pair.id}-trg.png", "category": pair.category,
            "src_kps": pair.src.keypoints.round(4).tolist(), "trg_kps": pair.trg.keypoints.round(4).tolist(),
            "src_bndbox": pair.src.bbox, "trg_bndbox": pair.trg.bbox,
            "src_imsize": [*size, 3], "trg_imsize": [*size, 3], "seed": pair.seed, "transform": pair.transform()}


def write_pairs(root, n: int, seed: int, size: int = DEFAULT_SIZE, progress: bool = False) -> tuple[Path, str]:
    """Pairs of seeds seed..seed+n-1 under `root` in the layout above, in the split their
    seeds' range names (all n seeds must share one). Images first, each annotation last and
    atomically, so a listed pair is complete. Returns (annotation folder, split)."""
    from PIL import Image

    from .output import _png, atomic_write

    split = split_of(range(seed, seed + n))
    root = Path(root)
    ann = root / "PairAnnotation" / split
    seeds = range(seed, seed + n)
    if progress:
        from tqdm import tqdm

        seeds = tqdm(seeds, desc="pairs", unit="pair")
    for s in seeds:
        pair = make_pair(s, size)
        folder = root / "JPEGImages" / pair.category
        folder.mkdir(parents=True, exist_ok=True)
        for side in ("src", "trg"):
            atomic_write(folder / f"{pair.id}-{side}.png", _png(Image.fromarray(getattr(pair, side).image, "RGB")))
        ann.mkdir(parents=True, exist_ok=True)
        atomic_write(ann / f"{pair.id}-{pair.category}.json", json.dumps(pair_record(pair)).encode())
    return ann, split
