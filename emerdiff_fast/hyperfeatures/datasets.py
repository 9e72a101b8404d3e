"""Keypoint-pair readers in the data sets' own layouts.

* SPair-71k: ROOT/JPEGImages/<category>/<image>.jpg and ROOT/PairAnnotation/{trn,val,test}/
  <pair>.json with src_imname, trg_imname, category, src_kps, trg_kps ([x, y] lists),
  src_bndbox, trg_bndbox ([x1, y1, x2, y2]), src_imsize, trg_imsize ([w, h, c]).
* CUB-200-2011: ROOT/images.txt, images/<class>/<image>.jpg, parts/part_locs.txt (image,
  part, x, y, visible), bounding_boxes.txt (image, x, y, w, h), image_class_labels.txt and
  train_test_split.txt. The authors' repository ships no CUB pair list, so pairs (choice)
  are drawn with a fixed seed among the test images of each class, `pairs_per_class` per
  class, with the parts visible in both images as keypoints.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from .correspondence import Pair

SPAIR_SPLITS = {"train": "trn", "trn": "trn", "val": "val", "test": "test"}


class PairDataError(ValueError):
    """A keypoint data set is missing or not in the expected layout."""


def spair_pairs(root, split: str = "test", limit: int | None = None) -> list[Pair]:
    root = Path(root)
    if split not in SPAIR_SPLITS:
        raise PairDataError(f"SPair-71k split must be one of {sorted(SPAIR_SPLITS)}, got {split!r}")
    ann_dir = root / "PairAnnotation" / SPAIR_SPLITS[split]
    if not ann_dir.is_dir():
        raise PairDataError(f"expected SPair-71k annotations at {ann_dir}")
    pairs = []
    for f in sorted(ann_dir.glob("*.json"))[:limit]:
        a = json.loads(f.read_text())
        cat = a["category"]
        src, trg = root / "JPEGImages" / cat / a["src_imname"], root / "JPEGImages" / cat / a["trg_imname"]
        pairs.append(Pair(src, trg, np.asarray(a["src_kps"], float), np.asarray(a["trg_kps"], float),
                          tuple(a["src_imsize"][:2]), tuple(a["trg_imsize"][:2]), tuple(a["trg_bndbox"]), cat,
                          f.stem))
    if not pairs:
        raise PairDataError(f"no pair annotations in {ann_dir}")
    return pairs


def _table(path: Path) -> list[list[str]]:
    if not path.exists():
        raise PairDataError(f"expected the CUB-200-2011 file {path}")
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def cub_pairs(root, pairs_per_class: int = 10, seed: int = 0, split: str = "test") -> list[Pair]:
    from PIL import Image

    root = Path(root)
    paths = {r[0]: r[1] for r in _table(root / "images.txt")}
    classes = {r[0]: r[1] for r in _table(root / "image_class_labels.txt")}
    is_train = {r[0]: r[1] == "1" for r in _table(root / "train_test_split.txt")}
    boxes = {r[0]: tuple(map(float, r[1:5])) for r in _table(root / "bounding_boxes.txt")}
    parts: dict[str, dict[int, tuple[float, float]]] = defaultdict(dict)
    for img, part, x, y, vis in _table(root / "parts" / "part_locs.txt"):
        if vis == "1":
            parts[img][int(part)] = (float(x), float(y))
    by_class = defaultdict(list)
    for img in sorted(paths, key=int):
        if is_train[img] == (split == "train"):
            by_class[classes[img]].append(img)
    rng = np.random.default_rng(seed)
    out = []
    for cls in sorted(by_class, key=int):
        imgs = by_class[cls]
        for _ in range(pairs_per_class if len(imgs) > 1 else 0):
            a, b = rng.choice(len(imgs), 2, replace=False)
            s, t = imgs[a], imgs[b]
            common = sorted(set(parts[s]) & set(parts[t]))
            if not common:
                continue
            src, trg = root / "images" / paths[s], root / "images" / paths[t]
            with Image.open(src) as i1, Image.open(trg) as i2:
                ssize, tsize = i1.size, i2.size
            x, y, w, h = boxes[t]
            out.append(Pair(src, trg, np.array([parts[s][p] for p in common]), np.array([parts[t][p] for p in common]),
                            ssize, tsize, (x, y, x + w, y + h), cls, f"{s}-{t}"))
    if not out:
        raise PairDataError(f"no {split} pairs with shared visible parts under {root}")
    return out
