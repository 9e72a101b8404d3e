"""Command line: `emerdiff-fast segment ...` (and `eval`, see evaluate.py).

Everything that can be checked before the model loads is checked first (inputs, --out,
the device), so a mistake costs a second, not a model load; each failure is one line on
stderr. Exit status: 0 all done, 1 some images failed (the others were written), 2 bad
usage or setup, 130 interrupted (finished outputs are complete: every file is written
atomically).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from . import __version__
from .output import DEFAULT_FORMATS

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
log = logging.getLogger("emerdiff_fast")


class UsageError(Exception):
    """A setup problem found before any work: printed as one line, exit 2."""


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def add_logging_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_const", const="debug", dest="log_level",
                   help="debug output, third-party warnings included (same as --log-level debug)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(log_level="info")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options every command shares: model, method, device, logging."""
    add_logging_args(p)
    p.add_argument("--model", default=None,
                   help="hub id (e.g. CompVis/stable-diffusion-v1-4, the authors' model), diffusers folder, "
                        ".safetensors/.ckpt file, 'mini' (the default: built in, trained on generated shapes "
                        "only) or 'tiny' (random weights, for tests)")
    p.add_argument("--random-init", action="store_true", help="--model is a config folder: seeded random weights")
    p.add_argument("--single-file-config", help="diffusers folder with the configs for a single-file checkpoint")
    p.add_argument("--variant", help="weights variant of a diffusers checkpoint, e.g. fp16")
    p.add_argument("--revision", help="hub revision: branch, tag or commit")
    p.add_argument("--local-files-only", action="store_true", help="never reach the hub: the local cache only")
    p.add_argument("--cache-dir", help="hub cache folder (default: the Hugging Face cache)")
    p.add_argument("--device", default=_default_device(), help="cpu, cuda, cuda:N, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                   help="model weights and activations; auto: bfloat16 on CUDA devices that support it, else float32")
    p.add_argument("--backend", choices=["fast", "reference", "naive"], default="fast",
                   help="fast and reference compute the same function; naive is the paper's SD baseline")
    # None: the model's recommended value (its emerdiff.json, e.g. the mini model's), else the paper's
    p.add_argument("--masks", type=int, default=None, help="number of segments K (default: the model's, else 30)")
    p.add_argument("--lam", type=float, default=None, help="modulation strength lambda (default: the model's, else 10)")
    p.add_argument("--seed", type=int, default=0, help="seeds the noise draws and k-means")
    p.add_argument("--resolution", type=int, default=None,
                   help="processing resolution, a multiple of 64 (default: the model's, else 512)")
    p.add_argument("--feature-samples", type=int, default=None,
                   help="noise draws averaged for the k-means features (default: the model's, else 8; "
                        "the authors' notebook: 100)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="fast backend: modulated runs per batch (default: all on CPU, by free memory on CUDA)")
    p.add_argument("--compile", action="store_true", help="fast backend: torch.compile the UNet")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode with --compile (default, reduce-overhead, max-autotune, ...)")
    p.add_argument("--channels-last", action="store_true", help="fast backend: NHWC convolutions")
    p.add_argument("--preset", default="exact",
                   help="speed preset: exact, grid25 (25-step grid), decode-fast (bf16 half-resolution "
                        "decode), fastest (both); all but exact are approximate: label agreement with exact 93%%, 64%%, "
                        "69%% on the mini model's held-out scenes (real SD unmeasured)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="largest image opened, in pixels (default: Pillow's decompression-bomb limit, 89.5 M)")


def check_device(name: str) -> torch.device:
    """The device must parse and exist here; checked before the model loads."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device (try cpu, cuda or cuda:0)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                             f"{'CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type == "mps":
        raise UsageError(f"--device {name}: MPS is not supported (the inversion computes in float64, which MPS "
                         "lacks); use cuda or cpu")
    elif device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UsageError(f"--device {name}: unsupported device type {device.type!r}")
    return device


def resolve_dtype(name: str, device) -> torch.dtype:
    """--dtype: a name, or auto = bfloat16 on a CUDA device that supports it, else float32."""
    if name != "auto":
        return DTYPES[name]
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def check_out_dir(out: Path) -> None:
    """--out must be (or become) a writable folder: created, probed with a file, cleaned."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".emerdiff-write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out {out} is not writable ({exc.strerror or exc})") from None


# command-line option -> EmerDiffConfig field, for the options a model may recommend
METHOD_OPTIONS = {"masks": "num_masks", "lam": "lam", "resolution": "resolution", "feature_samples": "feature_samples"}


def resolve_model_args(args) -> None:
    """Fill --model (default mini, said in one line) and every method option left unset
    from the model's recommended settings, else EmerDiffConfig's defaults, before any work:
    a run records (and eval's resume check compares) the values actually used."""
    from .config import EmerDiffConfig
    from .loading import recommended_settings

    if args.model is None:
        args.model = "mini"
        log.info("no --model given: using the built-in mini model (it knows generated shapes only; "
                 "for photographs give --model with a Stable Diffusion checkpoint)")
    recommended = {} if args.random_init else recommended_settings(args.model)
    for option, field in METHOD_OPTIONS.items():
        if getattr(args, option) is None:
            setattr(args, option, recommended.get(field, EmerDiffConfig.__dataclass_fields__[field].default))
    # settings beyond these options (e.g. t_modulate) come with the model, unless --random-init
    args.model_settings = {k: v for k, v in recommended.items() if k not in METHOD_OPTIONS.values()}


def build_segmenter(args, progress: bool = False):
    from . import EmerDiff, EmerDiffConfig, FastOptions, load_pipeline

    config = EmerDiffConfig(**{**getattr(args, "model_settings", {}), "num_masks": args.masks, "lam": args.lam,
                               "seed": args.seed, "resolution": args.resolution,
                               "feature_samples": args.feature_samples}).with_preset(args.preset)
    if args.backend != "fast" and (args.compile or args.channels_last or args.max_batch):
        raise UsageError("--compile, --channels-last and --max-batch apply to --backend fast only")
    dtype = resolve_dtype(args.dtype, args.device)
    log.info("loading %s on %s (%s)", args.model, args.device, str(dtype).removeprefix("torch."))
    hub = {k: getattr(args, k) for k in ("variant", "revision", "cache_dir") if getattr(args, k)}
    if args.local_files_only:
        hub["local_files_only"] = True
    pipe = load_pipeline(args.model, device=args.device, dtype=dtype, random_init=args.random_init,
                         seed=args.seed, config=args.single_file_config, **hub)
    options = FastOptions(channels_last=True) if args.channels_last else None
    return EmerDiff(pipe, config, backend=args.backend, compile=args.compile_mode if args.compile else False,
                    max_batch=args.max_batch, options=options, progress=progress)


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
    from .images import list_images

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
    from .output import FORMATS

    formats = tuple(dict.fromkeys(f.strip() for f in value.split(",") if f.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise argparse.ArgumentTypeError(f"unknown format(s) {unknown}; choose from {','.join(FORMATS)}")
    return formats


def cmd_segment(args) -> int:
    from tqdm import tqdm

    from . import distributed
    from .images import ImageError, load_image, set_max_pixels
    from .output import output_files, save_result
    from .prefetch import BackgroundWriter, StageClock, prefetched

    set_max_pixels(args.max_pixels)
    resolve_model_args(args)
    shard = distributed.from_env(args.device)  # under torchrun: this rank's share, its own GPU
    args.device = shard.device(args.device)
    out_dir = Path(args.out)
    with shard.checked(UsageError, raise_as=UsageError):  # every rank looks before any rank writes
        paths, names = list_inputs(args)
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
            except (ImageError, FloatingPointError, torch.cuda.OutOfMemoryError) as exc:
                failed += 1
                log.error("%s: %s", path, exc)
                continue
            writer.submit(clock.timed, "write", save_result, result, photo, out_dir, name,
                          difference_maps=args.save_difference_maps, formats=args.format)
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


def cmd_scenes(args) -> int:
    from .scenes import HELDOUT_SEEDS, TRAIN_SEEDS, write_dataset

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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the uninformative None/False of flags and unset options."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


class _TqdmHandler(logging.Handler):
    """Log lines that do not break progress bars."""

    def emit(self, record):
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(level: str) -> None:
    """Our messages at `level`; third-party libraries' (transformers' torchvision notes,
    diffusers' dtype notes, Python warnings) only at debug level."""
    verbose = level == "debug"
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        import warnings

        warnings.filterwarnings("ignore")
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s" if not verbose else "%(levelname)s %(name)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def make_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(prog="emerdiff-fast", description=__doc__.split("\n\n")[0], formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
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
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_args(p)
    p.set_defaults(func=cmd_segment)
    from .scenes import DEFAULT_SIZE, HELDOUT_SEEDS

    p = sub.add_parser("scenes", help="write a set of generated scenes with ground truth (the mini model's world)",
                       formatter_class=fmt)
    p.add_argument("--out", required=True, help="folder: scenes.jsonl, images/, instances/, classes/")
    p.add_argument("-n", type=positive_int, default=200, help="number of scenes")
    p.add_argument("--seed", type=int, default=HELDOUT_SEEDS.start,
                   help="first seed (scenes seed..seed+n-1); the default is the first held-out seed")
    p.add_argument("--size", type=positive_int, default=DEFAULT_SIZE, help="image side in pixels")
    p.add_argument("--overwrite", action="store_true", help="replace a scene set in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_logging_args(p)
    p.set_defaults(func=cmd_scenes)
    from . import evaluate
    from .hyperfeatures import cli as hyperfeatures_cli

    evaluate.add_parser(sub, fmt)
    hyperfeatures_cli.add_parser(sub, fmt)
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    setup_logging(args.log_level)
    from .config import ConfigError
    from .datasets import DatasetError
    from .loading import ModelLoadError

    try:
        return args.func(args)
    except (UsageError, ModelLoadError, ConfigError, DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
