"""What every subcommand shares (segment, eval, scenes, hyperfeatures): the model, method
and logging options, the checks made before a model loads, and the one-line usage error.
Imports nothing of the subcommands or of cli.py, so each of them can import it."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

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
                   help="processing resolution, a multiple of 64 (default: the model's emerdiff.json, else its own: "
                        "UNet sample size x VAE factor, 512 for SD 1.x/2.x-base, 1024 for SDXL)")
    p.add_argument("--keep-aspect", action="store_true",
                   help="keep the aspect ratio: about resolution^2 pixels, sides rounded up to the model's "
                        "multiple (64 for SD), as the authors' notebook without resize_to_512; default: squash "
                        "to resolution x resolution")
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
                        "decode), fastest (both); all but exact are approximate: label agreement with exact 90%%, 86%%, "
                        "81%% on the mini model's held-out scenes (real SD unmeasured)")
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


@contextlib.contextmanager
def removed_if_unused(out: Path, bookkeeping: tuple[str, ...] = ()):
    """Run a command; afterwards remove `out` if this run created it and wrote no output
    into it: nothing but empty folders and the `bookkeeping` files a run writes before its
    work (eval's run.json). A folder that existed before is never touched."""
    existed = out.exists()
    try:
        yield
    finally:
        if not existed and out.is_dir():
            left = [p for p in out.rglob("*") if not p.is_dir() and p.relative_to(out).as_posix() not in bookkeeping]
            if not left:
                shutil.rmtree(out, ignore_errors=True)


# command-line option -> EmerDiffConfig field, for the options a model may recommend
METHOD_OPTIONS = {"masks": "num_masks", "lam": "lam", "resolution": "resolution", "feature_samples": "feature_samples"}
# EmerDiffConfig field -> the option a user typed, for messages in the user's words
FIELD_OPTIONS = {field: "--" + option.replace("_", "-") for option, field in METHOD_OPTIONS.items()}


def in_option_words(message: str) -> str:
    """A ConfigError's message with field names replaced by the CLI options that set them
    ("num_masks must be at least 2" -> "--masks must be at least 2")."""
    for field, option in FIELD_OPTIONS.items():
        message = re.sub(rf"\b{field}=", option + " ", message)
        message = re.sub(rf"(?<![-\w]){field}\b", option, message)
    return message.replace("unknown preset", "--preset: unknown preset")


def model_configs(args) -> tuple[dict, dict] | None:
    """The UNet and VAE configs of --model read without its weights (a local folder, the
    mini model, a skeleton, or a single file's --single-file-config), else None (hub ids:
    their configs come with the weights)."""
    from ..loading import model_folder, resolve_skeleton

    folder = model_folder(args.single_file_config or args.model)
    if folder is None and isinstance(args.model, str):
        folder = resolve_skeleton(args.model)
    if folder is None or not (folder / "unet" / "config.json").is_file():
        return None
    try:
        return tuple(json.loads((folder / part / "config.json").read_text()) for part in ("unet", "vae"))
    except (OSError, ValueError):
        return None  # the loader reports an unreadable config with its own message


def method_config(args):
    """The EmerDiffConfig the options describe, checked before the model loads; errors name
    the options as typed (the Python API keeps the field names). Where the model's configs
    can be read without weights, K is checked against its feature grid here too."""
    from ..config import ConfigError, EmerDiffConfig, layer_grid

    try:
        config = EmerDiffConfig(**{**getattr(args, "model_settings", {}), "num_masks": args.masks,
                                   "lam": args.lam, "seed": args.seed, "resolution": args.resolution,
                                   "feature_samples": args.feature_samples,
                                   "keep_aspect": getattr(args, "keep_aspect", False)}).with_preset(args.preset)
        configs = model_configs(args)
        if configs is not None:  # the model's own resolution and layers, from a weightless UNet
            from ..memory import meta_models

            config = config.for_model(meta_models(configs[0], configs[1], torch.float32)[0], configs[1])
            size = (config.resolution, config.resolution)
            config.check_grid(layer_grid(*configs, size, config.feature_layer))
    except ConfigError as exc:
        raise UsageError(in_option_words(str(exc))) from None
    return config


def resolve_model_args(args) -> None:
    """Fill --model (default mini, said in one line) and every method option left unset
    from the model's recommended settings, else EmerDiffConfig's defaults, before any work:
    a run records (and eval's resume check compares) the values actually used."""
    from ..config import EmerDiffConfig
    from ..loading import recommended_settings

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
    args.config = method_config(args)
    args.resolution = args.config.resolution  # the model's own where its configs could be read


def build_segmenter(args, progress: bool = False):
    from .. import EmerDiff, FastOptions, load_pipeline

    config = args.config  # resolve_model_args always sets it, before the model loads
    if args.backend != "fast" and (args.compile or args.channels_last or args.max_batch):
        raise UsageError("--compile, --channels-last and --max-batch apply to --backend fast only")
    dtype = resolve_dtype(args.dtype, args.device)
    log.info("loading %s on %s (%s)", args.model, args.device, str(dtype).removeprefix("torch."))
    hub = {k: getattr(args, k) for k in ("variant", "revision", "cache_dir") if getattr(args, k)}
    if args.local_files_only:
        hub["local_files_only"] = True
    pipe = load_pipeline(args.model, device=args.device, dtype=dtype, random_init=args.random_init,
                         seed=args.seed, config=args.single_file_config, progress=not getattr(args, "quiet", False),
                         **hub)
    options = FastOptions(channels_last=True) if args.channels_last else None
    return EmerDiff(pipe, config, backend=args.backend, compile=args.compile_mode if args.compile else False,
                    max_batch=args.max_batch, options=options, progress=progress)


def build_vocabulary(labels: list[str] | None, seg, config=None):
    """The label heat maps' Vocabulary at the segmenter's processing size (None: no labels)."""
    from ..vocabulary import Vocabulary

    if labels is None:
        return None
    if "labels" in seg.caveats:  # measured, shipped with the model: said once, when names are asked for
        log.warning("caveat: %s", seg.caveats["labels"])
    return Vocabulary(seg.pipe, labels, config, resolution=seg.config.resolution, keep_aspect=seg.config.keep_aspect)
