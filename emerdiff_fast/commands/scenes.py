"""`emerdiff-fast scenes`: write a set of generated scenes with their ground truth, or with
--pairs, correspondence pairs with exact keypoints in the SPair-71k layout."""
from __future__ import annotations

import logging
from pathlib import Path

from ..scenes import DEFAULT_SIZE, HELDOUT_SEEDS, TRAIN_SEEDS, VALIDATION_SEEDS, split_of, write_dataset
from .common import UsageError, add_logging_args, check_out_dir, positive_int

log = logging.getLogger("emerdiff_fast")


def cmd_pairs(args) -> int:
    from ..scene_pairs import write_pairs

    out = Path(args.out)
    try:
        split = split_of(range(args.seed, args.seed + args.n))
    except ValueError as exc:
        raise UsageError(f"--seed {args.seed} -n {args.n}: {exc}") from None
    ann = out / "PairAnnotation" / split
    if ann.is_dir() and any(ann.glob("*.json")) and not args.overwrite:
        raise UsageError(f"{ann} already holds pairs; use --overwrite to replace them, or write another split")
    check_out_dir(out)
    if args.overwrite and ann.is_dir():
        for f in ann.glob("*.json"):
            f.unlink()
    write_pairs(out, args.n, args.seed, args.size, progress=not args.quiet)
    log.info("wrote %d %s pairs to %s (read them with: hyperfeatures eval --dataset spair --root %s --split %s)",
             args.n, split, out, out, split)
    return 0


def cmd_scenes(args) -> int:
    if args.pairs:
        return cmd_pairs(args)
    out = Path(args.out)
    if (out / "scenes.jsonl").exists() and not args.overwrite:
        raise UsageError(f"{out} already holds a scene set (scenes.jsonl); use --overwrite to replace it")
    check_out_dir(out)
    seeds = range(args.seed, args.seed + args.n)
    if seeds.start < TRAIN_SEEDS.stop and seeds.stop > TRAIN_SEEDS.start:
        log.warning("seeds %d..%d overlap the mini model's training seeds (%d..%d); held-out seeds start at %d",
                    seeds.start, seeds.stop - 1, TRAIN_SEEDS.start, TRAIN_SEEDS.stop - 1, HELDOUT_SEEDS.start)
    write_dataset(out, args.n, args.seed, args.size, progress=not args.quiet)
    log.info("wrote %d scenes to %s (read them with: eval --dataset shapes --root %s)", args.n, out, out)
    return 0


def add_parser(sub, fmt) -> None:
    p = sub.add_parser("scenes", help="write a set of generated scenes with ground truth (the mini model's world)",
                       formatter_class=fmt)
    p.add_argument("--out", required=True, help="folder: scenes.jsonl, images/, instances/, classes/ (with --pairs: "
                                                "JPEGImages/, PairAnnotation/<split>/)")
    p.add_argument("--pairs", action="store_true",
                   help="write correspondence pairs (one annotated object moved, scaled, rotated and recoloured "
                        "between two scenes, exact keypoints) in the SPair-71k layout, into the split the seeds' "
                        f"range names: trn from {TRAIN_SEEDS.start}, val from {VALIDATION_SEEDS.start}, test from "
                        f"{HELDOUT_SEEDS.start}; call once per split with the same --out")
    p.add_argument("-n", type=positive_int, default=200, help="number of scenes (or pairs)")
    p.add_argument("--seed", type=int, default=HELDOUT_SEEDS.start,
                   help="first seed (scenes seed..seed+n-1); the default is the first held-out seed")
    p.add_argument("--size", type=positive_int, default=DEFAULT_SIZE, help="image side in pixels")
    p.add_argument("--overwrite", action="store_true", help="replace a scene set (or that split's pairs) in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_logging_args(p)
    p.set_defaults(func=cmd_scenes)
