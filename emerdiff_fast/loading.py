"""Getting a Stable Diffusion pipeline: hub id, diffusers folder, single file, object,
random-init skeleton, the built-in trained `mini` model or the built-in random `tiny` one.

A diffusers folder may carry `emerdiff.json` beside model_index.json: the EmerDiff settings
its model is meant to run with (the mini model's resolution and K), used wherever the user
sets none (`recommended_settings`)."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch

SKELETON_ENV = "EMERDIFF_SKELETONS"  # folder holding sd15/ and sd21-base/ config skeletons
RECOMMENDED_FILE = "emerdiff.json"


class ModelLoadError(RuntimeError):
    """Weights could not be found or loaded; the message says what to provide instead."""


def _pipeline_class():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed module construction without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _tiny_tokenizer():
    """A CLIP tokenizer over a character vocabulary, written to a temporary folder: the
    tiny model only ever encodes the empty prompt, and no tokenizer files may be downloaded."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)


SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    steps_offset=1, clip_sample=False)


def tiny_pipeline(seed: int = 0):
    """SD's block structure (4 levels, 2 layers per block, cross-attention in the first three
    down and last three up blocks) at tiny width, seeded random weights. Its segmentations
    are meaningless; it exists for tests, CI and the offline demo."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _tiny_tokenizer()
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 32, 64, 64), norm_num_groups=8, attention_head_dim=2,
            cross_attention_dim=32, use_linear_projection=True,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=(8, 16, 16, 16), sample_size=128,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
            bos_token_id=0, eos_token_id=1, pad_token_id=1))
    return _pipeline_class()(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                             scheduler=DDPMScheduler(**SD_SCHEDULER), safety_checker=None,
                             feature_extractor=None, requires_safety_checker=False)


def random_init_pipeline(config_dir: str | os.PathLike, seed: int = 0):
    """Full-size models built from a diffusers config folder (unet/, vae/, text_encoder/,
    tokenizer/, scheduler/) with seeded random weights: identical compute, no weight files."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = Path(config_dir)
    missing = [p for p in ("unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer")
               if not (root / p).exists()]
    if missing:
        raise ModelLoadError(f"{str(root)!r} is not a diffusers config folder: missing {', '.join(missing)}")
    with _seeded(seed):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    sched_dir = root / "scheduler"
    scheduler = (DDPMScheduler.from_config(DDPMScheduler.load_config(sched_dir)) if sched_dir.exists()
                 else DDPMScheduler(**SD_SCHEDULER))
    return _pipeline_class()(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                             requires_safety_checker=False)


def resolve_skeleton(name: str) -> Path | None:
    """`sd15` / `sd21-base` -> a skeleton folder under $EMERDIFF_SKELETONS, or None."""
    root = os.environ.get(SKELETON_ENV)
    if root and (Path(root) / name / "unet" / "config.json").exists():
        return Path(root) / name
    return None


def model_folder(source) -> Path | None:
    """The local folder a source loads from (None for hub ids, files and random models)."""
    if hasattr(source, "unet"):
        source = getattr(source, "name_or_path", None) or ""
    source = os.fspath(source)
    if source == "mini":
        from .mini import MODEL_DIR

        return MODEL_DIR
    return Path(source) if source and Path(source).is_dir() else None


CAVEATS_KEY = "caveats"  # emerdiff.json: measured caveats per feature, beside the settings


def _recommended_file(source) -> dict:
    folder = model_folder(source)
    if folder is None or not (folder / RECOMMENDED_FILE).exists():
        return {}
    return json.loads((folder / RECOMMENDED_FILE).read_text())


def recommended_settings(source) -> dict:
    """The EmerDiffConfig fields that a model folder's emerdiff.json recommends ({} if it
    has none): a pipeline, "mini", or a local folder."""
    from .config import ConfigError, EmerDiffConfig

    settings = {k: v for k, v in _recommended_file(source).items() if k != CAVEATS_KEY}
    unknown = set(settings) - set(EmerDiffConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"{model_folder(source) / RECOMMENDED_FILE} names unknown settings: "
                          f"{', '.join(sorted(unknown))}")
    return settings


