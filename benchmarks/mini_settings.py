"""Choosing the mini model's own EmerDiff settings (lambda, t_modulate) on validation scenes.

    python -m benchmarks.mini_settings --out benchmarks/results/mini-settings.jsonl

Each setting: EmerDiff (fast backend) and the naive baseline on validation seeds
5,000,200..5,000,247 (mini.train.VALIDATION_SEEDS: never held out, never trained on), mean
per-image many-to-one mIoU, Hungarian mIoU and boundary F1 (metrics.instance_scores). One
JSON line per setting is appended to --out, so an interrupted sweep keeps what it measured
and a rerun skips the settings already there. The winner goes into mini/card.py's
RECOMMENDED; held-out quality is then measured by benchmarks/quality.py.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# (lambda, t_modulate, modulate_steps): the method's setting first, then the sweep as run
GRID = [(10, 281, 1), (30, 281, 1), (100, 281, 1), (300, 281, 1), (100, 481, 1), (100, 281, 3), (30, 481, 1),
        (10, 481, 1), (30, 681, 1), (10, 681, 1), (30, 481, 3), (60, 481, 1), (10, 881, 1), (30, 881, 1),
        (10, 981, 1), (3, 881, 1), (30, 981, 1), (100, 981, 1), (100, 881, 1), (300, 981, 1), (300, 881, 1)]
SEEDS = range(5_000_200, 5_000_248)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/mini-settings.jsonl")
    p.add_argument("--model", default="mini")
    p.add_argument("--masks", type=int, default=6)
    args = p.parse_args(argv)
    from emerdiff_fast import EmerDiffConfig, load_pipeline
    from emerdiff_fast.mini import RESOLUTION
    from emerdiff_fast.mini.diagnostics import segment_scores
    from emerdiff_fast.mini.train import VALIDATION_SEEDS

    assert SEEDS.start in VALIDATION_SEEDS and SEEDS[-1] in VALIDATION_SEEDS
    out = Path(args.out)
    done = set()
    if out.exists():
        done = {(r["lam"], r["t_modulate"], r["modulate_steps"]) for r in map(json.loads, out.read_text().splitlines())}
    pipe = load_pipeline(args.model)
    for lam, t, steps in GRID:
        if (lam, t, steps) in done:
            continue
        start = time.perf_counter()
        cfg = EmerDiffConfig(resolution=RESOLUTION, num_masks=args.masks, lam=lam, t_modulate=t, modulate_steps=steps)
        scores = segment_scores(pipe, list(SEEDS), cfg)
        row = {"lam": lam, "t_modulate": t, "modulate_steps": steps, "fast": scores["fast"], "naive": scores["naive"],
               "s": time.perf_counter() - start}
        print(f"lambda {lam}, t_modulate {t}, modulate_steps {steps}: many-to-one mIoU EmerDiff "
              f"{row['fast']['many_to_one_miou']:.3f} / naive {row['naive']['many_to_one_miou']:.3f}", flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
