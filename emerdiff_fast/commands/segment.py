"""`emerdiff-fast segment`: images or folders in, label maps and their companions out.

Everything that can be checked before the model loads is checked first (inputs, --out,
the device), so a mistake costs a second, not a model load."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from ..datasets import read_names
from ..output import DEFAULT_FORMATS
from .common import (UsageError, add_model_args, build_segmenter, build_vocabulary, check_device, check_out_dir,
                     positive_int, removed_if_unused, resolve_model_args)

log = logging.getLogger("emerdiff_fast")


def output_names(inputs: list[str], paths: list[Path]) -> list[str]:
    """Output names that cannot collide: each image's path relative to the deepest folder
    holding every input (a folder argument holds its own files), without the suffix, or
    with it where two images share a stem in one folder (a.png, a.jpg).
    `segment photos/` -> x; `segment a/ c/` -> a/x, c/x; `segment p.jpg` -> p."""
    roots = [Path(os.path.abspath(a)) if Path(a).is_dir() else Path(os.path.abspath(a)).parent for a in inputs]
    root = Path(os.path.commonpath(roots))
    rel = [Path(os.path.abspath(p)).relative_to(root) for p in paths]
    stems = Counter(r.with_suffix("") for r in rel)
    return [str(r.with_suffix("") if stems[r.with_suffix("")] == 1 else r) for r in rel]


def list_inputs(args) -> tuple[list[Path], list[str]]:
    """The images to segment and their output names; one-line errors for what is missing."""
    from ..images import list_images

    missing = [a for a in args.inputs if not Path(a).exists()]
    if missing:
        raise UsageError(f"input {missing[0]!r} not found" + (f" (and {len(missing) - 1} more)"
                                                            if len(missing) > 1 else ""))
    out = Path(os.path.abspath(args.out))
    # an --out inside an input folder: its files are results, never inputs
    paths = [p for p in list_images(args.inputs, recursive=args.recursive)
             if not Path(os.path.abspath(p)).is_relative_to(out)]
    if not paths:
        raise UsageError("no images found in " + " ".join(args.inputs)
                         + ("" if args.recursive else " (sub-folders need --recursive)"))
    return paths, output_names(args.inputs, paths)


def parse_formats(value: str) -> tuple[str, ...]:
    from ..output import FORMATS

    formats = tuple(dict.fromkeys(f.strip() for f in value.split(",") if f.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise argparse.ArgumentTypeError(f"unknown format(s) {unknown}; choose from {','.join(FORMATS)}")
    return formats


def cmd_segment(args) -> int:
    with removed_if_unused(Path(args.out)):  # a run that fails before any output leaves no folder
        return _segment(args)


def _segment(args) -> int:
    from tqdm import tqdm

    from .. import distributed
    from ..images import ImageError, load_image, set_max_pixels
    from ..output import output_files, save_result
    from ..prefetch import BackgroundWriter, StageClock, prefetched
    from ..vocabulary import combine_result, name_result

    set_max_pixels(args.max_pixels)
    resolve_model_args(args)
    shard = distributed.from_env(args.device)  # under torchrun: this rank's share, its own GPU
    args.device = shard.device(args.device)
    out_dir = Path(args.out)
    with shard.checked(UsageError, raise_as=UsageError):  # every rank looks before any rank writes
        paths, names = list_inputs(args)
        labels = read_labels(args)  # checked before the model loads
        check_class_map(args, len(paths))
        check_device(args.device)
        present = [[(out_dir / f).exists() for f in output_files(n, args.format)] for n in names]
        existing = [n for n, there in zip(names, present) if any(there)]
        if shard.is_main:
            check_out_dir(out_dir)
            if existing and not (args.overwrite or args.skip_existing):
                raise UsageError(f"{len(existing)} of {len(paths)} outputs already exist in {out_dir} (first: "
                                 f"{existing[0]}); use --skip-existing to resume or --overwrite to replace them")
        todo = [(p, n) for p, n, there in zip(paths, names, present) if not (args.skip_existing and all(there))]
        skipped = len(paths) - len(todo)
    todo = shard.take(todo)
    prefix = shard.log_prefix()
    if skipped and shard.is_main:
        log.info("skipping %d of %d images whose outputs exist (--skip-existing)", skipped, len(paths))
    if not todo:
        log.info("%snothing to do in %s", prefix, out_dir)
        distributed.finish(shard)
        return 0
    seg = build_segmenter(args, progress=not args.quiet)
    vocabulary = build_vocabulary(labels, seg)
    failed, finished, start = 0, 0, time.perf_counter()
    # reading ahead and writing behind on their own threads (prefetch.py): the segmenter
    # never waits on PIL, PNG encoding or the disk
    clock, writer = StageClock(), BackgroundWriter()
    images = prefetched(todo, lambda item: clock.timed("read", load_image, item[0]))
    try:
        for (path, name), loading in tqdm(images, total=len(todo), desc=f"{prefix}segment", unit="img",
                                          disable=args.quiet):
            try:
                photo = loading.result()
                result = clock.timed("segment", seg, photo)
                if vocabulary is not None:
                    result = clock.timed("segment", name_result, result, vocabulary, photo)
                elif args.class_map:
                    result = combine_result(result, *load_class_map(args, name))
            except (ImageError, FloatingPointError, torch.cuda.OutOfMemoryError, ClassMapError) as exc:
                failed += 1
                log.error("%s: %s", path, exc)
                continue
            writer.submit(clock.timed, "write", save_result, result, photo, out_dir, name,
                          difference_maps=args.save_difference_maps, formats=args.format,
                          overlay_scale=args.overlay_scale)
            finished += 1
        writer.close()
    except KeyboardInterrupt:
        writer.close()  # every submitted image is written completely before we stop
        print(f"{prefix}interrupted: {finished} of {len(todo)} images finished (complete) in {out_dir}; "
              "rerun with --skip-existing to resume", file=sys.stderr)
        return 130
    wall = time.perf_counter() - start
    log.info("%sstages: read %.1f s, segment %.1f s, write %.1f s (sum %.1f s) in %.1f s wall", prefix,
             *(clock.seconds.get(k, 0.0) for k in ("read", "segment", "write")), sum(clock.seconds.values()), wall)
    seconds = wall / max(finished + failed, 1)
    log.info("%sdone: %d segmented, %d skipped (existing), %d failed; %.1f s per image; outputs in %s",
             prefix, finished, skipped if shard.is_main else 0, failed, seconds, out_dir)
    if failed:
        print(f"{prefix}{failed} of {len(todo)} images failed", file=sys.stderr)
    distributed.finish(shard)
    return 1 if failed else 0


def read_labels(args) -> list[str] | None:
    """--labels or --labels-file (not both) -> the label list, checked before the model loads."""
    if args.labels and args.labels_file:
        raise UsageError("give --labels or --labels-file, not both")
    if (args.labels or args.labels_file) and args.class_map:
        raise UsageError("give --labels/--labels-file or --class-map, not both")
    if args.labels_file:
        path = Path(args.labels_file)
        if not path.is_file():
            raise UsageError(f"--labels-file {path} not found")
        labels = read_names(path)
    elif args.labels:
        labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    else:
        return None
    if not labels or len(set(labels)) < len(labels):
        raise UsageError(f"labels must be distinct and non-empty, got {labels}")
    return labels


class ClassMapError(ValueError):
    """An image's --class-map is missing or unreadable: that image fails, the others run."""