def model_caveats(source) -> dict[str, str]:
    """Measured caveats a model's emerdiff.json carries, per feature (e.g. "labels": how
    well it names segments, with the number and where it was measured); {} if none."""
    caveats = _recommended_file(source).get(CAVEATS_KEY, {})
    return {str(k): str(v) for k, v in caveats.items()}


def load_pipeline(source, *, device=None, dtype=None, random_init: bool = False, seed: int = 0,
                  config: str | os.PathLike | None = None, **from_pretrained_kwargs):
    """Load a StableDiffusionPipeline for EmerDiff.

    source: a pipeline object (used as is, moved only if device/dtype are given), "mini"
    (the built-in model trained on generated shapes), "tiny" (random weights), a local
    diffusers folder, a hub id, or a single .safetensors/.ckpt file (`config` names
    a diffusers folder for its configs, which avoids fetching them from the hub).
    random_init=True builds full-size models from the config folder `source` with seeded
    random weights. device defaults to "cpu" and dtype to float32 for everything but objects.
    from_pretrained_kwargs (variant, revision, local_files_only, cache_dir, token, ...) go
    to diffusers' from_pretrained / from_single_file as they are.
    """
    pipe_cls = _pipeline_class()
    if isinstance(source, pipe_cls) or hasattr(source, "unet") and hasattr(source, "vae"):
        pipe = source
        if device is not None or dtype is not None:
            pipe = pipe.to(device=device, dtype=dtype)
        return pipe
    device = device or "cpu"
    dtype = dtype or torch.float32
    source_str = os.fspath(source)
    if source_str == "tiny":
        pipe = tiny_pipeline(seed)
    elif source_str == "mini" and not random_init:
        pipe = _load_mini(pipe_cls, dtype)
    elif random_init:  # "mini" too: its architecture with seeded random weights (an untrained baseline)
        path = model_folder(source_str) if source_str == "mini" else (
            Path(source_str) if Path(source_str).exists() else resolve_skeleton(source_str))
        if path is None:
            raise ModelLoadError(
                f"random_init needs a diffusers config folder; {source_str!r} does not exist "
                f"(give a path, or a name under ${SKELETON_ENV})")
        pipe = random_init_pipeline(path, seed)
    else:
        pipe = _load_weights(pipe_cls, source_str, dtype, config, from_pretrained_kwargs)
    pipe.set_progress_bar_config(disable=True)
    if pipe.unet.dtype != dtype:
        pipe = pipe.to(dtype=dtype)
    return pipe.to(device=device)


def _load_mini(pipe_cls, dtype):
    from .mini import MODEL_DIR

    if not (MODEL_DIR / "model_index.json").exists():
        raise ModelLoadError(f"the mini model is not installed (no {MODEL_DIR / 'model_index.json'}); "
                             "train it with `python -m emerdiff_fast.mini train`, or use --model tiny")
    return pipe_cls.from_pretrained(MODEL_DIR, torch_dtype=dtype, safety_checker=None,
                                    requires_safety_checker=False, local_files_only=True)


def _load_weights(pipe_cls, source: str, dtype, config, kwargs: dict):
    path = Path(source)
    is_file_like = path.suffix in (".safetensors", ".ckpt")
    hint = ("give a local diffusers folder, a .safetensors/.ckpt file, a cached hub id, "
            "or --model tiny for the built-in random model")
    if is_file_like or path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1:
        if not path.exists():
            raise ModelLoadError(f"model {source!r} not found: no such file or folder; {hint}")
    try:
        if path.is_file():
            if not is_file_like:
                raise ModelLoadError(f"model file {source!r} must end in .safetensors or .ckpt")
            if config:
                kwargs = {"config": os.fspath(config), "local_files_only": True, **kwargs}
            return pipe_cls.from_single_file(source, torch_dtype=dtype, safety_checker=None,
                                             requires_safety_checker=False, **kwargs)
        if path.is_dir() and not (path / "model_index.json").exists():
            raise ModelLoadError(f"{source!r} is a folder but not a diffusers pipeline (no model_index.json); {hint}")
        return pipe_cls.from_pretrained(source, torch_dtype=dtype, safety_checker=None,
                                        requires_safety_checker=False, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # hub/network/format errors: one line, no deep stack trace
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load weights from {source!r} ({type(exc).__name__}: {first}); {hint}") from None
