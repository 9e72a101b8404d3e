"""`emerdiff-fast eval --open-vocab`: the segments named, scored against the data set's
classes (issue 20, item 5), after eval's segmentation pass (evaluate.py) and from its cache.

1. Name: for every cached image, the label heat maps of the data set's class names
   (vocabulary.Vocabulary, the default VocabularyConfig) name EmerDiff's segments and the
   naive-upsampled masks by the naming rule, beside the heat maps' own per-pixel argmax
   (raw, and with the rule's threshold per pixel). The four class-id maps go to OUT/cache/NAME.vocab.npz (atomic; resumable; under
   torchrun each rank names its share). OUT/vocab.json records the names and settings, and
   a vocabulary cache made with others is refused, as eval's run.json is.
2. With --class-map-dir DIR (an external open-vocabulary segmenter's predictions in the
   data set's class ids, DIR/NAME.npz or DIR/NAME.png, read by vocabulary.read_class_map),
   the paper's combination too (Table 3): the external map alone, and EmerDiff's and the
   naive masks' segments each taking the class that covers most of their pixels.
3. Score (rank 0): class mIoU over the data set (metrics.ClassMIoU), one confusion matrix
   per method; a pixel named by the fallback when the fallback is no class of the data set
   (ADE20K has no "background") counts as a miss.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from .datasets import SegmentationDataset
from .metrics import ClassMIoU
from .output import atomic_write, npz_bytes, settings_differ
from .vocabulary import Vocabulary, VocabularyConfig, combine, find_class_map, named_maps, read_class_map

log = logging.getLogger("emerdiff_fast")
VOCAB_VERSION = 1  # bump when NAME.vocab.npz changes: an old one is then refused
NAMED = ("emerdiff", "naive", "heat", "heat_threshold")
COMBINED = ("class_map", "emerdiff+class_map", "naive+class_map")


def vocab_settings(names: list[str], config: VocabularyConfig) -> dict:
    """As recorded in vocab.json (JSON types, so a reread compares equal). draw_batch is left
    out: it changes the memory, not the maps (batched draws equal one-by-one, tested)."""
    vocabulary = {k: v for k, v in dataclasses.asdict(config).items() if k != "draw_batch"}
    return json.loads(json.dumps({"class_names": names, "vocabulary": vocabulary, "vocab_version": VOCAB_VERSION}))


def name_dataset(vocabulary: Vocabulary, dataset: SegmentationDataset, cache: Path, indices: list[int],
                 num_segments: int, *, progress: bool = True, desc: str = "name") -> int:
    """Named class-id maps of the cached segmentations into cache/NAME.vocab.npz, skipping
    finished ones and images eval skipped; returns how many were computed now."""
    from tqdm import tqdm

    cfg = vocabulary.config
    fallback = vocabulary.class_names.index(cfg.fallback)
    computed = 0
    for i in tqdm(indices, desc=desc, unit="img", disable=not progress):
        name = dataset.items[i][0]
        target, entry_file = cache / f"{name}.vocab.npz", cache / f"{name}.npz"
        if target.exists() or not entry_file.exists():  # done, or .bad / .failed in the segmentation pass
            continue
        with np.load(entry_file) as f:
            segs = {m: f[m] for m in ("emerdiff", "naive")}
        # the stored orientation, as in the segmentation pass: labels align with the pixels
        heat = vocabulary.heat_maps(np.asarray(dataset[i].image), size=segs["emerdiff"].shape).numpy()
        maps = named_maps(heat, segs, cfg.threshold, fallback, num_segments)
        atomic_write(target, npz_bytes({m: x.astype(np.uint16) for m, x in maps.items()}))
        computed += 1
    return computed


def check_class_maps(folder: Path, names: list[str]) -> None:
    """Before any work: the folder exists and holds a class map for every image."""
    if not folder.is_dir():
        raise ValueError(f"--class-map-dir {folder} is not a folder")
    missing = [n for n in names if find_class_map(folder, n) is None]
    if missing:
        raise ValueError(f"{len(missing)} of {len(names)} images have no class map in {folder} "
                         f"(first: {missing[0]}.npz or .png)")


def _external(folder: Path, name: str, shape: tuple[int, int]) -> np.ndarray:
    path = find_class_map(folder, name)
    if path is None:
        raise FileNotFoundError(f"no class map for {name} in {folder} (expected {name}.npz or {name}.png)")
    class_map, _ = read_class_map(path)
    if class_map.shape != shape:
        raise ValueError(f"class map {path} is {class_map.shape}, the image's label map {shape}")
    return class_map


def score_open_vocab(dataset: SegmentationDataset, cache: Path, names: list[str], num_segments: int, *,
                     class_map_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Class mIoU of each named segmentation (module docstring), from the cache alone."""
    from tqdm import tqdm

    c, ignore = dataset.num_classes, dataset.ignore_index
    methods = NAMED + (COMBINED if class_map_dir is not None else ())
    scores = {m: ClassMIoU(c, ignore) for m in methods}
    done = [item[0] for item in dataset.items if (cache / f"{item[0]}.vocab.npz").exists()]
    if not done:
        raise RuntimeError("no image was named")
    for name in tqdm(done, desc="score: open vocabulary", disable=not progress):
        with np.load(cache / f"{name}.npz") as f:
            entry = {k: f[k] for k in ("emerdiff", "naive", "gt")}
        with np.load(cache / f"{name}.vocab.npz") as f:
            named = {m: f[m].astype(np.int64) for m in NAMED}
        if class_map_dir is not None:
            ext = _external(Path(class_map_dir), name, entry["gt"].shape)
            named["class_map"] = ext
            for m in ("emerdiff", "naive"):
                named[f"{m}+class_map"] = combine(entry[m], ext, num_segments)[entry[m]]
        for m in methods:
            scores[m].update(named[m], entry["gt"])
    return {"images": len(done), "class_names": names, "class_map_dir": None if class_map_dir is None else str(class_map_dir),
            "description": "class mIoU over the data set: EmerDiff's segments and the naive-upsampled masks named "
                           "by the label heat maps (vocabulary.name_segments), the heat maps' per-pixel argmax"
                           + ("; an external class map alone and combined with each by the overlap rule"
                              if class_map_dir is not None else ""),
            **{m: scores[m].compute().to_dict() for m in methods}}


