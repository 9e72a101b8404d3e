"""Getting a Stable Diffusion pipeline: hub id, diffusers folder, single file, object,
random-init skeleton, the built-in trained `mini` model or the built-in random `tiny` one.

A diffusers folder may carry `emerdiff.json` beside model_index.json: the EmerDiff settings
its model is meant to run with (the mini model's resolution and K), used wherever the user
sets none (`recommended_settings`)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

SKELETON_ENV = "EMERDIFF_SKELETONS"  # folder holding sd15/, sd21-base/, sdxl-base/ config skeletons
RECOMMENDED_FILE = "emerdiff.json"


class ModelLoadError(RuntimeError):
    """Weights could not be found or loaded; the message says what to provide instead."""


# Pipelines EmerDiff runs on (model_index.json's _class_name): UNet text-to-image models of
# the SD lineage. conditioning.py holds what differs between them.
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def pipeline_class(name: str = "StableDiffusionPipeline", source: str = ""):
    """The diffusers class named in a model_index.json, if EmerDiff supports it."""
    import diffusers

    if name not in SUPPORTED_PIPELINES:
        where = f"{source!r} is a {name}" if source else f"{name} is not supported"
        raise ModelLoadError(f"{where}; EmerDiff runs on {' and '.join(SUPPORTED_PIPELINES)} checkpoints "
                             "(a UNet denoiser with CLIP text encoders)")
    return getattr(diffusers, name)


def _class_name(folder: Path) -> str:
    try:
        return json.loads((folder / "model_index.json").read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{str(folder / 'model_index.json')!r} is unreadable or names no pipeline class "
                             f"({type(exc).__name__})") from None


def _single_file_class(path: Path) -> str:
    """A single checkpoint's family from its tensor names (the header only): SDXL's carry
    a second text encoder under conditioner.embedders.1; anything else loads as SD."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if any(k.startswith("conditioner.embedders.1.") for k in f.keys()):
                return "StableDiffusionXLPipeline"
    return "StableDiffusionPipeline"


def _pipeline_kwargs(cls) -> dict:
    """SD's pipeline takes a safety checker, which EmerDiff never runs; SDXL's has none."""
    if cls.__name__ == "StableDiffusionPipeline":
        return {"safety_checker": None, "requires_safety_checker": False}
    return {}


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
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,  # 512 px, as SD
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
    return pipeline_class()(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=DDPMScheduler(**SD_SCHEDULER), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False)


