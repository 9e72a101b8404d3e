"""`EmerDiff`: the user-facing segmenter, orchestrating the stages. Those shared by every
backend live here (encode, low-resolution features, k-means, the inversion's sampled
trajectory, label maps); the backends differ only in how they produce the K difference
maps from the trajectory (reference.py: one modulated run per mask, engine.py: one batched
run for all masks). The segmenter hands a backend a run.Run (the models as called, the
settings, the batch sizes), never itself; the trajectory and the denoising loop are
sampling.py's."""
from __future__ import annotations

import copy
import functools
import logging

import torch
import torch.nn.functional as F

from . import reference
from .attention import find_module
from .conditioning import Conditioning, empty_prompt
from .config import ConfigError, EmerDiffConfig, layer_grid, size_multiple, vae_scale_factor
from .engine import ChunkPlan, FastOptions, FastPath
from .images import ImageError, load_image, processing_size, resize_labels, to_model_input
from .kmeans import kmeans
from .loading import expected_resolution, load_pipeline, model_caveats, recommended_settings, vae_dtype
from .maps import assign_labels, gaussian_blur, mask_embeddings, masks_from_labels, naive_upsample
from .result import SegmentationResult
from .run import Progress, Run
from .sampling import (ReverseSchedule, alphas_cumprod, feature_noise, grid_text, inference_grid, latent_dtype,
                       modulation_start, noise_to, sample_trajectory, trajectory_noise)
from .timing import timed

BACKENDS = ("reference", "fast", "naive")
ERRORS = ("raise", "skip")
IMAGE_BATCH = 8  # images encoded and clustered together (choice: bounds device memory for long lists)
log = logging.getLogger("emerdiff_fast")


CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs


def _graph_safe(compiled, mode: str, keep_output: bool = False):
    """A compiled call that is safe under CUDA graphs. A graph replay writes its outputs
    into the same static buffers every time, so each call marks a new step (inference has
    no backward pass to tell the graph trees) and, with keep_output, hands back a copy:
    decode outputs are kept in a list across calls, where the next replay would overwrite
    them. The UNet's eps needs no copy: the reverse step consumes it before the next call."""
    if mode not in CUDAGRAPH_MODES:
        return compiled

    def call(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        out = compiled(*args, **kwargs)
        if keep_output:
            out.sample = out.sample.clone()
        return out

    return call


_SAID: set[str] = set()  # warnings given once per process


def _once(message: str, *args) -> None:
    text = message % args
    if text not in _SAID:
        _SAID.add(text)
        log.warning(text)


def settle_config(pipe, config: EmerDiffConfig | None, overrides: dict) -> EmerDiffConfig:
    """The segmenter's config. Keyword overrides (EmerDiff(pipe, num_masks=30)) go on top of
    the model's recommended settings (its emerdiff.json, else the method's defaults), or on
    top of an explicit config. An explicit config means exactly what it says; where it departs
    from the model's recommended values, that is logged once. Far from the model's expected
    resolution (half or double), a warning says what it expects. Either way, resolution and
    the layers left at their defaults become the model's own (EmerDiffConfig.for_model)."""
    fields = EmerDiffConfig.__dataclass_fields__
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise TypeError(f"EmerDiff got unknown setting(s) {', '.join(unknown)}; EmerDiffConfig fields are "
                        f"{', '.join(fields)}")
    recommended = recommended_settings(pipe)
    if config is None:
        config = recommended_config(pipe, **overrides)
    else:
        departs = {k: v for k, v in recommended.items() if getattr(config, k) != v and k not in overrides}
        config = config.replace(**overrides) if overrides else config
        if departs:
            _once("this config departs from the model's recommended settings (its emerdiff.json): %s", ", ".join(
                      f"{k} {getattr(config, k)} (recommended {v})" for k, v in departs.items()))
    config = config.for_model(pipe.unet, pipe.vae.config)
    grid = inference_grid(pipe.scheduler.config, config.num_inference_steps)
    start = modulation_start(grid, config.t_modulate)  # refuses a given value off the grid
    if start != config.t_modulate:
        _once("t_modulate %d is not on this checkpoint's %d-step schedule (%s): using its nearest step, %d",
              config.t_modulate, len(grid), grid_text(grid), start)
        config = config.replace(t_modulate=start)
    expected = expected_resolution(pipe, recommended)
    if not expected / 2 <= config.resolution <= expected * 2:
        _once("resolution %d is far from the %d px this model expects: its segments may be poor (and a larger "
              "resolution costs time as its square)", config.resolution, expected)
    return config


def recompile_limit() -> int:
    """Graphs dynamo keeps per compiled function before it stops compiling (and runs eager)."""
    cfg = torch._dynamo.config
    return int(getattr(cfg, "recompile_limit", None) or getattr(cfg, "cache_size_limit", 8))


def recommended_config(pipe, **overrides) -> EmerDiffConfig:
    """EmerDiffConfig with the model's recommended settings (loading.recommended_settings)
    under `overrides`: what EmerDiff(pipe) uses when given no config."""
    return EmerDiffConfig(**{**recommended_settings(pipe), **overrides})


class _StopForward(Exception):
    """Raised by the feature hook: nothing after the feature layer is needed at t_feature."""


class EmerDiff:
    """Segment images with a Stable Diffusion pipeline.

    config: an EmerDiffConfig, used exactly as given; None: the model's recommended settings
    (its emerdiff.json), else the method's defaults. Keyword overrides of EmerDiffConfig
    fields (EmerDiff(pipe, num_masks=30)) go on top of either. `caveats`: the model's measured
    caveats per feature (e.g. "labels"), from its emerdiff.json.
    backend: "fast" (the default: the literal method's function, batched; see engine.py),
    "reference" (the literal method) or "naive" (bilinear upsampling of the low-resolution
    masks).
    Fast-path options: compile (torch.compile the UNet and, unless compile_decode=False,
    the VAE decode; False or a mode string such as "default" / "max-autotune-no-cudagraphs"), max_batch (modulated runs per denoising
    batch; None = all 2K on CPU, a free-memory estimate on CUDA), decode_batch (images per
    VAE decode call; None = min(chunk, 8)),
    options (engine.FastOptions: switch single techniques off; channels_last=True converts
    the pipeline's UNet and VAE in place), progress (a per-image tqdm bar over the
    denoising steps x chunks and the decodes).
    """

    def __init__(self, pipe, config: EmerDiffConfig | None = None, backend: str = "fast", *,
                 compile: bool | str = False, compile_decode: bool | None = None, max_batch: int | None = None,
                 decode_batch: int | None = None, options: FastOptions | None = None, progress: bool = False,
                 **overrides):
        pipe = load_pipeline(pipe)  # an object as it is, but checked and its VAE upcast where it must be
        config = settle_config(pipe, config, overrides)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend != "fast" and (compile or options is not None):
            raise ValueError(f"compile and options apply to backend='fast' only, not {backend!r}")
        self.options = options or FastOptions()
        if self.options.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        self.pipe, self.config, self.backend = pipe, config, backend
        self.caveats = model_caveats(pipe)  # measured caveats per feature, from the model's emerdiff.json
        self.unet, self.vae = pipe.unet, pipe.vae
        self.device, self.dtype = self.unet.device, self.unet.dtype
        if self.device.type == "mps":  # the inversion's coefficients and noise are float64
            raise ValueError("MPS devices are not supported: the inversion computes in float64, which MPS "
                             "lacks; use cuda or cpu")
        for field in ("feature_layer", "modulated_layer"):
            find_module(self.unet, getattr(self.config, field))
        res = self.config.resolution
        self.size_multiple = size_multiple(self.unet.config, self.vae.config)
        # at resolution x resolution; with keep_aspect each image size has its own grid (_segment)
        self.feature_grid = layer_grid(self.unet.config, self.vae.config, (res, res), self.config.feature_layer)
        modulated_grid = layer_grid(self.unet.config, self.vae.config, (res, res), self.config.modulated_layer)
        if modulated_grid != self.feature_grid:  # the masks come from one layer and modulate the other
            raise ConfigError(
                f"feature_layer {self.config.feature_layer} runs at {self.feature_grid[0]}x{self.feature_grid[1]} "
                f"but modulated_layer {self.config.modulated_layer} at {modulated_grid[0]}x{modulated_grid[1]}; "
                "the masks found at the first must fit the second: pick layers of one resolution")
        self.config.check_grid(self.feature_grid)
        if max_batch is not None and max_batch < 2:
            raise ValueError(f"max_batch must be at least 2 (one +/- pair), got {max_batch}")
        if decode_batch is not None and decode_batch < 1:
            raise ValueError(f"decode_batch must be at least 1, got {decode_batch}")
        self.progress = Progress(progress)
        self.schedule = ReverseSchedule.build(pipe.scheduler.config, self.config)
        # the empty prompt, no classifier-free guidance (conditioning.py: SDXL's pooled text and
        # time ids too); per processing size, SDXL's time ids name the size (run())
        self.cond = empty_prompt(pipe, self.device, self.dtype)
        self._conds: dict[tuple[int, int], Conditioning] = {}
        self.unet_call = self.unet
        self.decode_vae = self.vae  # a copy in config.decode_dtype when that differs (a speed preset)
        # the VAE runs in its own dtype (an fp32 VAE under a 16-bit UNet is the usual fix for
        # VAE overflow), unless a speed preset asks for another decode dtype
        wanted = getattr(torch, self.config.decode_dtype) if self.config.decode_dtype else self.vae.dtype
        decode_dtype = vae_dtype(self.vae, wanted)
        if decode_dtype != wanted:
            _once("decode_dtype=float16: this VAE's config says force_upcast (it overflows in float16), so it "
                  "decodes in float32")
        if decode_dtype != self.vae.dtype:  # (config allows only float32, bfloat16, float16)
            self.decode_vae = copy.deepcopy(self.vae).to(decode_dtype)
        if self.config.approximate:
            log.warning("approximate settings (%s): faster, less exact. Label agreement with the exact method, "
                        "measured on the mini model only (30 held-out generated scenes; real SD unmeasured): "
                        "grid25 90%%, decode-fast 86%%, fastest 81%% (benchmarks/RESULTS.md)", ", ".join(
                            f"{k}={getattr(self.config, k)}" for k in ("num_inference_steps", "decode_dtype",
                                                                       "decode_scale")))
        self.vae_decode = self.decode_vae.decode
        self.compile_mode = None
        if compile and backend == "fast":
            self.compile_mode = "default" if compile is True else compile
            self.unet_call = _graph_safe(torch.compile(self.unet, mode=self.compile_mode, dynamic=False),
                                         self.compile_mode)
            if compile_decode is not False:  # with compile unless turned off; decode calls then
                # have one static batch (batching.decode_pairs pads the last slice)
                self.vae_decode = _graph_safe(torch.compile(self.decode_vae.decode, mode=self.compile_mode,
                                                            dynamic=False), self.compile_mode, keep_output=True)
        elif compile_decode:
            raise ValueError("compile_decode needs compile (backend='fast')")
        self.compiled_shapes: set[tuple[tuple[int, int], int]] = set()  # (size, chunk) given compiled calls
        self.eager_shapes: set[tuple[tuple[int, int], int]] = set()     # past the bound: eager, said once
        # the fast path's state lives as long as the segmenter (compile guards hold across images)
        self.fast = (FastPath(self.unet, self.config.modulated_layer, self.options, self.compile_mode)
                     if backend == "fast" else None)
        self.chunk_plan = ChunkPlan(dict(self.unet.config), dict(self.vae.config), self.dtype, self.device,
                                    self.config.modulated_layer, max_batch, decode_batch, self.decode_vae.dtype)

    @property
    def context(self) -> torch.Tensor:
        """The text encoder states of `cond` (all of SD 1.x/2.x's conditioning; SDXL's UNet
        needs cond.kwargs)."""
        return self.cond.context

    def processing_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(H, W) the model sees for an image of PIL size (W, H) (config.keep_aspect)."""
        cfg = self.config
        return processing_size(image_size, cfg.resolution, self.size_multiple, cfg.keep_aspect)

    # ---- shared stages ---------------------------------------------------------------
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, 3, R, R) in [-1, 1] -> latent means times the VAE scaling factor (SPEC 1.1)."""
        dist = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
        return (dist.mean * self.vae.config.scaling_factor).to(self.device)

    def decode(self, latents: torch.Tensor, eager: bool = False) -> torch.Tensor:
        """Latents -> images, through the compiled decode unless eager (or not compiled)."""
        vae_decode = self.decode_vae.decode if eager else self.vae_decode
        lat = (latents / self.vae.config.scaling_factor).to(self.decode_vae.dtype)
        if self.config.decode_scale == 1.0:
            return vae_decode(lat).sample
        # speed preset: decode 2x-downsampled latents (4x fewer pixels), upsample the images
        small = vae_decode(F.interpolate(lat, scale_factor=self.config.decode_scale, mode="bilinear")).sample
        size = tuple(s * vae_scale_factor(self.vae.config) for s in lat.shape[-2:])
        return F.interpolate(small.float(), size=size, mode="bilinear").to(small.dtype)

    @property
    def static_decode(self) -> bool:
        """Decode calls must keep one batch size (a compiled decode would retrace)."""
        return self.vae_decode != self.decode_vae.decode  # bound methods compare equal, never identical

    def features(self, latent: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Query vectors (to_q output) of the feature layer at t_feature, averaged over the
        noise draws (SPEC 1.3): latent (1, C, h, w), noise (S, C, h, w) -> (N, C) float32.
        One batched UNet call of S members, stopped right after the feature layer's to_q."""
        captured = {}

        def hook(module, args, output):
            captured["q"] = output
            raise _StopForward

        a = alphas_cumprod(self.pipe.scheduler.config)[self.config.t_feature]
        x = noise_to(latent.float(), noise.to(self.device), a)
        to_q = find_module(self.unet, self.config.feature_layer).to_q
        handle = to_q.register_forward_hook(hook)
        size = tuple(s * vae_scale_factor(self.vae.config) for s in latent.shape[-2:])
        try:
            self.unet(x.to(self.dtype), torch.tensor(self.config.t_feature, device=self.device),
                      **self.cond_at(size).kwargs(x.shape[0]))
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured["q"].float().mean(0)

    # ---- the call --------------------------------------------------------------------
    def __call__(self, images, errors: str = "raise"):
        """One image (path, PIL, array, tensor) -> SegmentationResult; a list -> a list.
        errors="skip": an image that cannot be read or gives NaN is logged and its place
        in the returned list holds None, so the others are not lost."""
        single = not isinstance(images, (list, tuple))
        results = self.segment(list([images] if single else images), errors=errors)
        return results[0] if single else results

    @torch.inference_mode()
    def segment(self, images: list, errors: str = "raise") -> list[SegmentationResult | None]:
        if errors not in ERRORS:
            raise ValueError(f"errors must be one of {ERRORS}, got {errors!r}")
        loaded = []
        for im in images:
            try:
                loaded.append(load_image(im))
            except ImageError as exc:
                if errors == "raise":
                    raise
                log.warning("skipped: %s", exc)
                loaded.append(None)
        by_size: dict[tuple[int, int], list[int]] = {}  # processing size -> images (one size per batch)
        for i, im in enumerate(loaded):
            if im is not None:
                by_size.setdefault(self.processing_size(im.size), []).append(i)
        out: list[SegmentationResult | None] = [None] * len(images)
        # bounded groups: a long list never sits on the device at once (per-image seeding makes
        # a group's results equal single calls)
        for size, members in by_size.items():
            for start in range(0, len(members), IMAGE_BATCH):
                group = members[start:start + IMAGE_BATCH]
                for i, r in zip(group, self._segment([loaded[i] for i in group], size, errors)):
                    out[i] = r
        return out

    def _segment(self, pil: list, size: tuple[int, int], errors: str) -> list[SegmentationResult | None]:
        """Images of one processing size (H, W)."""
        cfg = self.config
        grid = layer_grid(self.unet.config, self.vae.config, size, cfg.feature_layer)
        if size != (cfg.resolution, cfg.resolution):  # a kept aspect ratio: this size's own grid
            try:
                cfg.check_grid(grid, size)
            except ConfigError as exc:
                if errors == "raise":
                    raise
                log.warning("skipped %d image(s): %s", len(pil), exc)
                return [None] * len(pil)
        timings: dict[str, float] = {}
        with timed(timings, "encode", self.device):
            latents = self.encode(torch.stack([to_model_input(im, size) for im in pil]))
        latent_shape = tuple(latents.shape[1:])
        with timed(timings, "features", self.device):
            noise = feature_noise(cfg.seed, latent_shape, cfg.feature_samples)
            feats = torch.stack([self.features(latents[j:j + 1], noise) for j in range(len(pil))])
        finite = torch.isfinite(feats).flatten(1).all(1).tolist()  # once per call, outside any loop
        ok = [j for j, f in enumerate(finite) if f]
        if len(ok) < len(pil):
            self._fail(errors, f"the feature run produced NaN/inf for {len(pil) - len(ok)} of {len(pil)} "
                               "images (try float32 or bfloat16)")
        if not ok:
            return [None] * len(pil)
        with timed(timings, "kmeans", self.device):
            km = kmeans(feats[ok], cfg.num_masks, restarts=cfg.kmeans_restarts, max_iter=cfg.kmeans_iterations,
                        seed=cfg.seed, use_triton=self.backend == "fast" and self.options.triton_kmeans)
        step_noise = trajectory_noise(cfg.seed, latent_shape, self.schedule.grid)
        results: list[SegmentationResult | None] = [None] * len(pil)
        for row, j in enumerate(ok):
            im = pil[j]
            t = dict(timings)
            low_res = km.labels[row]
            if self.backend == "naive":
                with timed(t, "postprocess", self.device):
                    labels = naive_upsample(low_res.view(grid), cfg.num_masks, size)
                diffs = None
            else:
                masks = masks_from_labels(low_res, cfg.num_masks).to(self.device)
                traj = sample_trajectory(self.schedule, latents[j:j + 1], step_noise, latent_dtype(self.dtype))
                diffs = self._difference_maps(traj, masks, size, t)
                if not torch.isfinite(diffs).all():
                    self._fail(errors, "difference maps contain NaN/inf (the model overflowed in "
                                       f"{self.dtype}; try float32 or bfloat16)")
                    continue
                with timed(t, "postprocess", self.device):
                    labels = assign_labels(gaussian_blur(diffs, cfg.gaussian_sigma))
            labels = resize_labels(labels.cpu(), (im.size[1], im.size[0]))
            results[j] = SegmentationResult(
                labels=labels.numpy().astype("int32"),
                low_res_labels=low_res.view(grid).cpu().numpy().astype("int32"),
                difference_maps=None if diffs is None else diffs.float().cpu().numpy(),
                mask_embeddings=mask_embeddings(feats[j], low_res, cfg.num_masks).cpu().numpy(),
                config=cfg, backend=self.backend, timings=t)
        return results

    def compiled_shape(self, size: tuple[int, int], chunk: int) -> bool:
        """Whether the compiled UNet and decode serve this (processing size, chunk). Each new
        shape traces graphs_per_shape UNet graphs (dynamic=False); past dynamo's recompile
        limit torch.compile would fall back to eager silently, after minutes of compiling.
        So shapes past max_compiled_shapes run eager by choice, and say so once each (sizes
        vary with keep_aspect; chunks change after an out-of-memory back-off)."""
        key = (tuple(size), chunk)
        if key in self.compiled_shapes:
            return True
        if len(self.compiled_shapes) < self.max_compiled_shapes:
            self.compiled_shapes.add(key)
            return True
        if key not in self.eager_shapes:
            self.eager_shapes.add(key)
            log.warning("processing size %dx%d (chunk %d) runs eager: %d shapes are compiled already, the bound "
                        "(dynamo's recompile limit %d / %d graphs per shape); compiled: %s", size[1], size[0], chunk,
                        len(self.compiled_shapes), recompile_limit(), self.graphs_per_shape,
                        ", ".join(f"{w}x{h}" for (h, w), _ in sorted(self.compiled_shapes)))
        return False

    @property
    def graphs_per_shape(self) -> int:
        """UNet graphs per shape (engine.FastPath): step 0 and the rest, plus modulated later steps."""
        return 3 if self.config.modulate_steps > 1 else 2

    @property
    def max_compiled_shapes(self) -> int:
        return max(1, recompile_limit() // self.graphs_per_shape)

    def cond_at(self, size: tuple[int, int]) -> Conditioning:
        """The empty prompt for images processed at (H, W), kept per size (no copy per call)."""
        size = (int(size[0]), int(size[1]))
        if size not in self._conds:
            self._conds[size] = self.cond.at_size(size)
        return self._conds[size]

    def run(self, size: tuple[int, int]) -> Run:
        """What the backend gets for an image of processing size (H, W): the reference path
        runs one +/- pair at a time, the fast path its chunk plan's sizes."""
        fast = self.fast is not None
        chunk = self.chunk_plan.chunk(size, self.config.num_masks) if fast else 2
        if self.compile_mode and not self.compiled_shape(size, chunk):
            unet_call, decode, static_decode = self.unet, functools.partial(self.decode, eager=True), False
        else:
            unet_call, decode, static_decode = self.unet_call, self.decode, self.static_decode
        return Run(unet=self.unet, unet_call=unet_call, decode=decode, static_decode=static_decode,
                   cond=self.cond_at(size), dtype=self.dtype, device=self.device, lam=self.config.lam,
                   modulated_layer=self.config.modulated_layer, modulate_steps=self.config.modulate_steps,
                   chunk=chunk, decode_batch=self.chunk_plan.decode_size(chunk) if fast else 2,
                   progress=self.progress)

    def _difference_maps(self, traj, masks: torch.Tensor, size: tuple[int, int], timings: dict) -> torch.Tensor:
        """The backend's maps; on a CUDA out-of-memory error the fast path halves its chunk
        (kept for later images) and retries the image, down to one +/- pair per call."""
        k = self.config.num_masks
        while True:
            try:
                if self.fast is None:
                    return reference.difference_maps(self.run(size), traj, masks, timings)
                return self.fast.difference_maps(self.run(size), traj, masks, timings)
            except torch.cuda.OutOfMemoryError:
                if self.fast is None:
                    raise
                old = self.chunk_plan.chunk(size, k)
                new = self.chunk_plan.back_off(size, k)
                if new is None:
                    raise torch.cuda.OutOfMemoryError(
                        "CUDA out of memory even at 2 modulated runs per UNet call (one +/- pair); lower "
                        "--resolution, use a 16-bit --dtype, or a larger GPU") from None
                log.warning("CUDA out of memory at %d modulated runs per UNet call: retrying with %d "
                            "(kept for the following images)", old, new)
                torch.cuda.empty_cache()
            finally:
                self.progress.end()

    @staticmethod
    def _fail(errors: str, message: str) -> None:
        if errors == "raise":
            raise FloatingPointError(message)
        log.warning("skipped: %s", message)