def format_open_vocab_table(results: dict) -> str:
    rows = [f"open vocabulary: {results['images']} images, {len(results['class_names'])} class names", "",
            "| segmentation | class mIoU | pixel acc. |", "| --- | --- | --- |"]
    what = {"emerdiff": "EmerDiff segments, named", "naive": "naive-upsampled masks, named",
            "heat": "heat maps' per-pixel argmax",
            "heat_threshold": "heat maps' per-pixel argmax, thresholded", "class_map": "external class map",
            "emerdiff+class_map": "EmerDiff + class map (overlap rule)",
            "naive+class_map": "naive + class map (overlap rule)"}
    for m in NAMED + COMBINED:
        if m in results:
            rows.append(f"| {what[m]} | {results[m]['miou']:.1f} | {results[m]['pixel_accuracy']:.1f} |")
    return "\n".join(rows)


def start_naming(out: Path, settings: dict, overwrite: bool = False) -> None:
    """As evaluate.start_run, for the naming pass: other names or settings are refused, or
    with `overwrite` their NAME.vocab.npz deleted (the segmentations are kept)."""
    diff = settings_differ(out / "vocab.json", settings)
    if diff is not None:
        if not overwrite:
            raise ValueError(f"{out} holds named segments made with other settings ({diff}); use another --out "
                             "or --overwrite")
        for f in (out / "cache").glob("*.vocab.npz"):
            f.unlink()
    atomic_write(out / "vocab.json", json.dumps(settings, indent=1).encode())
