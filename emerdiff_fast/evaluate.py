"""`emerdiff-fast eval`: EmerDiff and the naive baseline on one benchmark, both protocols.

Per-image predictions are cached under OUT/cache/ (atomic writes), so an interrupted run
resumes where it stopped and never recomputes a finished image; OUT/run.json records the
settings, and a cache made with other settings is refused rather than mixed in.
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

from .datasets import SegmentationDataset
from .images import resize_labels
from .maps import naive_upsample
from .metrics import ConceptMIoU, UnsupervisedMIoU
from .output import atomic_write


def add_parser(sub) -> None:
    from .cli import add_model_args

    p = sub.add_parser("eval", help="evaluate on a benchmark (mIoU, both protocols)")
    p.add_argument("--dataset", required=True,
                   choices=["cocostuff27", "cocostuff171", "ade20k", "cityscapes", "pascal_context59"])
    p.add_argument("--root", required=True, help="dataset root in its standard layout")
    p.add_argument("--limit", type=int, default=None, help="first N validation images only")
    p.add_argument("--out", default="eval-out", help="folder for the cache and results.json")
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


def evaluate(seg, dataset: SegmentationDataset, out: Path, settings: dict, matching="dataset", concepts="image",
             progress: bool = True) -> dict:
    from tqdm import tqdm

    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    if run_file.exists() and json.loads(run_file.read_text()) != settings:
        raise ValueError(f"{out} holds results of a run with other settings ({run_file}); use another --out")
    atomic_write(run_file, json.dumps(settings, indent=1).encode())
    methods = ["emerdiff", "naive"] if seg.backend != "naive" else ["naive"]
    scores = {m: (UnsupervisedMIoU(dataset.num_classes, matching=matching),
                  ConceptMIoU(dataset.num_classes, concepts=concepts)) for m in methods}
    for i in tqdm(range(len(dataset)), desc=f"eval {dataset.name}", unit="img", disable=not progress):
        sample = dataset[i]
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
    results = {"settings": settings, "images": len(dataset), "matching": matching, "concepts": concepts}
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
    from .cli import build_segmenter
    from .datasets import DatasetError

    try:
        dataset = SegmentationDataset(args.dataset, args.root, args.limit)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seg = build_segmenter(args)
    out = Path(args.out)
    results = evaluate(seg, dataset, out, _settings(args, seg.backend), args.matching, args.concepts,
                       progress=not args.quiet)
    print(format_table(results))
    print(f"wrote {out / 'results.json'}")
    return 0
