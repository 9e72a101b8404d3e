"""`emerdiff-fast eval`: EmerDiff and the naive baseline on one benchmark, both protocols.

Per-image predictions are cached under OUT/cache/ (atomic writes), so an interrupted run
resumes where it stopped and never recomputes a finished image; OUT/run.json records the
settings, and a cache made with other settings is refused rather than mixed in.
"""
from __future__ import annotations

import io
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from .datasets import SegmentationDataset
from .images import resize_labels
from .maps import naive_upsample
from .metrics import ConceptMIoU, UnsupervisedMIoU
from .output import atomic_write

log = logging.getLogger("emerdiff_fast")


def _positive(value: str) -> int:
    import argparse

    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def add_parser(sub, formatter_class=None) -> None:
    from .cli import add_model_args

    p = sub.add_parser("eval", help="evaluate on a benchmark (mIoU, both protocols)", formatter_class=formatter_class)
    p.add_argument("--dataset", required=True,
                   choices=["cocostuff27", "cocostuff171", "ade20k", "cityscapes", "pascal_context59"])
    p.add_argument("--root", required=True, help="dataset root in its standard layout")
    p.add_argument("--limit", type=_positive, default=None, help="first N validation images only")
    p.add_argument("--out", default="eval-out",
                   help="folder for the cache and results.json; a rerun with the same settings resumes")
    p.add_argument("--overwrite", action="store_true",
                   help="discard a previous run in --out made with other settings")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable samples (counted in results.json) instead of stopping")
    p.add_argument("--matching", choices=["dataset", "image"], default="dataset",
                   help="Hungarian matching over the whole dataset (STEGO) or per image (DiffSeg)")
    p.add_argument("--concepts", choices=["image", "dataset"], default="image",
                   help="modified protocol: concept embeddings per image or per dataset")
    p.add_argument("--quiet", action="store_true")
    add_model_args(p)
    p.set_defaults(func=cmd_eval)


def _settings(args, backend: str) -> dict:
    keys = ("dataset", "model", "random_init", "dtype", "masks", "lam", "seed", "resolution", "feature_samples", "limit")
    return {**{k: getattr(args, k) for k in keys}, "backend": backend}


def _predict(seg, sample) -> dict:
    r = seg(sample.image)
    h, w = sample.label.shape
    k = seg.config.num_masks
    naive = naive_upsample(torch.from_numpy(r.low_res_labels).long(), k, (seg.config.resolution,) * 2)
    return {"emerdiff": r.labels, "naive": resize_labels(naive, (h, w)).numpy().astype(np.int32),
            "embeddings": r.mask_embeddings}


def check_run(out: Path, settings: dict, overwrite: bool = False) -> None:
    """A cache made with other settings is never mixed in: refused, naming what differs,
    or with `overwrite` deleted. Same settings: resume."""
    run_file = out / "run.json"
    if not run_file.exists():
        return
    old = json.loads(run_file.read_text())
    if old == settings:
        return
    if not overwrite:
        diff = ", ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now"
                         for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k))
        raise ValueError(f"{out} holds a run with other settings ({diff}); use another --out or --overwrite")
    shutil.rmtree(out / "cache", ignore_errors=True)
    for name in ("run.json", "results.json"):
        (out / name).unlink(missing_ok=True)


def evaluate(seg, dataset: SegmentationDataset, out: Path, settings: dict, matching="dataset", concepts="image",
             progress: bool = True, skip_bad: bool = False) -> dict:
    from tqdm import tqdm

    from .datasets import DatasetError
    from .images import ImageError

    check_run(out, settings)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "run.json", json.dumps(settings, indent=1).encode())
    methods = ["emerdiff", "naive"] if seg.backend != "naive" else ["naive"]
    scores = {m: (UnsupervisedMIoU(dataset.num_classes, matching=matching),
                  ConceptMIoU(dataset.num_classes, concepts=concepts)) for m in methods}
    bad = []
    for i in tqdm(range(len(dataset)), desc=f"eval {dataset.name}", unit="img", disable=not progress):
        try:
            sample = dataset[i]
        except (DatasetError, ImageError) as exc:
            if not skip_bad:
                raise DatasetError(f"{exc} (--skip-bad skips unreadable samples)") from None
            log.warning("skipped: %s", exc)
            bad.append(dataset.items[i][0])
            continue
        path = cache / f"{sample.name}.npz"
        if path.exists():
            pred = dict(np.load(path))
        else:
            pred = _predict(seg, sample)
            buf = io.BytesIO()
            np.savez_compressed(buf, **pred)
            atomic_write(path, buf.getvalue())
        for m in methods:
            scores[m][0].update(pred[m], sample.label)
            scores[m][1].update(pred[m], pred["embeddings"], sample.label)
    results = {"settings": settings, "images": len(dataset) - len(bad), "skipped_unreadable": bad,
               "matching": matching, "concepts": concepts}
    for m in methods:
        trad, mod = scores[m][0].compute(), scores[m][1].compute()
        results[m] = {"traditional": trad.to_dict(), "modified": mod.to_dict()}
    atomic_write(out / "results.json", json.dumps(results, indent=1).encode())
    return results


def format_table(results: dict) -> str:
    rows = ["| method | mIoU (Hungarian) | pixel acc. (Hungarian) | mIoU (modified) | pixel acc. (modified) |",
            "| --- | --- | --- | --- | --- |"]
    for m in ("emerdiff", "naive"):
        if m in results:
            t, mod = results[m]["traditional"], results[m]["modified"]
            rows.append(f"| {m} | {t['miou']:.1f} | {t['pixel_accuracy']:.1f} | {mod['miou']:.1f} | {mod['pixel_accuracy']:.1f} |")
    return "\n".join(rows)


def cmd_eval(args) -> int:
    from .cli import build_segmenter, check_device, check_out_dir
    from .images import set_max_pixels

    set_max_pixels(args.max_pixels)
    dataset = SegmentationDataset(args.dataset, args.root, args.limit)
    out = Path(args.out)
    check_out_dir(out)
    check_device(args.device)
    settings = _settings(args, args.backend)
    check_run(out, settings, overwrite=args.overwrite)  # before the model loads
    seg = build_segmenter(args)
    try:
        results = evaluate(seg, dataset, out, settings, args.matching, args.concepts,
                           progress=not args.quiet, skip_bad=args.skip_bad)
    except KeyboardInterrupt:
        cached = len(list((out / "cache").glob("*.npz")))
        print(f"interrupted: {cached} of {len(dataset)} images cached in {out / 'cache'}; rerun the same "
              "command to resume", file=sys.stderr)
        return 130
    print(format_table(results))
    print(f"wrote {out / 'results.json'}")
    return 0
