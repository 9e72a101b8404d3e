"""EmerDiff's quality on the trained mini model, measured on held-out generated scenes
(seeds from scenes.HELDOUT_SEEDS: never used to train the model or to choose its settings).

    python -m benchmarks.quality --n 200 --out benchmarks/results/mini-quality

1. `emerdiff-fast eval --dataset shapes` on the scenes (fast backend, the model's
   recommended settings): the traditional and modified protocols on the class maps, and a
   cache holding, per scene, EmerDiff's labels and the naive baseline's (the same k-means
   masks, bilinearly upsampled).
2. Per-image instance scores from that cache (metrics.instance_scores): many-to-one mIoU,
   Hungarian mIoU, boundary F1 within 1 px; over all scenes and by background kind.
3. `--fidelity`: every approximation, as many-to-one mIoU and as label agreement with the
   exact float32 fast path (segment ids matched one-to-one by overlap first, since a
   changed k-means may number the same segments differently).
4. A picture grid: input, naive, EmerDiff, ground truth.

Writes OUT/quality.json and OUT/grid.png.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from emerdiff_fast.metrics import confusion, hungarian, instance_scores
from emerdiff_fast.scenes import HELDOUT_SEEDS, make_scene, write_dataset


def _mean_se(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0}


def label_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pixels whose labels agree once a's ids are matched one-to-one to b's."""
    n = int(max(a.max(), b.max())) + 1
    conf = confusion(a, b, n, n, ignore_index=-1)
    mapping = hungarian(conf)
    return float(sum(conf[p, g] for p, g in mapping.items()) / a.size)


def run_eval(root: Path, out: Path, model: str) -> dict:
    from emerdiff_fast.cli import main

    rc = main(["eval", "--dataset", "shapes", "--root", str(root), "--out", str(out / "eval"), "--model", model,
               "--quiet", "--device", "cpu"])
    if rc != 0:
        raise SystemExit(f"eval failed with exit {rc}")
    return json.loads((out / "eval" / "results.json").read_text())


def instance_table(seeds, cache: Path) -> tuple[dict, dict, dict]:
    """Per-image instance scores from eval's cache: their means over all scenes, the label
    maps, and the means by background kind (where EmerDiff and naive differ most)."""
    per = {"emerdiff": [], "naive": []}
    labels = {"emerdiff": [], "naive": []}
    backgrounds = []
    for s in seeds:
        scene = make_scene(s)
        backgrounds.append(scene.background)
        with np.load(cache / f"{scene.id}.npz") as f:
            for m in per:
                per[m].append(instance_scores(f[m], scene.instances))
                labels[m].append(f[m])
    table = {m: {k: _mean_se([p[k] for p in rows]) for k in rows[0]} for m, rows in per.items()}
    by_background = {}
    for kind in sorted(set(backgrounds)):
        idx = [i for i, b in enumerate(backgrounds) if b == kind]
        by_background[kind] = {"n": len(idx), **{m: {k: float(np.mean([rows[i][k] for i in idx])) for k in rows[0]}
                                                  for m, rows in per.items()}}
    return table, labels, by_background


FIDELITY = {  # name -> (EmerDiffConfig changes, dtype, backend)
    "bfloat16": ({}, torch.bfloat16, "fast"),
    "float16": ({}, torch.float16, "fast"),
    "feature_samples=1": ({"feature_samples": 1}, torch.float32, "fast"),
    "feature_samples=32": ({"feature_samples": 32}, torch.float32, "fast"),
    "feature_samples=100": ({"feature_samples": 100}, torch.float32, "fast"),
    "kmeans_restarts=1": ({"kmeans_restarts": 1}, torch.float32, "fast"),
    "preset grid25": ("grid25", torch.float32, "fast"),
    "preset decode-fast": ("decode-fast", torch.float32, "fast"),
    "preset fastest": ("fastest", torch.float32, "fast"),
    "modulate_steps=3": ({"modulate_steps": 3}, torch.float32, "fast"),
    "reference backend": ({}, torch.float32, "reference"),
}


def fidelity(seeds, exact: list[np.ndarray], model: str, skip=()) -> dict:
    from emerdiff_fast import EmerDiff, load_pipeline, recommended_config

    scenes = [make_scene(s) for s in seeds]
    images = [Image.fromarray(s.image) for s in scenes]
    rows = {}
    for name, (change, dtype, backend) in FIDELITY.items():
        if name in skip:
            continue
        pipe = load_pipeline(model, dtype=dtype)
        base = recommended_config(pipe)
        cfg = base.with_preset(change) if isinstance(change, str) else base.replace(**change)
        seg = EmerDiff(pipe, cfg, backend=backend)
        start = time.perf_counter()
        labels = [r.labels for r in seg(images)]
        seconds = (time.perf_counter() - start) / len(images)
        rows[name] = {
            "many_to_one_miou": _mean_se([instance_scores(l, s.instances)["many_to_one_miou"]
                                          for l, s in zip(labels, scenes)]),
            "label_agreement": _mean_se([label_agreement(l, e) for l, e in zip(labels, exact)]),
            "s_per_scene": seconds}
        print(f"{name}: mIoU {rows[name]['many_to_one_miou']['mean']:.3f}, agreement "
              f"{rows[name]['label_agreement']['mean']:.3f}, {seconds:.2f} s/scene", flush=True)
    return rows


def picture_grid(seeds, labels: dict, path: Path) -> None:
    from emerdiff_fast.output import palette, tile_grid

    rows = []
    for i, s in enumerate(seeds):
        scene = make_scene(s)
        rows.append([scene.image, *(palette()[x] for x in (labels["naive"][i], labels["emerdiff"][i], scene.instances))])
    tile_grid(rows).save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="held-out scenes")
    p.add_argument("--out", default="benchmarks/results/mini-quality")
    p.add_argument("--model", default="mini")
    p.add_argument("--fidelity", type=int, default=0, metavar="N", help="also the approximations, on N of the scenes")
    p.add_argument("--grid", type=int, default=8, help="scenes in the picture grid")
    p.add_argument("--skip", default="", help="comma list of fidelity rows to leave out")
    args = p.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(HELDOUT_SEEDS.start, HELDOUT_SEEDS.start + args.n))
    root = out / "scenes"
    if not (root / "scenes.jsonl").exists():
        write_dataset(root, args.n, HELDOUT_SEEDS.start)
    start = time.perf_counter()
    protocols = run_eval(root, out, args.model)
    table, labels, by_background = instance_table(seeds, out / "eval" / "cache")
    result = {"model": args.model, "scenes": args.n, "seeds": [seeds[0], seeds[-1]], "instance": table,
              "by_background": by_background,
              "protocols": {m: {k: protocols[m][k]["miou"] for k in protocols[m] if isinstance(protocols[m][k], dict)
                                and "miou" in protocols[m][k]} for m in ("emerdiff", "naive")},
              "eval_s": time.perf_counter() - start}
    print(json.dumps(result["instance"], indent=1))
    picture_grid(seeds[:args.grid], labels, out / "grid.png")
    if args.fidelity:
        result["fidelity"] = fidelity(seeds[:args.fidelity], labels["emerdiff"][:args.fidelity], args.model,
                                      skip=set(filter(None, args.skip.split(","))))
    (out / "quality.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'quality.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
