"""`emerdiff-fast hyperfeatures extract|train|eval|match`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _common(p) -> None:
    from ..commands.common import DTYPES, add_logging_args

    p.add_argument("--model", required=True, help="as for segment: hub id, folder, single file, or 'tiny'")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--one-step", action="store_true", help="the one-step variant (default: all 11 steps)")
    p.add_argument("--load-resolution", type=int, default=512)
    p.add_argument("--weights", default=None, help="a trained aggregation network (.safetensors)")
    p.add_argument("--cache", default=None, help="folder caching extracted features")
    p.add_argument("--quiet", action="store_true")
    add_logging_args(p)


def _data(p) -> None:
    from ..commands.common import positive_int

    p.add_argument("--dataset", choices=["spair", "cub"], required=True)
    p.add_argument("--root", required=True, help="SPair-71k or CUB-200-2011 root in its own layout")
    p.add_argument("--limit", type=positive_int, default=None, help="first N pairs only")


def add_parser(sub, formatter_class=None) -> None:
    hp = sub.add_parser("hyperfeatures", help="Diffusion Hyperfeatures: extract, train, eval, match",
                        formatter_class=formatter_class)
    hsub = hp.add_subparsers(dest="hf_command", required=True)
    p = hsub.add_parser("extract", help="features of images into --cache", formatter_class=formatter_class)
    p.add_argument("images", nargs="+")
    _common(p)
    p = hsub.add_parser("train", help="train the aggregation network", formatter_class=formatter_class)
    _common(p)
    _data(p)
    p.add_argument("--out", required=True, help="run folder: best.safetensors, last.pt (resumable)")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--val-every", type=int, default=1000)
    p.add_argument("--val-pairs", type=int, default=360, help="validation pairs (the authors: 360)")
    p.add_argument("--lr", type=float, default=1e-3)
    p = hsub.add_parser("eval", help="PCK@0.1 on a test split", formatter_class=formatter_class)
    _common(p)
    _data(p)
    p.add_argument("--split", default="test")
    p = hsub.add_parser("match", help="match keypoints and draw the lines", formatter_class=formatter_class)
    p.add_argument("src")
    p.add_argument("tgt")
    p.add_argument("--points", required=True, help="source keypoints 'x,y;x,y;...' in source pixels")
    p.add_argument("--out", default="matches.png")
    _common(p)
    hp.set_defaults(func=cmd_hyperfeatures)


def _pairs(args, split):
    from .datasets import cub_pairs, spair_pairs

    if args.dataset == "spair":
        return spair_pairs(args.root, split, args.limit)
    pairs = cub_pairs(args.root, split="train" if split in ("train", "trn") else "test")
    return pairs[:args.limit]


def _hyperfeatures(args):
    import torch

    from .. import load_pipeline
    from ..commands.common import DTYPES, check_device
    from . import Hyperfeatures
    from .extract import ExtractConfig

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    pipe = load_pipeline(args.model, device=device, dtype=DTYPES[args.dtype], random_init=args.random_init)
    cfg = (ExtractConfig.one_step(load_resolution=args.load_resolution) if args.one_step
           else ExtractConfig(load_resolution=args.load_resolution))
    return Hyperfeatures(pipe, cfg, weights=args.weights, cache_dir=args.cache)


def cmd_hyperfeatures(args) -> int:
    from .train import TrainConfig

    hf = _hyperfeatures(args)
    if args.hf_command == "extract":
        from tqdm import tqdm

        if not args.cache:
            print("error: extract needs --cache (the folder the features go to)", file=sys.stderr)
            return 2
        for image in tqdm(args.images, desc="extract", disable=args.quiet):
            f = hf.cache.get(image)
        mb = sum(m.numel() * m.element_size() for m in f.maps) / 1e6
        print(f"features of {len(args.images)} images in {args.cache} ({mb:.1f} MB per image, "
              f"{len(f.maps)} layers x {len(f.save_timestep)} timesteps)")
        return 0
    if args.hf_command == "train":
        pairs = _pairs(args, "trn")
        val = _pairs(args, "val")[:args.val_pairs] if args.dataset == "spair" else pairs[-args.val_pairs:]
        res = hf.train(pairs, val, TrainConfig(steps=args.steps, val_every=args.val_every, lr=args.lr),
                       out_dir=args.out, progress=not args.quiet)
        print(json.dumps({"best_val_pck_img": res["best_pck_img"], "history": res["history"]}, indent=1))
        return 0
    if args.hf_command == "eval":
        res = hf.evaluate(_pairs(args, args.split))
        print(f"PCK@0.1 (image) {res['pck_img']:.2f}, PCK@0.1 (bbox) {res['pck_bbox']:.2f} "
              f"over {res['keypoints']} keypoints")
        return 0
    from . import draw_matches

    pts = np.array([[float(v) for v in p.split(",")] for p in args.points.split(";") if p.strip()])
    found = hf.match(args.src, args.tgt, pts)
    draw_matches(args.src, args.tgt, pts, found).save(args.out)
    for (x1, y1), (x2, y2) in zip(pts, found):
        print(f"({x1:.0f}, {y1:.0f}) -> ({x2:.0f}, {y2:.0f})")
    print(f"wrote {Path(args.out)}")
    return 0