def random_init_pipeline(config_dir: str | os.PathLike, seed: int = 0):
    """Full-size models built from a diffusers config folder (unet/, vae/, text_encoder/,
    tokenizer/, scheduler/; SDXL's text_encoder_2/ and tokenizer_2/ too) with seeded random
    weights: identical compute, no weight files. The pipeline class is model_index.json's
    (StableDiffusionPipeline without one)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = Path(config_dir)
    name = _class_name(root) if (root / "model_index.json").exists() else "StableDiffusionPipeline"
    cls = pipeline_class(name, str(root))
    second = name == "StableDiffusionXLPipeline"
    needed = ["unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer"]
    needed += ["text_encoder_2/config.json", "tokenizer_2"] if second else []
    missing = [p for p in needed if not (root / p).exists()]
    if missing:
        raise ModelLoadError(f"{str(root)!r} is not a diffusers config folder: missing {', '.join(missing)}")
    parts = {}
    with _seeded(seed):
        parts["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        parts["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))
        if second:
            parts["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(root / "text_encoder_2"))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):  # transformers builds a config saying
        if name in parts:  # float16 (SDXL's text_encoder_2) half in fp16, half in fp32: one dtype here
            parts[name].to(torch.float32)
    parts["tokenizer"] = CLIPTokenizer.from_pretrained(root / "tokenizer")
    if second:
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(root / "tokenizer_2")
    sched_dir = root / "scheduler"
    parts["scheduler"] = (DDPMScheduler.from_config(DDPMScheduler.load_config(sched_dir)) if sched_dir.exists()
                          else DDPMScheduler(**SD_SCHEDULER))
    extra = {"feature_extractor": None, **_pipeline_kwargs(cls)}
    if second:
        index = json.loads((root / "model_index.json").read_text())
        extra["force_zeros_for_empty_prompt"] = index.get("force_zeros_for_empty_prompt", True)
    return cls(**parts, **extra)


def resolve_skeleton(name: str) -> Path | None:
    """`sd15` / `sd21-base` / `sdxl-base` -> a skeleton folder under $EMERDIFF_SKELETONS, or None."""
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


def expected_resolution(pipe, recommended: dict | None = None) -> int:
    """The resolution a model is meant for: its emerdiff.json's (`recommended`, when the
    caller has read it already), else the UNet's sample size times the VAE's factor (512
    for SD 1.x/2.x-base, 1024 for SDXL)."""
    from .config import model_resolution

    recommended = recommended_settings(pipe) if recommended is None else recommended
    return int(recommended.get("resolution") or model_resolution(pipe.unet.config, pipe.vae.config))


def model_caveats(source) -> dict[str, str]:
    """Measured caveats a model's emerdiff.json carries, per feature (e.g. "labels": how
    well it names segments, with the number and where it was measured); {} if none."""
    caveats = _recommended_file(source).get(CAVEATS_KEY, {})
    return {str(k): str(v) for k, v in caveats.items()}


@contextlib.contextmanager
def _loading_bars(shown: bool):
    """diffusers' "Loading pipeline components" and transformers' "Loading weights" bars,
    hidden for the duration when not `shown` (the CLI's --quiet)."""
    if shown:
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


def load_pipeline(source, *, device=None, dtype=None, random_init: bool = False, seed: int = 0,
                  config: str | os.PathLike | None = None, progress: bool = True, **from_pretrained_kwargs):
    """Load a Stable Diffusion pipeline for EmerDiff: StableDiffusionPipeline (SD 1.x, 2.x)
    or StableDiffusionXLPipeline (SDXL base and its distillations), the class that the
    checkpoint's model_index.json names.

    source: a pipeline object (used as is, moved only if device/dtype are given), "mini"
    (the built-in model trained on generated shapes), "tiny" (random weights), a local
    diffusers folder, a hub id, or a single .safetensors/.ckpt file (`config` names
    a diffusers folder for its configs, which avoids fetching them from the hub).
    random_init=True builds full-size models from the config folder `source` with seeded
    random weights. device defaults to "cpu" and dtype to float32 for everything but objects.
    from_pretrained_kwargs (variant, revision, local_files_only, cache_dir, token, ...) go
    to diffusers' from_pretrained / from_single_file as they are; progress=False hides their
    loading bars. A float16 VAE whose config says force_upcast (SDXL's) is kept in float32,
    objects included: it overflows in float16. What EmerDiff cannot run is refused in one
    line (check_pipeline).
    """
    if hasattr(source, "unet") and hasattr(source, "vae"):
        pipe = source
        if device is not None or dtype is not None:
            pipe = pipe.to(device=device, dtype=dtype)
        return check_pipeline(upcast_vae(pipe))
    device = device or "cpu"
    dtype = dtype or torch.float32
    source_str = os.fspath(source)
    if source_str == "tiny":
        pipe = tiny_pipeline(seed)
    elif source_str == "mini" and not random_init:
        with _loading_bars(progress):
            pipe = _load_mini(dtype)
    elif random_init:  # "mini" too: its architecture with seeded random weights (an untrained baseline)
        path = model_folder(source_str) if source_str == "mini" else (
            Path(source_str) if Path(source_str).exists() else resolve_skeleton(source_str))
        if path is None:
            raise ModelLoadError(
                f"random_init needs a diffusers config folder; {source_str!r} does not exist "
                f"(give a path, or a name under ${SKELETON_ENV})")
        pipe = random_init_pipeline(path, seed)
    else:
        with _loading_bars(progress):
            pipe = _load_weights(source_str, dtype, config, from_pretrained_kwargs)
    pipe.set_progress_bar_config(disable=True)
    if pipe.unet.dtype != dtype:
        pipe = pipe.to(dtype=dtype)
    return check_pipeline(upcast_vae(pipe.to(device=device)), source_str)


def says_force_upcast(vae_config) -> bool:
    """Whether a VAE's own config file sets force_upcast (SDXL's does). AutoencoderKL fills
    in True where a config does not name it (SD 1.x/2.x's), which says nothing."""
    return bool(vae_config.get("force_upcast", False)) and "force_upcast" not in vae_config.get("_use_default_values", ())


def vae_dtype(vae, wanted: torch.dtype | None = None) -> torch.dtype:
    """The dtype a VAE runs in when `wanted` (default: its own): float32 instead of float16
    where its config says force_upcast (SDXL's VAE overflows in float16: NaN maps)."""
    wanted = wanted or vae.dtype
    return torch.float32 if wanted == torch.float16 and says_force_upcast(vae.config) else wanted


def upcast_vae(pipe):
    """The pipeline with its VAE moved, in place, to vae_dtype (the VAE runs in its own dtype
    everywhere: segmenter, hyperfeatures, vocabulary); said when it moves one."""
    target = vae_dtype(pipe.vae)
    if target != pipe.vae.dtype:
        logging.getLogger("emerdiff_fast").warning(
            "this pipeline's VAE config says force_upcast (it overflows in float16): moved its VAE to float32")
        pipe.vae.to(target)
    return pipe


def check_pipeline(pipe, source: str = ""):
    """Refuse, in one line and before any work, a pipeline EmerDiff would run wrongly: an EDM
    noise schedule, per-channel latent statistics in the VAE, or a UNet whose added
    conditioning is not its pipeline class's (a single SDXL .ckpt read as SD)."""
    from .conditioning import takes_added_conditions
    from .sampling import is_edm

    where = repr(source) if source else "this pipeline"
    if is_edm(pipe.scheduler.config):
        raise ModelLoadError(f"{where} uses {type(pipe.scheduler).__name__}, an EDM noise schedule (as Playground "
                             "v2.5 and CosXL do); EmerDiff's inversion needs the DDPM schedule (betas) of SD and SDXL")
    if pipe.vae.config.get("latents_mean") is not None or pipe.vae.config.get("latents_std") is not None:
        raise ModelLoadError(f"{where}'s VAE normalises latents per channel (latents_mean/latents_std, as "
                             "Playground v2.5's does); EmerDiff scales latents by scaling_factor only")
    xl_unet, xl_pipe = takes_added_conditions(pipe.unet.config), hasattr(pipe, "text_encoder_2")
    if xl_unet != xl_pipe:
        raise ModelLoadError(
            f"{where} loaded as {type(pipe).__name__}, but its UNet's addition_embed_type is "
            f"{pipe.unet.config.get('addition_embed_type')!r} ({'SDXL' if xl_unet else 'SD'}'s); a single .ckpt file "
            "is read as SD: give `config` (--single-file-config) a diffusers folder of its family")
    return pipe


def _load_mini(dtype):
    from .mini import MODEL_DIR

    if not (MODEL_DIR / "model_index.json").exists():
        raise ModelLoadError(f"the mini model is not installed (no {MODEL_DIR / 'model_index.json'}); "
                             "train it with `python -m emerdiff_fast.mini train`, or use --model tiny")
    return pipeline_class().from_pretrained(MODEL_DIR, dtype=dtype, safety_checker=None,
                                            requires_safety_checker=False, local_files_only=True)


def _hub_class_name(source: str, kwargs: dict) -> str:
    """model_index.json's class of a hub id (a small file, fetched or cached before the weights);
    where it cannot be read, SD's, and from_pretrained reports what is wrong in its own words."""
    from diffusers import DiffusionPipeline

    keys = ("revision", "cache_dir", "token", "local_files_only")
    try:
        return DiffusionPipeline.load_config(source, **{k: v for k, v in kwargs.items() if k in keys})["_class_name"]
    except Exception:  # offline, unknown id, no model_index.json: the load below says which
        return "StableDiffusionPipeline"


def _load_weights(source: str, dtype, config, kwargs: dict):
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
            index = Path(config) / "model_index.json" if config else None
            name = _class_name(index.parent) if index and index.exists() else _single_file_class(path)
            cls = pipeline_class(name, source)
            return cls.from_single_file(source, dtype=dtype, **_pipeline_kwargs(cls), **kwargs)
        if path.is_dir() and not (path / "model_index.json").exists():
            raise ModelLoadError(f"{source!r} is a folder but not a diffusers pipeline (no model_index.json); {hint}")
        cls = pipeline_class(_class_name(path) if path.is_dir() else _hub_class_name(source, kwargs), source)
        return cls.from_pretrained(source, dtype=dtype, **_pipeline_kwargs(cls), **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # hub/network/format errors: one line, no deep stack trace
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load weights from {source!r} ({type(exc).__name__}: {first}); {hint}") from None
