"""Named segmentation on the trained mini model (issue 20), on held-out generated scenes
(scenes.HELDOUT_SEEDS: never used to train or to choose settings).

    python -m benchmarks.open_vocab --n 200 --out benchmarks/results/mini-open-vocab

Labels "background, disc, rectangle, triangle" (the scenes' classes). Class mIoU over the
set (one confusion matrix) of three named segmentations:
  emerdiff  EmerDiff's segments named by the naming rule (vocabulary.name_segments)
  naive     the same k-means masks, bilinearly upsampled, named by the same rule
  heat      the heat maps' own per-pixel argmax (no segments)
Writes OUT/open_vocab.json and OUT/grid.png (input, heat argmax, naive, EmerDiff, truth).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from emerdiff_fast import EmerDiff, load_pipeline
from emerdiff_fast.maps import naive_upsample
from emerdiff_fast.metrics import confusion
from emerdiff_fast.output import palette
from emerdiff_fast.scenes import CLASSES, HELDOUT_SEEDS, make_scene
from emerdiff_fast.vocabulary import Vocabulary, VocabularyConfig, name_segments


def miou(conf: np.ndarray) -> tuple[float, list[float]]:
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou)), [float(x) for x in iou]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--first-seed", type=int, default=HELDOUT_SEEDS.start + 20_000)
    p.add_argument("--out", default="benchmarks/results/mini-open-vocab")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    pipe = load_pipeline("mini")
    seg = EmerDiff(pipe)
    labels = list(CLASSES)
    vocab = Vocabulary(pipe, labels, VocabularyConfig(), resolution=seg.config.resolution)
    cfg, k = vocab.config, seg.config.num_masks
    fallback = vocab.class_names.index(cfg.fallback)
    conf = {m: np.zeros((len(labels), len(labels)), np.int64) for m in ("emerdiff", "naive", "heat")}
    grid, start = [], time.time()
    for s in range(args.first_seed, args.first_seed + args.n):
        scene = make_scene(s)
        r = seg(scene.image)
        heat = vocab.heat_maps(scene.image, size=r.labels.shape).numpy()
        naive = naive_upsample(torch.from_numpy(r.low_res_labels).long(), k, r.labels.shape).numpy()
        preds = {"emerdiff": name_segments(r.labels, heat, cfg.threshold, fallback, k)[r.labels],
                 "naive": name_segments(naive, heat, cfg.threshold, fallback, k)[naive],
                 "heat": heat.argmax(0)}
        for m, pred in preds.items():
            conf[m] += confusion(pred, scene.classes, len(labels), len(labels))
        if len(grid) < 8:
            grid.append(np.concatenate([scene.image] + [palette()[x] for x in (preds["heat"], preds["naive"],
                                                                             preds["emerdiff"], scene.classes)], 1))
    out = {m: dict(zip(("miou", "iou_per_class"), miou(c))) for m, c in conf.items()}
    out.update(labels=labels, n=args.n, seeds=[args.first_seed, args.first_seed + args.n - 1],
               vocabulary=vars(cfg) if hasattr(cfg, "__dict__") else str(cfg), emerdiff=out["emerdiff"],
               wall_s=time.time() - start)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_vocab.json").write_text(json.dumps(out, indent=1, default=str))
    Image.fromarray(np.concatenate(grid, 0)).resize((5 * 64 * 2, len(grid) * 64 * 2), Image.NEAREST).save(
        folder / "grid.png")
    for m in ("emerdiff", "naive", "heat"):
        print(f"{m:9s} class mIoU {out[m]['miou']:.3f}  per class {np.round(out[m]['iou_per_class'], 3).tolist()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
