"""Command line: `emerdiff-fast segment ...` (and `eval`, see evaluate.py)."""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="hub id (e.g. CompVis/stable-diffusion-v1-4, the authors' model), diffusers folder, "
                        ".safetensors/.ckpt file, or 'tiny'")
    p.add_argument("--random-init", action="store_true", help="--model is a config folder: seeded random weights")
    p.add_argument("--single-file-config", help="diffusers folder with the configs for a single-file checkpoint")
    p.add_argument("--device", default=_default_device())
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--backend", choices=["reference", "fast", "naive"], default=None,
                   help="default: fast on CUDA, reference otherwise")
    p.add_argument("--masks", type=int, default=30, help="number of segments K")
    p.add_argument("--lam", type=float, default=10.0, help="modulation strength lambda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=512, help="processing resolution, a multiple of 64")
    p.add_argument("--feature-samples", type=int, default=8,
                   help="noise draws averaged for the k-means features (default 8; the authors' notebook: 100)")
    p.add_argument("--max-batch", type=int, default=None, help="fast backend: modulated runs per batch")
    p.add_argument("--compile", default=None, nargs="?", const="default",
                   help="fast backend: torch.compile the UNet (optional mode)")
    p.add_argument("--channels-last", action="store_true", help="fast backend: NHWC convolutions")


def build_segmenter(args):
    from . import EmerDiff, EmerDiffConfig, FastOptions, load_pipeline

    config = EmerDiffConfig(num_masks=args.masks, lam=args.lam, seed=args.seed, resolution=args.resolution,
                            feature_samples=args.feature_samples)
    backend = args.backend or ("fast" if str(args.device).startswith("cuda") else "reference")
    pipe = load_pipeline(args.model, device=args.device, dtype=DTYPES[args.dtype], random_init=args.random_init,
                         seed=args.seed, config=args.single_file_config)
    options = FastOptions(channels_last=True) if args.channels_last else None
    return EmerDiff(pipe, config, backend=backend, compile=args.compile or False, max_batch=args.max_batch,
                    options=options)


def _output_names(paths: list[Path]) -> list[str]:
    """File stems, or full names where two inputs share a stem (a.png and a.jpg)."""
    stems = Counter(p.stem for p in paths)
    return [p.stem if stems[p.stem] == 1 else p.name for p in paths]


def cmd_segment(args) -> int:
    from tqdm import tqdm

    from .images import ImageError, list_images, load_image
    from .output import save_result

    paths = list_images(args.inputs)
    if not paths:
        print("error: no images found in " + " ".join(args.inputs), file=sys.stderr)
        return 2
    seg = build_segmenter(args)
    out_dir = Path(args.out)
    failed = 0
    for path, name in zip(tqdm(paths, desc="segment", unit="img", disable=args.quiet), _output_names(paths)):
        try:
            photo = load_image(path)
            result = seg(photo)
        except (ImageError, FloatingPointError) as exc:
            failed += 1
            tqdm.write(f"error: {exc}", file=sys.stderr)
            continue
        save_result(result, photo, out_dir, name, difference_maps=args.save_difference_maps)
    if failed:
        print(f"{failed} of {len(paths)} images failed", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None) -> int:
    from .config import ConfigError
    from .loading import ModelLoadError

    parser = argparse.ArgumentParser(prog="emerdiff-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("segment", help="segment images (files or folders)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--save-difference-maps", action="store_true", help="store the K difference maps in the npz")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(p)
    p.set_defaults(func=cmd_segment)
    try:
        from . import evaluate

        evaluate.add_parser(sub)
    except ImportError:
        pass
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ModelLoadError, ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
