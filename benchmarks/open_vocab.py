"""Named segmentation on the trained mini model (issue 20), on held-out generated scenes
(scenes.HELDOUT_SEEDS: never used to train or to choose settings).

    python -m benchmarks.open_vocab --n 200 --out benchmarks/results/mini-open-vocab
    python -m benchmarks.open_vocab --n 200 --labels colour-shape --out benchmarks/results/mini-open-vocab-colour

Labels "background, disc, rectangle, triangle" (the scenes' classes), or with
--labels colour-shape the 30 "red disc" ... "pink triangle" and "background" (31 labels over
two prompts of the mini text encoder; the truth is each instance's colour and shape). Class
mIoU over the set (one confusion matrix, metrics.ClassMIoU) of five segmentations:
  emerdiff  EmerDiff's segments named by the naming rule (vocabulary.name_segments)
  naive     the same k-means masks, bilinearly upsampled, named by the same rule
  heat      the heat maps' own per-pixel argmax (no segments)
  heat_threshold  the same, the fallback where a pixel's best heat is under the threshold
  background      every pixel background: what the class prior alone scores
Writes OUT/open_vocab.json and OUT/grid.png (input, heat argmax, naive, EmerDiff, truth).
A class absent from both truth and predictions over the set has no IoU and is left out of the mean.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from emerdiff_fast import EmerDiff, load_pipeline
from emerdiff_fast.maps import naive_upsample
from emerdiff_fast.metrics import ClassMIoU
from emerdiff_fast.output import palette, tile_grid
from emerdiff_fast.scenes import CLASSES, COLOUR_SHAPE_LABELS, HELDOUT_SEEDS, make_scene
from emerdiff_fast.vocabulary import Vocabulary, VocabularyConfig, named_maps


def truth(scene, labels: list[str]) -> np.ndarray:
    """The scene's per-pixel label index: its classes, or each instance's colour and shape."""
    if labels == list(CLASSES):
        return scene.classes
    lut = np.array([labels.index("background")] + [labels.index(f"{s.colour} {s.kind}") for s in scene.shapes])
    return lut[scene.instances]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--first-seed", type=int, default=HELDOUT_SEEDS.start + 20_000)
    p.add_argument("--labels", choices=["classes", "colour-shape"], default="classes")
    p.add_argument("--threshold", type=float, default=VocabularyConfig.threshold,
                   help="the naming rule's threshold (choose it on validation scenes, never these)")
    p.add_argument("--out", default="benchmarks/results/mini-open-vocab")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    pipe = load_pipeline("mini")
    seg = EmerDiff(pipe)
    labels = list(CLASSES if args.labels == "classes" else COLOUR_SHAPE_LABELS)
    vocab = Vocabulary(pipe, labels, VocabularyConfig(threshold=args.threshold), resolution=seg.config.resolution)
    cfg, k = vocab.config, seg.config.num_masks
    fallback = vocab.class_names.index(cfg.fallback)
    methods = ("emerdiff", "naive", "heat", "heat_threshold", "background")
    scores = {m: ClassMIoU(len(labels)) for m in methods}
    grid, start = [], time.time()
    for s in range(args.first_seed, args.first_seed + args.n):
        scene = make_scene(s)
        gt = truth(scene, labels)
        r = seg(scene.image)
        heat = vocab.heat_maps(scene.image, size=r.labels.shape).numpy()
        naive = naive_upsample(torch.from_numpy(r.low_res_labels).long(), k, r.labels.shape).numpy()
        preds = named_maps(heat, {"emerdiff": r.labels, "naive": naive}, cfg.threshold, fallback, k)
        preds["background"] = np.full_like(gt, labels.index("background"))  # the prior alone
        for m, pred in preds.items():
            scores[m].update(pred, gt)
        if len(grid) < 8:
            grid.append([scene.image] + [palette()[x] for x in (preds["heat"], preds["naive"], preds["emerdiff"], gt)])
    out = {}
    for m, score in scores.items():
        res = score.compute()  # percent
        out[m] = {"miou": res.miou / 100, "iou_per_class": [None if np.isnan(v) else float(v) / 100
                                                           for v in res.per_class_iou]}
    out.update(labels=labels, groups=vocab.groups, n=args.n, seeds=[args.first_seed, args.first_seed + args.n - 1],
               vocabulary=dataclasses.asdict(cfg), wall_s=time.time() - start)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_vocab.json").write_text(json.dumps(out, indent=1, default=str))
    tile_grid(grid, pad=0, scale=2).save(folder / "grid.png")
    for m in methods:
        per_class = [None if v is None else round(v, 3) for v in out[m]["iou_per_class"]]
        print(f"{m:9s} class mIoU {out[m]['miou']:.3f}  per class {per_class}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
