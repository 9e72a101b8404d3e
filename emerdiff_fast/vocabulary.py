"""Names for EmerDiff's segments (open vocabulary), from Stable Diffusion's own cross-attention.

SD's cross-attention probabilities for a word's tokens form a coarse map of where the word
is (DAAM, Tang et al. 2023). `Vocabulary` runs the UNet once on an image's latent, noised
to a small timestep, with a prompt that holds the labels, and reads each label's token
probabilities at the chosen cross-attention layers: one heat map per label. EmerDiff's
pixel-accurate segments then take the label whose normalised heat is highest over their
pixels (`name_segments`). `combine` is the paper's other route (Table 3): each segment takes
the class of an external open-vocabulary segmenter's map that covers most of its pixels.

Choices (all in VocabularyConfig, documented there): the prompt template, the timestep,
the layers, the noise draws, the per-label normalisation, multi-token labels. Labels that
do not fit one prompt of the text encoder are split over several (prompt_groups), run in
the same UNet call.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import conditioning
from .attention import installed, plain_attention
from .config import ConfigError, layer_grid, layer_scale, size_multiple, vae_scale_factor
from .datasets import read_names
from .images import load_image, processing_size, to_model_input
from .loading import expected_resolution, load_pipeline
from .result import SegmentationResult
from .sampling import alphas_cumprod, noise_to

log = logging.getLogger("emerdiff_fast")


@dataclass(frozen=True)
class VocabularyConfig:
    """How label heat maps are made and segments named."""

    template: str = "a {}"         # each label's phrase; the prompt joins them: "a cat and a dog and a sky"
    joiner: str = " and "
    timestep: int = 100            # (choice) small: the latent is barely noised, the words' maps are sharp
    noise_draws: int = 4           # (choice) noise draws averaged, batched into one UNet call
    draw_batch: int | None = None  # draws per UNet call (None: all at once); a call holds every prompt
                                   # of the labels (prompt_groups), so its batch is draws x prompts
    scales: tuple[int, ...] = (16, 32)  # image pixels per layer position: SD's 32x32 and 16x16 at 512 px;
                                   # a model without such layers uses all its cross-attention outside the mid block
    token_reduce: str = "mean"     # a multi-token label: "mean" or "sum" of its tokens' probabilities
    normalize: str = "max"         # "max": each label's map divided by its maximum; "none"
    threshold: float = 0.2         # (choice) a segment whose best mean normalised heat is lower takes the fallback
    fallback: str = "background"
    seed: int = 0

    def __post_init__(self):
        if "{}" not in self.template:
            raise ConfigError(f"template must hold '{{}}' where the label goes, got {self.template!r}")
        if not 0 <= self.timestep < 1000:
            raise ConfigError(f"timestep must lie in [0, 1000), got {self.timestep}")
        if self.noise_draws < 1 or (self.draw_batch is not None and self.draw_batch < 1):
            raise ConfigError("noise_draws and draw_batch must be at least 1")
        if self.token_reduce not in ("mean", "sum") or self.normalize not in ("max", "none"):
            raise ConfigError("token_reduce must be mean or sum, normalize max or none")


def _piece_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text.strip(), add_special_tokens=False).input_ids if text.strip() else []


def _prompt_ids(tokenizer, labels: list[str], template: str, joiner: str, warn: bool = False):
    """Unpadded token ids (BOS, phrases, EOS) and each label's token positions. Built piece
    by piece, so the positions are exact (CLIP's BPE splits at spaces)."""
    before, _, after = template.partition("{}")
    out, spans = [tokenizer.bos_token_id], []
    for i, label in enumerate(labels):
        if i:
            out += _piece_ids(tokenizer, joiner)
        out += _piece_ids(tokenizer, before)
        label_ids = _piece_ids(tokenizer, label)
        if warn and (not label_ids or tokenizer.unk_token_id in label_ids):
            log.warning("label %r is unknown to this model's tokenizer: its heat map means little", label)
        spans.append(list(range(len(out), len(out) + len(label_ids))))
        out += label_ids + _piece_ids(tokenizer, after)
    return out + [tokenizer.eos_token_id], spans


def prompt_tokens(tokenizer, labels: list[str], template: str, joiner: str) -> tuple[list[int], list[list[int]]]:
    """One prompt holding `labels`: its token ids padded to the text encoder's length, and
    each label's token positions."""
    out, spans = _prompt_ids(tokenizer, labels, template, joiner, warn=True)
    limit = tokenizer.model_max_length
    if len(out) > limit:
        raise ConfigError(f"{len(labels)} labels make a prompt of {len(out)} tokens; this text encoder takes "
                          f"{limit}: use fewer or shorter labels")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return out + [pad] * (limit - len(out)), spans


def prompt_groups(tokenizer, labels: list[str], template: str, joiner: str) -> list[list[int]]:
    """Label indices split, in order, into as few prompts as fit the text encoder (greedy):
    with SD 1.5's tokenizer and the default template, ADE20K's 150 names take 7 prompts of
    77 tokens, COCO-Stuff's 171 take 8, PASCAL-Context's 59 take 3 and its 459 take 21."""
    # a prompt is built piece by piece (_prompt_ids), so its length is the sum of its pieces'
    before, _, after = template.partition("{}")
    phrase = len(_piece_ids(tokenizer, before)) + len(_piece_ids(tokenizer, after))
    join = len(_piece_ids(tokenizer, joiner))
    groups, current, length = [], [], 2  # BOS and EOS
    for i, label in enumerate(labels):
        extra = phrase + len(_piece_ids(tokenizer, label))
        if current and length + join + extra > tokenizer.model_max_length:
            groups.append(current)
            current, length = [], 2
        length += extra + (join if current else 0)
        current.append(i)
    return groups + [current]


def heat_layers(unet, vae_config, scales: tuple[int, ...]) -> list[str]:
    """Cross-attention layers at `scales` image pixels per position; if none, every
    cross-attention layer outside the mid block (the mini model: its 8x8 layers at 64 px)."""
    names = [k.removesuffix(".processor") for k in unet.attn_processors if k.endswith("attn2.processor")]
    f = vae_scale_factor(vae_config)
    chosen = [n for n in names if f * layer_scale(unet.config, n) in scales]
    return chosen or [n for n in names if not n.startswith("mid_block")] or names


class _Recorder:
    """A layer left as it is, keeping its head-averaged probabilities (B, N, L)."""

    def __init__(self, name: str, store: dict):
        self.name, self.store = name, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        out, probs = plain_attention(attn, hidden_states, encoder_hidden_states, attention_mask)
        self.store[self.name] = probs.float().view(hidden_states.shape[0], attn.heads, *probs.shape[1:]).mean(1)
        return out


class Vocabulary:
    """Heat maps of `labels` for images, from the pipeline's UNet and text encoder."""

    def __init__(self, pipe, labels: list[str], config: VocabularyConfig | None = None, *,
                 resolution: int | None = None, keep_aspect: bool = False):
        labels = [str(label).strip() for label in labels]
        if not labels or any(not label for label in labels) or len(set(labels)) < len(labels):
            raise ConfigError(f"labels must be distinct and non-empty, got {labels}")
        pipe = load_pipeline(pipe)  # checked, its VAE upcast where it must be
        self.pipe, self.labels, self.config = pipe, labels, config or VocabularyConfig()
        # by default the model's own resolution, as EmerDiff's (SD 512, SDXL 1024, mini 64)
        self.resolution, self.keep_aspect = resolution or expected_resolution(pipe), keep_aspect
        self.unet, self.vae = pipe.unet, pipe.vae
        self.layers = heat_layers(self.unet, self.vae.config, self.config.scales)
        cfg = self.config
        # labels beyond one prompt's tokens go to further prompts, all run in the same UNet call
        self.groups = prompt_groups(pipe.tokenizer, labels, cfg.template, cfg.joiner)
        ids, spans = [], None  # per tokenizer (SDXL has two; they must place the labels alike)
        for tok in conditioning.tokenizers(pipe):
            prompts = [prompt_tokens(tok, [labels[i] for i in g], cfg.template, cfg.joiner) for g in self.groups]
            ids.append(torch.tensor([p for p, _ in prompts]))
            if spans is not None and spans != [s for _, s in prompts]:
                raise ConfigError("this model's two tokenizers split the labels differently; label heat maps "
                                  "need them to agree")
            spans = [s for _, s in prompts]
        self.input_ids = ids[0].tolist()
        self.spans = spans  # per group, per label in it
        self.cond = conditioning.encode_ids(pipe, ids, self.unet.dtype)  # (groups, L, D) and SDXL's extras
        self.multiple = size_multiple(self.unet.config, self.vae.config)

    @property
    def context(self) -> torch.Tensor:
        """The text encoder states of `cond` (all of SD 1.x/2.x's conditioning; SDXL's UNet
        needs cond.kwargs)."""
        return self.cond.context

    @property
    def class_names(self) -> list[str]:
        """The labels, then the fallback where it is not one of them."""
        fb = self.config.fallback
        return self.labels + ([fb] if fb not in self.labels else [])

    @torch.inference_mode()
    def heat_maps(self, image, size: tuple[int, int] | None = None) -> torch.Tensor:
        """One image -> (labels, H, W) float32 heat maps at the image's size (or `size`), on the CPU."""
        im = load_image(image)
        proc = processing_size(im.size, self.resolution, self.multiple, self.keep_aspect)
        pixels = to_model_input(im, proc)[None].to(self.vae.device, self.vae.dtype)
        latent = (self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor).float()
        maps = self.latent_heat_maps(latent.to(self.unet.device), proc)
        out = size or (im.size[1], im.size[0])
        return F.interpolate(maps[None], size=out, mode="bilinear", align_corners=False)[0].cpu()

    def latent_heat_maps(self, latent: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """latent (1, C, h, w) of an image processed at size (H, W) -> (labels, H, W)."""
        cfg = self.config
        g = torch.Generator().manual_seed(cfg.seed)
        noise = torch.randn((cfg.noise_draws, *latent.shape[1:]), generator=g)
        a = alphas_cumprod(self.pipe.scheduler.config)[cfg.timestep]
        x = noise_to(latent.float(), noise.to(latent.device), a).to(self.unet.dtype)
        t = torch.tensor(cfg.timestep, device=latent.device)
        store: dict = {}
        totals = {name: 0.0 for name in self.layers}
        procs = dict(self.unet.attn_processors)
        for name in self.layers:
            procs[f"{name}.processor"] = _Recorder(name, store)
        step, groups = cfg.draw_batch or cfg.noise_draws, len(self.groups)
        cond = self.cond.at_size(size)
        with installed(self.unet, procs):
            for s in range(0, cfg.noise_draws, step):  # one UNet call per draw batch, every prompt in it
                part = x[s:s + step]
                n = part.shape[0]
                self.unet(part.repeat_interleave(groups, 0), t, **cond.repeat(n).kwargs(n * groups))
                for name in self.layers:  # batch element d * groups + g: draw d, prompt g
                    totals[name] = totals[name] + store.pop(name).unflatten(0, (n, groups)).sum(0)
        maps = []
        reduce = (lambda p: p.mean(1)) if cfg.token_reduce == "mean" else (lambda p: p.sum(1))
        for name in self.layers:
            probs = totals[name] / cfg.noise_draws  # (groups, N, L)
            gh, gw = layer_grid(self.unet.config, self.vae.config, size, name)
            per_label = torch.stack([reduce(probs[g][:, span]) for g, spans in enumerate(self.spans)
                                     for span in spans]).view(-1, 1, gh, gw)  # in label order: groups are in order
            maps.append(F.interpolate(per_label, size=size, mode="bilinear", align_corners=False)[:, 0])
        heat = torch.stack(maps).mean(0)
        if cfg.normalize == "max":
            heat = heat / heat.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        return heat.float()


def segment_scores(segments: np.ndarray, heat: np.ndarray, num_segments: int | None = None) -> np.ndarray:
    """(H, W) segment ids, (L, H, W) heat -> (K, L) mean heat of each label over each segment
    (an empty segment scores 0)."""
    k = int(num_segments or segments.max() + 1)
    flat = segments.reshape(-1)
    counts = np.bincount(flat, minlength=k).astype(np.float64)
    sums = np.stack([np.bincount(flat, weights=h.reshape(-1).astype(np.float64), minlength=k) for h in heat], 1)
    return sums / np.maximum(counts, 1)[:, None]


def name_segments(segments: np.ndarray, heat: np.ndarray, threshold: float, fallback: int,
                  num_segments: int | None = None) -> np.ndarray:
    """Each segment takes the label of highest mean heat over its pixels, or `fallback` (an
    index into the class names) where that best mean is under `threshold`: (K,) ids."""
    scores = segment_scores(segments, heat, num_segments)
    best = scores.argmax(1)
    return np.where(scores.max(1) >= threshold, best, fallback)


def named_maps(heat: np.ndarray, segmentations: dict[str, np.ndarray], threshold: float, fallback: int,
               num_segments: int) -> dict[str, np.ndarray]:
    """(L, H, W) heat and {method: (H, W) segment ids} -> {method: (H, W) class ids}, each
    segment named by name_segments; and the baselines with no segments: "heat", the heat
    maps' own per-pixel argmax, and "heat_threshold", the same with the naming rule's
    threshold applied per pixel (the fallback where the best heat is under it)."""
    out = {m: name_segments(s, heat, threshold, fallback, num_segments)[s] for m, s in segmentations.items()}
    out["heat"] = heat.argmax(0)
    out["heat_threshold"] = np.where(heat.max(0) >= threshold, out["heat"], fallback)
    return out


def combine(segments: np.ndarray, class_map: np.ndarray, num_segments: int | None = None,
            ignore: int | None = None) -> np.ndarray:
    """The paper's overlap rule (Table 3): each segment takes the class of `class_map` (an
    external segmenter's per-pixel ids, same size) that covers most of its pixels; pixels
    of class `ignore` do not vote. Returns (K,) class ids (-1 for a segment with no votes)."""
    if segments.shape != class_map.shape:
        raise ValueError(f"segments {segments.shape} and class map {class_map.shape} differ in size")
    k = int(num_segments or segments.max() + 1)
    keep = class_map != ignore if ignore is not None else np.ones(class_map.shape, bool)
    c = int(class_map.max()) + 1
    votes = np.bincount(segments[keep].astype(np.int64) * c + class_map[keep].astype(np.int64),
                        minlength=k * c).reshape(k, c)
    return np.where(votes.sum(1) > 0, votes.argmax(1), -1)


def name_result(result: SegmentationResult, vocabulary: Vocabulary, image) -> SegmentationResult:
    """The result with its segments named by the naming rule (name_segments) on the image's
    heat maps: class_names and segment_labels set."""
    heat = vocabulary.heat_maps(image, size=result.labels.shape).numpy()
    names = vocabulary.class_names
    labels = name_segments(result.labels, heat, vocabulary.config.threshold, names.index(vocabulary.config.fallback),
                           result.num_masks)
    return dataclasses.replace(result, class_names=names, segment_labels=labels.astype(np.int32))


def find_class_map(folder, name: str):
    """FOLDER/NAME.npz, else FOLDER/NAME.png, the class map of the image called `name`;
    None when neither is there."""
    from pathlib import Path

    found = [Path(folder) / f"{name}{suffix}" for suffix in (".npz", ".png")]
    return next((f for f in found if f.is_file()), None)


def read_class_map(path, names_file=None) -> tuple[np.ndarray, list[str]]:
    """An external segmenter's output: an npz with `class_map` (H, W) ids and `class_names`,
    or a PNG of ids (palette or grey) with its names one per line in `names_file` (without
    one: "class 0", "class 1", ...)."""
    from pathlib import Path

    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class map {path} not found")
    if path.suffix == ".npz":
        with np.load(path) as z:
            if "class_map" not in z:
                raise ValueError(f"{path} holds no 'class_map' array (found {sorted(z.files)})")
            class_map = z["class_map"]
            names = [str(n) for n in z["class_names"]] if "class_names" in z else None
    else:
        class_map = np.asarray(Image.open(path))
        names = None
    if names_file is not None:
        names = read_names(names_file)
    if class_map.ndim != 2 or not np.issubdtype(class_map.dtype, np.integer) or class_map.min(initial=0) < 0:
        raise ValueError(f"class map {path} must be an (H, W) array of non-negative integer ids")
    n = int(class_map.max(initial=0)) + 1
    names = names or [f"class {i}" for i in range(n)]
    if len(names) < n:
        raise ValueError(f"class map {path} uses id {n - 1} but only {len(names)} class names are given")
    return class_map.astype(np.int64), names


def combine_result(result: SegmentationResult, class_map: np.ndarray, class_names: list[str]) -> SegmentationResult:
    """The result with each segment named by the overlap rule (`combine`) on an external
    class map, resized to the labels' size (nearest) when it differs."""
    if class_map.shape != result.labels.shape:
        class_map = F.interpolate(torch.from_numpy(class_map)[None, None].float(), size=result.labels.shape,
                                  mode="nearest-exact")[0, 0].long().numpy()
    labels = combine(result.labels, class_map, result.num_masks)
    return dataclasses.replace(result, class_names=list(class_names), segment_labels=labels.astype(np.int32))
