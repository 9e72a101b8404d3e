"""Generated scenes: flat-coloured discs, rectangles and triangles on simple backgrounds,
deterministic from a seed, with exact ground truth. They are the visual world of the
built-in `mini` model (mini.py), which is trained and evaluated on them.

A scene has 1-4 shapes, each 12-45% of the image side, drawn in order (later ones occlude
earlier ones; a shape that would hide more than half of an earlier shape's visible pixels
is placed again, so every shape named in the caption stays visible). Pixels are drawn
without anti-aliasing, so the ground truth is exact: every pixel of instance i holds
shape i's colour.

On disk (`write_dataset`, read by datasets.SegmentationDataset("shapes", root)):

    ROOT/scenes.jsonl        one JSON object per scene: id, seed, caption, background,
                             shapes [{kind, colour, class_id}], in drawing order
    ROOT/images/ID.png       RGB
    ROOT/instances/ID.png    L: 0 background, i the i-th shape (drawing order)
    ROOT/classes/ID.png      L: CLASSES index (0 background, 1 disc, 2 rectangle, 3 triangle)

ID is the seed, zero-padded to 8 digits. Seed ranges: the mini model trains on seeds in
TRAIN_SEEDS and settings are chosen on VALIDATION_SEEDS; HELDOUT_SEEDS are never used for
training or for choosing settings.
"""
from __future__ import annotations

import colorsys
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CLASSES = ("background", "disc", "rectangle", "triangle")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 220, 30),
    "purple": (130, 40, 170), "orange": (245, 140, 20), "cyan": (30, 210, 220), "white": (250, 250, 250),
    "black": (15, 15, 15), "pink": (245, 130, 190),
}
# every colour+shape phrase a caption can hold, then "background": the open-vocabulary labels
# that name instances, not only classes (benchmarks/open_vocab.py --labels colour-shape)
COLOUR_SHAPE_LABELS = tuple(f"{c} {k}" for c in COLOURS for k in CLASSES[1:]) + ("background",)
BACKGROUNDS = {"flat": "plain", "gradient": "gradient", "stripes": "striped", "noise": "noisy"}
SIZE_RANGE = (0.12, 0.45)      # shape extent as a share of the image side
MAX_SHAPES = 4
TRAIN_SEEDS = range(0, 1_000_000)
VALIDATION_SEEDS = range(5_000_000, 5_000_000 + 1000)  # for checkpoint choice; not held-out
HELDOUT_SEEDS = range(10_000_000, 11_000_000)
SPLITS = {"trn": TRAIN_SEEDS, "val": VALIDATION_SEEDS, "test": HELDOUT_SEEDS}
DEFAULT_SIZE = 64


def split_of(seeds: range) -> str:
    """'trn', 'val' or 'test': the seed range all of `seeds` lie in (ValueError otherwise)."""
    for name, r in SPLITS.items():
        if seeds.start in r and seeds[-1] in r:
            return name
    ranges = ", ".join(f"{k} {r.start}..{r.stop - 1}" for k, r in SPLITS.items())
    raise ValueError(f"seeds {seeds.start}..{seeds[-1]} do not lie in one split's range ({ranges})")


@dataclass
class Shape:
    kind: str          # disc | rectangle | triangle
    colour: str
    class_id: int


