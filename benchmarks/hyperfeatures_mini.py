"""Diffusion Hyperfeatures on the mini model: generated correspondence pairs, the
aggregation network trained (all steps and one step) with checkpoints chosen on validation
pairs, and the held-out table against the baselines, plus the same network trained on the
random-init mini architecture (learned knowledge vs the network's own capacity).

    python -m benchmarks.hyperfeatures_mini --run runs/hf-mini [--ship]

Resumable: pairs, cached features (RUN/cache) and each training's last.pt are reused.
--ship copies both best networks into the mini model folder (hyperfeatures/) with
training.json, the record the model card reads. Splits by seed range: trn from the
training seeds, val from the validation seeds, test from the held-out seeds.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from emerdiff_fast import load_pipeline
from emerdiff_fast.hyperfeatures import AggregationNetwork, Hyperfeatures, SHIPPED_DIR, TrainConfig, draw_matches
from emerdiff_fast.hyperfeatures.baselines import Row, baseline_rows, format_rows
from emerdiff_fast.hyperfeatures.correspondence import pair_images
from emerdiff_fast.hyperfeatures.datasets import spair_pairs
from emerdiff_fast.hyperfeatures.extract import ExtractConfig
from emerdiff_fast.mini import MODEL_DIR, RESOLUTION
from emerdiff_fast.output import atomic_write
from emerdiff_fast.scene_pairs import write_pairs
from emerdiff_fast.scenes import SPLITS

log = logging.getLogger("emerdiff_fast")
VARIANTS = {"all-steps": (False, False), "one-step": (True, False), "random-init": (False, True)}  # one_step, random


def make_pairs(root: Path, counts: dict[str, int]) -> dict:
    for split, n in counts.items():
        ann = root / "PairAnnotation" / split
        if not ann.is_dir() or len(list(ann.glob("*.json"))) != n:
            write_pairs(root, n, SPLITS[split].start, RESOLUTION, progress=True)
    return {split: spair_pairs(root, split) for split in counts}


def variant(name: str, args, pairs: dict, run: Path) -> tuple[Hyperfeatures, dict]:
    """Extract (cached), train (resumable), and return the network at its best validation step."""
    one_step, random = VARIANTS[name]
    pipe = load_pipeline("mini", random_init=random)
    cfg = ExtractConfig.one_step(load_resolution=RESOLUTION) if one_step else ExtractConfig(load_resolution=RESOLUTION)
    torch.manual_seed(args.seed)  # the network's initialisation
    hf = Hyperfeatures(pipe, cfg, projection_dim=args.projection_dim, cache_dir=run / "cache")
    t0 = time.time()
    hf.cache.fill(pair_images([p for split in pairs.values() for p in split]), args.batch, progress=True)
    extract_s = time.time() - t0
    t0 = time.time()
    res = hf.train(pairs["trn"], pairs["val"], TrainConfig(steps=args.steps, val_every=args.val_every, lr=args.lr,
                                                          seed=args.seed), out_dir=run / name)
    record = {"extract_s": extract_s, "train_s": time.time() - t0, "history": res["history"],
              "best_val_pck_img": res["best_pck_img"]}
    hf.net = AggregationNetwork.load(run / name / "best.safetensors", hf.extractor.device)
    return hf, record


def picture(hf: Hyperfeatures, pairs, path: Path) -> None:
    from PIL import Image

    tiles = []
    for p in pairs:
        tiles.append(draw_matches(p.src, p.trg, p.src_kps, hf.match(p.src, p.trg, p.src_kps)))
    w, h = tiles[0].size
    sheet = Image.new("RGB", (w, h * len(tiles)), "white")
    for i, t in enumerate(tiles):
        sheet.paste(t, (0, i * h))
    sheet.save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--trn", type=int, default=1000, help="training pairs")
    ap.add_argument("--val", type=int, default=100, help="validation pairs (checkpoint and best-layer choice)")
    ap.add_argument("--test", type=int, default=300, help="held-out pairs (the table)")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--val-every", type=int, default=500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--projection-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32, help="images per inversion when filling the cache")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ship", action="store_true", help="copy the best networks into the mini model folder")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run = args.run
    run.mkdir(parents=True, exist_ok=True)
    pairs = make_pairs(run / "pairs", {"trn": args.trn, "val": args.val, "test": args.test})
    records, nets = {}, {}
    for name in VARIANTS:
        nets[name], records[name] = variant(name, args, pairs, run)
    rows = baseline_rows(nets["all-steps"], nets["one-step"], pairs["test"], pairs["val"], progress=True)
    rnd = nets["random-init"]
    rows.append(Row.of("random-init aggregated", rnd.evaluate(pairs["test"], progress=True),
                       "the same network trained the same way on the untrained mini architecture's features"))
    table = format_rows(rows)
    print(table)
    picture(nets["all-steps"], pairs["test"][:6], run / "matches.png")
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "rows": [asdict(r) for r in rows], "training": records, "table": table}
    atomic_write(run / "results.json", json.dumps(result, indent=1).encode())
    if args.ship:
        dest = MODEL_DIR / SHIPPED_DIR
        dest.mkdir(exist_ok=True)
        for name in ("all-steps", "one-step"):
            shutil.copyfile(run / name / "best.safetensors", dest / f"{name}.safetensors")
        command = ("python -m benchmarks.hyperfeatures_mini --run RUN --ship " +
                   " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                            if k not in ("run", "ship")))
        atomic_write(dest / "training.json", json.dumps({"command": command, "rows": [asdict(r) for r in rows],
                                                         "training": {k: {kk: vv for kk, vv in v.items()
                                                                          if kk != "history"}
                                                                      for k, v in records.items()},
                                                         "histories": {k: v["history"] for k, v in records.items()}},
                                                        indent=1).encode())
        from emerdiff_fast.mini.card import with_hyperfeatures

        card = MODEL_DIR / "MODEL_CARD.md"
        card.write_text(with_hyperfeatures(card.read_text()))
        print(f"shipped to {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
