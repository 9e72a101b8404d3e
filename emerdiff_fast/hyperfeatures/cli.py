"""`emerdiff-fast hyperfeatures extract|train|eval|match`."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def _common(p) -> None:
    from ..commands.common import DTYPES, add_logging_args, positive_int

    p.add_argument("--model", default=None, help="as for segment: hub id, folder, single file, 'mini' (the "
                                                 "default: built in, trained on generated shapes) or 'tiny'")
    p.add_argument("--random-init", action="store_true", help="--model is a config folder: seeded random weights")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if present, else cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model weights and activations")
    p.add_argument("--one-step", action="store_true", help="the one-step variant (default: all 11 steps)")
    p.add_argument("--load-resolution", type=int, default=None,
                   help="images are resized to this square (default: the model's resolution: 512 for SD, "
                        "64 for mini)")
    p.add_argument("--weights", default=None,
                   help="a trained aggregation network (.safetensors); default: the one the model ships (the mini "
                        "model ships both variants), else an untrained one, said in one line (train: always starts "
                        "from an untrained one unless given)")
    p.add_argument("--cache", default=None, help="folder caching extracted features (default: none)")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="images per inversion when features are extracted (extract, train, eval)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_logging_args(p)


def _data(p) -> None:
    from ..commands.common import positive_int

    p.add_argument("--dataset", choices=["spair", "cub"], required=True)
    p.add_argument("--root", required=True, help="SPair-71k or CUB-200-2011 root in its own layout")
    p.add_argument("--limit", type=positive_int, default=None, help="first N pairs only")


def add_parser(sub, formatter_class=None) -> None:
    from ..commands.common import positive_int

    hp = sub.add_parser("hyperfeatures", help="Diffusion Hyperfeatures: extract, train, eval, match",
                        formatter_class=formatter_class)
    hsub = hp.add_subparsers(dest="hf_command", required=True)
    p = hsub.add_parser("extract", help="features of images into --cache", formatter_class=formatter_class)
    p.add_argument("images", nargs="+", help="image files whose features go to --cache")
    _common(p)
    p = hsub.add_parser("train", help="train the aggregation network", formatter_class=formatter_class)
    _common(p)
    _data(p)
    p.add_argument("--out", required=True, help="run folder: best.safetensors, last.pt (resumable)")
    p.add_argument("--steps", type=int, default=5000, help="training steps of one pair")
    p.add_argument("--val-every", type=int, default=1000, help="steps between validations")
    p.add_argument("--val-pairs", type=int, default=360, help="validation pairs (the authors: 360)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--projection-dim", type=positive_int, default=384,
                   help="channels of the hyperfeature map (the authors' 384; the mini model's shipped networks: 128)")
    p = hsub.add_parser("eval", help="PCK@0.1 on a test split", formatter_class=formatter_class)
    _common(p)
    _data(p)
    p.add_argument("--split", default="test", help="the split scored (SPair-71k: trn, val, test)")
    p.add_argument("--baselines", action="store_true",
                   help="also score the one-step variant, the best single (layer, timestep) chosen on the val "
                        "split, raw pixels and the VAE latent (one row each)")
    p.add_argument("--one-step-weights", default=None,
                   help="the one-step network for --baselines (default: the one the model ships; without one "
                        "that row is left out)")
    p.add_argument("--val-pairs", type=positive_int, default=100,
                   help="validation pairs that choose --baselines' best single layer (SPair-71k: the val split)")
    p.add_argument("--json", default=None, help="write the rows to this file: {\"rows\": [{\"name\", \"pck_bbox\", "
                                                "\"pck_img\", \"keypoints\", ...}]} (default: none)")
    p = hsub.add_parser("match", help="match keypoints and draw the lines", formatter_class=formatter_class)
    p.add_argument("src", help="source image (its --points are matched)")
    p.add_argument("tgt", help="target image")
    p.add_argument("--points", required=True, help="source keypoints 'x,y;x,y;...' in source pixels")
    p.add_argument("--out", default="matches.png", help="the picture: both images, a line per match")
    _common(p)
    hp.set_defaults(func=cmd_hyperfeatures)


def _pairs(args, split):
    from .datasets import cub_pairs, spair_pairs

    if args.dataset == "spair":
        return spair_pairs(args.root, split, args.limit)
    pairs = cub_pairs(args.root, split="train" if split in ("train", "trn") else "test")
    return pairs[:args.limit]


def parse_points(text: str) -> np.ndarray:
    """--points 'x,y;x,y' -> (N, 2) floats; a UsageError naming the option otherwise."""
    from ..commands.common import UsageError

    try:
        pts = [[float(v) for v in p.split(",")] for p in text.split(";") if p.strip()]
    except ValueError:
        pts = None
    if not pts or any(len(p) != 2 for p in pts) or not np.isfinite(pts).all():
        raise UsageError(f"--points {text!r}: give source keypoints as 'x,y;x,y;...' in pixels")
    return np.array(pts)


def check_inputs(args) -> None:
    """Everything that can be checked before the model loads: images readable, points inside
    the source image, output folders writable. One-line UsageErrors naming the option."""
    from ..commands.common import UsageError, check_device, check_out_dir
    from ..images import ImageError, load_image

    check_device(args.device)
    paths = (args.images if args.hf_command == "extract" else [args.src, args.tgt] if args.hf_command == "match"
             else [])
    sizes = {}  # image -> (W, H), each read once
    for path in paths:
        try:
            sizes[path] = load_image(path).size
        except ImageError as exc:
            raise UsageError(str(exc)) from None
    if args.hf_command == "extract" and not args.cache:
        raise UsageError("extract needs --cache (the folder the features go to)")
    if args.cache:
        check_out_dir(Path(args.cache))
    if args.hf_command == "train":
        check_out_dir(Path(args.out))
    if args.hf_command == "match":
        args.points_xy = parse_points(args.points)
        w, h = sizes[args.src]
        outside = [p for p in args.points_xy if not (0 <= p[0] < w and 0 <= p[1] < h)]
        if outside:
            raise UsageError(f"--points {outside[0][0]:g},{outside[0][1]:g} lies outside the {w}x{h} source image")
        out = Path(args.out)
        if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
            raise UsageError(f"--out {out}: name a .png or .jpg file")
        if not out.parent.is_dir():
            raise UsageError(f"--out {out}: folder {out.parent} does not exist")
        if not os.access(out.parent, os.W_OK):
            raise UsageError(f"--out {out}: folder {out.parent} is not writable")
    for option in ("weights", "one_step_weights"):
        value = getattr(args, option, None)
        if value and not Path(value).is_file():
            raise UsageError(f"--{option.replace('_', '-')} {value} not found")
    if getattr(args, "json", None):
        out = Path(args.json)
        if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
            raise UsageError(f"--json {out}: folder {out.parent} does not exist or is not writable")


def _weights(args, one_step: bool, given):
    """--weights (or --one-step-weights) if given, else the network the model ships; None
    (an untrained network) said in one line."""
    import logging

    from . import shipped_weights

    if given or args.hf_command == "train":
        return given
    shipped = shipped_weights(args.model, one_step)
    kind = "one-step" if one_step else "all-steps"
    if shipped is None:
        logging.getLogger("emerdiff_fast").warning(
            "--model %s ships no trained %s aggregation network: using an untrained one (train one with "
            "`hyperfeatures train`, or give it)", args.model, kind)
    return shipped


def _hyperfeatures(args, pipe, one_step: bool, weights):
    from ..loading import expected_resolution
    from . import Hyperfeatures
    from .extract import ExtractConfig

    resolution = args.load_resolution or expected_resolution(pipe)
    cfg = (ExtractConfig.one_step(load_resolution=resolution) if one_step
           else ExtractConfig(load_resolution=resolution))
    return Hyperfeatures(pipe, cfg, weights=weights, cache_dir=args.cache,
                         projection_dim=getattr(args, "projection_dim", 384))


def _print_rows(rows) -> None:
    for r in rows:
        cats = ", ".join(f"{c} {v['pck_bbox']:.1f}" for c, v in r.categories.items())
        print(f"{r.name:>10}: PCK@0.1 (bbox) {r.pck_bbox:.2f}, PCK@0.1 (image) {r.pck_img:.2f} over {r.keypoints} "
              f"keypoints" + (f"; by category (bbox): {cats}" if cats else "") + (f"; {r.detail}" if r.detail else ""))


def cmd_hyperfeatures(args) -> int:
    import logging

    import torch

    from .. import load_pipeline
    from ..commands.common import DTYPES
    from ..output import atomic_write
    from .baselines import Row, baseline_rows
    from .correspondence import pair_images
    from .datasets import PairDataError
    from .train import TrainConfig

    if args.model is None:
        args.model = "mini"
        logging.getLogger("emerdiff_fast").info("no --model given: using the built-in mini model (generated shapes "
                                                "only; give --model for photographs)")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_inputs(args)
    pairs = val_pairs = None
    if args.hf_command in ("train", "eval"):  # the data set is read before the model loads
        pairs = _pairs(args, "trn" if args.hf_command == "train" else args.split)
        if args.hf_command == "train" or args.baselines:
            if args.dataset == "spair":
                try:
                    val_pairs = _pairs(args, "val")[:args.val_pairs]
                except PairDataError as exc:  # no val split: best-layer cannot be chosen honestly
                    if args.hf_command == "train":
                        raise
                    logging.getLogger("emerdiff_fast").warning("no validation pairs (%s): no best-layer row", exc)
            else:
                val_pairs = pairs[-args.val_pairs:] if args.hf_command == "train" else None
    pipe = load_pipeline(args.model, device=args.device, dtype=DTYPES[args.dtype], random_init=args.random_init,
                         progress=not args.quiet)
    hf = _hyperfeatures(args, pipe, args.one_step, _weights(args, args.one_step, args.weights))
    if args.hf_command == "extract":
        hf.cache.fill(args.images, args.batch_size, progress=not args.quiet)
        f = hf.cache.get(args.images[0])
        mb = sum(m.numel() * m.element_size() for m in f.maps) / 1e6
        print(f"features of {len(args.images)} images in {args.cache} ({mb:.1f} MB per image, "
              f"{len(f.maps)} layers x {len(f.save_timestep)} timesteps)")
        return 0
    # every image's features up front, batch_size per inversion (one at a time is several times slower)
    hf.cache.fill(pair_images((pairs or []) + (val_pairs or [])), args.batch_size, progress=not args.quiet)
    if args.hf_command == "train":
        res = hf.train(pairs, val_pairs, TrainConfig(steps=args.steps, val_every=args.val_every, lr=args.lr),
                       out_dir=args.out, progress=not args.quiet)
        print(json.dumps({"best_val_pck_img": res["best_pck_img"], "history": res["history"]}, indent=1))
        return 0
    if args.hf_command == "eval":
        if args.baselines:
            one = None
            if not args.one_step:
                weights = _weights(args, True, args.one_step_weights)
                one = _hyperfeatures(args, pipe, True, weights) if weights else None
                if one is not None:
                    one.cache.fill(pair_images(pairs), args.batch_size, progress=not args.quiet)
            rows = baseline_rows(hf, one, pairs, val_pairs, progress=not args.quiet)
            if args.one_step:
                rows[0].name = "one-step"
        else:
            rows = [Row.of("one-step" if args.one_step else "aggregated", hf.evaluate(pairs, progress=not args.quiet))]
        _print_rows(rows)
        if args.json:
            from dataclasses import asdict

            atomic_write(Path(args.json), json.dumps({"rows": [asdict(r) for r in rows]}, indent=1).encode())
            print(f"wrote {args.json}")
        return 0
    from . import draw_matches

    pts = args.points_xy
    found = hf.match(args.src, args.tgt, pts)
    draw_matches(args.src, args.tgt, pts, found).save(args.out)
    for (x1, y1), (x2, y2) in zip(pts, found):
        print(f"({x1:.0f}, {y1:.0f}) -> ({x2:.0f}, {y2:.0f})")
    print(f"wrote {Path(args.out)}")
    return 0