@dataclass
class Scene:
    seed: int
    image: np.ndarray       # (H, W, 3) uint8
    instances: np.ndarray   # (H, W) uint8, 0 = background
    classes: np.ndarray     # (H, W) uint8, CLASSES index
    caption: str
    background: str
    shapes: list[Shape] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.seed:08d}"


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A desaturated mid-tone: far from the saturated shape colours."""
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.08, 0.35), rng.uniform(0.35, 0.75))
    return np.array([r, g, b]) * 255


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    a = _muted(rng)
    if kind == "flat":
        img = np.broadcast_to(a, (size, size, 3))
    elif kind == "gradient":
        b, angle = _muted(rng), rng.uniform(0, 2 * np.pi)
        u = (np.cos(angle) * xx + np.sin(angle) * yy) / size
        u = (u - u.min()) / max(u.max() - u.min(), 1e-9)
        img = a * (1 - u[..., None]) + b * u[..., None]
    elif kind == "stripes":
        b, angle, period = _muted(rng), rng.uniform(0, np.pi), rng.uniform(0.08, 0.22) * size
        u = np.cos(angle) * xx + np.sin(angle) * yy
        img = np.where((np.floor(u / (period / 2)) % 2 == 0)[..., None], a, b)
    else:  # noise: fine per-pixel texture around a muted base
        img = a + rng.normal(0, 18, (size, size, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _shape_mask(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    extent = rng.uniform(*SIZE_RANGE) * size
    cx, cy = rng.uniform(0.15, 0.85, 2) * size
    if kind == "disc":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= (extent / 2) ** 2
    if kind == "rectangle":
        h = extent if rng.random() < 0.3 else rng.uniform(*SIZE_RANGE) * size  # squares included
        return (np.abs(xx - cx) <= extent / 2) & (np.abs(yy - cy) <= h / 2)
    # triangle: vertices on a circle of diameter `extent`, jittered, rotated at random
    angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.35, 0.35, 3)
    vx, vy = cx + extent / 2 * np.cos(angles), cy + extent / 2 * np.sin(angles)
    sides = [(vx[(i + 1) % 3] - vx[i]) * (yy - vy[i]) - (vy[(i + 1) % 3] - vy[i]) * (xx - vx[i]) for i in range(3)]
    return (np.all([s >= 0 for s in sides], 0) | np.all([s <= 0 for s in sides], 0))


def _caption(shapes: list[Shape], background: str) -> str:
    names = [f"{'an' if s.colour[0] in 'aeiou' else 'a'} {s.colour} {s.kind}" for s in shapes]
    objects = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{objects} on a {BACKGROUNDS[background]} background"


def make_scene(seed: int, size: int = DEFAULT_SIZE) -> Scene:
    """The scene of `seed` (the same seed always gives the same scene)."""
    rng = np.random.default_rng(seed)
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    image = _background(rng, background, size)
    instances = np.zeros((size, size), np.uint8)
    classes = np.zeros((size, size), np.uint8)
    shapes: list[Shape] = []
    for _ in range(rng.integers(1, MAX_SHAPES + 1)):
        kind = CLASSES[1 + rng.integers(3)]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        for _attempt in range(20):
            mask = _shape_mask(rng, kind, size)
            if mask.sum() < 4:
                continue
            visible = np.bincount(instances.ravel(), minlength=len(shapes) + 1)[1:]
            hidden = np.bincount(instances[mask], minlength=len(shapes) + 1)[1:]
            if np.all(hidden <= visible / 2):
                break
        else:
            continue  # no room left: fewer shapes
        shapes.append(Shape(kind, colour, CLASSES.index(kind)))
        image[mask] = COLOURS[colour]
        instances[mask] = len(shapes)
        classes[mask] = CLASSES.index(kind)
    return Scene(seed, image, instances, classes, _caption(shapes, background), background, shapes)


def scene_record(scene: Scene) -> dict:
    return {"id": scene.id, "seed": scene.seed, "caption": scene.caption, "background": scene.background,
            "shapes": [vars(s) for s in scene.shapes]}


def write_dataset(root: str | Path, n: int, seed: int, size: int = DEFAULT_SIZE, progress: bool = False) -> Path:
    """Scenes of seeds seed..seed+n-1 in the layout of this module's docstring. Files are
    written atomically and scenes.jsonl last, so a listed scene is complete."""
    from PIL import Image

    from .output import _png, atomic_write

    root = Path(root)
    for sub in ("images", "instances", "classes"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    records = []
    seeds = range(seed, seed + n)
    if progress:
        from tqdm import tqdm

        seeds = tqdm(seeds, desc="scenes", unit="scene")
    for s in seeds:
        scene = make_scene(s, size)
        for sub, arr, mode in (("images", scene.image, "RGB"), ("instances", scene.instances, "L"),
                               ("classes", scene.classes, "L")):
            atomic_write(root / sub / f"{scene.id}.png", _png(Image.fromarray(arr, mode)))
        records.append(scene_record(scene))
    atomic_write(root / "scenes.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    return root


def read_records(root: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(root) / "scenes.jsonl").read_text().splitlines() if line.strip()]


def render_batch(seeds, size: int = DEFAULT_SIZE) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(n, H, W, 3) uint8 images, (n, H, W) uint8 instance maps and captions for `seeds`."""
    scenes = [make_scene(int(s), size) for s in seeds]
    return (np.stack([s.image for s in scenes]), np.stack([s.instances for s in scenes]),
            [s.caption for s in scenes])
