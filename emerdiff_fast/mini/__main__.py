"""python -m emerdiff_fast.mini train --out DIR | ship --run DIR"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from .train import TrainConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m emerdiff_fast.mini", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train (or resume) the mini model in a run folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--out", required=True, help="run folder: checkpoints, log.jsonl, export/, best/")
    for f in dataclasses.fields(TrainConfig):
        t.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    s = sub.add_parser("ship", help="copy a run's best export into the package, with its model card")
    s.add_argument("--run", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        if args.cmd == "train":
            from .train import train

            cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
            train(args.out, cfg, progress=not args.quiet)
        else:
            from .card import ship

            ship(args.run)
    except ValueError as exc:  # other settings in --out, a checkpoint that is not plain tensors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