def check_class_map(args, images: int) -> None:
    """--class-map and --class-names exist; one file serves one image only."""
    if not args.class_map:
        if args.class_names:
            raise UsageError("--class-names goes with --class-map")
        return
    root = Path(args.class_map)
    if not root.exists():
        raise UsageError(f"--class-map {root} not found")
    if root.is_file() and images > 1:
        raise UsageError("--class-map is one file but there are several images: give a folder of NAME.npz/.png")
    if args.class_names and not Path(args.class_names).is_file():
        raise UsageError(f"--class-names {args.class_names} not found")


def load_class_map(args, name: str):
    """(class map, class names) of the image with output name `name`: --class-map itself,
    or FOLDER/NAME.npz or .png."""
    from ..vocabulary import find_class_map, read_class_map

    root = Path(args.class_map)
    found = root if root.is_file() else find_class_map(root, name)
    if found is None:
        raise ClassMapError(f"no class map {root / name}.npz or .png")
    try:
        return read_class_map(found, args.class_names)
    except (OSError, ValueError) as exc:
        raise ClassMapError(f"class map {found}: {exc}") from None


def add_parser(sub, fmt) -> None:
    p = sub.add_parser("segment", help="segment images (files or folders)", formatter_class=fmt)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--out", required=True,
                   help="output folder; outputs mirror the inputs' folders below their common folder")
    p.add_argument("--recursive", action="store_true", help="also take images in sub-folders of folder inputs")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    group.add_argument("--skip-existing", action="store_true", help="skip images whose outputs all exist (resume)")
    p.add_argument("--format", type=parse_formats, default=",".join(DEFAULT_FORMATS),
                   help="comma list of labels, overlay, npz, legend, rle (COCO RLE JSON), masks (one PNG per segment)")
    p.add_argument("--save-difference-maps", action="store_true", help="store the K difference maps in the npz")
    p.add_argument("--overlay-scale", type=positive_int, default=None,
                   help="integer upscale of the overlay picture (nearest neighbour; default: the smallest that "
                        "makes its short side at least 256 px, 1 for larger images; labels, npz, masks and rle "
                        "stay at the input size)")
    p.add_argument("--labels", help="name the segments: comma list of labels, e.g. 'cat,dog,grass,sky' (open "
                                    "vocabulary from the model's cross-attention; adds NAME.classes.png and names "
                                    "in the legend, overlay and npz)")
    p.add_argument("--labels-file", help="name the segments: a text file with one label per line")
    p.add_argument("--class-map", help="name the segments from another segmenter (e.g. MaskCLIP, TCL) by overlap, "
                                       "the paper's rule: an npz (class_map, class_names) or PNG of class ids; a "
                                       "folder of NAME.npz/NAME.png, one per output name, for several images")
    p.add_argument("--class-names", help="with a PNG --class-map: the class names, one per line")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_args(p)
    p.set_defaults(func=cmd_segment)
