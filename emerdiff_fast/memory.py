"""A memory model of the fast path: peak device memory predicted from a trace on meta
tensors (no device, no weights), so batch sizes can be chosen, and checked, anywhere.

`LiveBytes` is a dispatch mode that follows every tensor the traced code allocates: a
storage counts from the op that creates it until the last tensor viewing it is collected,
which is what the CUDA caching allocator's `max_memory_allocated` counts (less its 512 B
rounding and library workspaces such as cuDNN's, which the safety margin of
`engine.ChunkPlan.auto_max_batch` covers). `MemoryModel` traces fast-path UNet calls (the shared
attention processors, modulation on: step 0) and VAE decodes at exactly the sizes asked,
on meta copies of the models built from their configs; each trace takes well under a
second at full size on a CPU and is cached per (configs, image size, dtype, batch).
tests/test_memory.py checks a prediction against the peak RSS of a real CPU run.
"""
from __future__ import annotations

import functools
import json
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .conditioning import placeholder
from .config import layer_grid, vae_scale_factor


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages allocated inside the mode (tensors that existed before,
    such as weights and inputs, are not counted, nor are views of them)."""

    def __init__(self, existing=()):
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage -> [tensors alive, bytes]
        self._existing = {t.untyped_storage()._cdata for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._existing:
            return
        entry = self._refs.get(key)
        if entry is None:
            entry = self._refs[key] = [0, storage.nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.live -= entry[1]
                del self._refs[key]


def peak_bytes(fn, existing=()) -> int:
    """Peak bytes allocated while fn() runs (under inference mode), its result included."""
    with torch.inference_mode(), LiveBytes(existing) as mode:
        result = fn()
        peak = mode.peak
        del result
    return peak


def meta_models(unet_config: dict, vae_config: dict, dtype: torch.dtype, vae_dtype: torch.dtype | None = None):
    """UNet (in dtype) and VAE (in vae_dtype, default dtype) built from their configs on the
    meta device (no weights, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config).to(dtype)
        vae = AutoencoderKL.from_config(vae_config).to(vae_dtype or dtype)
    return unet.eval(), vae.eval()


@functools.lru_cache(maxsize=8)
def _models(unet_json: str, vae_json: str, dtype: torch.dtype, vae_dtype: torch.dtype):
    return meta_models(json.loads(unet_json), json.loads(vae_json), dtype, vae_dtype)


@functools.lru_cache(maxsize=256)
def _unet_call_bytes(unet_json: str, vae_json: str, dtype: torch.dtype, size: tuple[int, int],
                     modulated_layer: str, members: int) -> int:
    from .attention import Modulation, RunState, SharedProcessor, installed, make_processors

    unet, vae = _models(unet_json, vae_json, dtype, dtype)
    f = vae_scale_factor(vae.config)
    h, w = layer_grid(unet.config, vae.config, size, modulated_layer)
    n = h * w  # positions of the modulated layer (the 16x16 block at 512 px for SD)
    state = RunState(mode="shared", modulated_layer=modulated_layer, modulate_now=True)
    state.modulation = Modulation(torch.zeros(members, n, device="meta"),
                                  torch.zeros(members, dtype=torch.long, device="meta"),
                                  torch.zeros(members, device="meta"))
    x = torch.empty(members, unet.config.in_channels, size[0] // f, size[1] // f, device="meta", dtype=dtype)
    cond = placeholder(unet.config, size, dtype).kwargs(members)  # the empty prompt's shapes
    t = torch.tensor(281, device="meta")
    existing = [*unet.parameters(), *unet.buffers(), x, *tree_leaves(cond)]
    with installed(unet, make_processors(unet, SharedProcessor, state)):
        return peak_bytes(lambda: unet(x, t, **cond).sample, existing)


@functools.lru_cache(maxsize=64)
def _decode_bytes(unet_json: str, vae_json: str, vae_dtype: torch.dtype, size: tuple[int, int], images: int) -> int:
    _, vae = _models(unet_json, vae_json, vae_dtype, vae_dtype)
    f = vae_scale_factor(vae.config)
    z = torch.empty(images, vae.config.latent_channels, size[0] // f, size[1] // f, device="meta", dtype=vae_dtype)
    return peak_bytes(lambda: vae.decode(z).sample, [*vae.parameters(), *vae.buffers(), z])


def _config_key(cfg) -> str:
    return json.dumps({k: v for k, v in dict(cfg).items() if not k.startswith("_")}, sort_keys=True, default=str)


@dataclass(frozen=True)
class MemoryModel:
    """Predicted activation memory of the fast path for one model, image size and dtypes
    (the UNet's, and the decoding VAE's own: an fp32 VAE under a bf16 UNet decodes in fp32),
    bytes; every figure is a trace at exactly that size (cached), never an extrapolation:
    the peak moves between layers as the batch grows (with few members the shared P of
    the 64x64 self-attention dominates, with many the members' feed-forward activations),
    so it is not linear in the batch."""

    unet_config: str
    vae_config: str
    size: tuple[int, int]  # (H, W) processing size in pixels
    dtype: torch.dtype
    modulated_layer: str
    vae_dtype: torch.dtype

    @classmethod
    def of(cls, unet_config, vae_config, size: int | tuple[int, int], dtype: torch.dtype,
           modulated_layer: str, vae_dtype: torch.dtype | None = None) -> MemoryModel:
        """size: R (R x R pixels) or (H, W); vae_dtype: the decoding VAE's (default dtype)."""
        size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        return cls(_config_key(unet_config), _config_key(vae_config), size, dtype, modulated_layer,
                   vae_dtype or dtype)

    def unet_call(self, members: int) -> int:
        """Peak bytes of one UNet call of `members` members (modulation on: step 0)."""
        return _unet_call_bytes(self.unet_config, self.vae_config, self.dtype, self.size,
                                self.modulated_layer, members)

    def decode(self, images: int) -> int:
        return _decode_bytes(self.unet_config, self.vae_config, self.vae_dtype, self.size, images)

    def weights(self) -> int:
        unet, vae = _models(self.unet_config, self.vae_config, self.dtype, self.vae_dtype)
        return sum(p.numel() * p.element_size() for m in (unet, vae) for p in m.parameters())

    def peak(self, chunk: int, decode_batch: int) -> int:
        """Peak activation bytes of one image: `chunk` modulated members per UNet call
        (plus the reference member), `decode_batch` images per decode."""
        return max(self.unet_call(chunk + 1), self.decode(decode_batch))

    def largest_chunk(self, budget_bytes: float, members: int, decode_batch: int) -> int:
        """The largest even chunk <= members whose peak fits the budget (binary search on
        exact traces; the peak grows with the chunk); 0 if not even 2 fit."""
        lo, hi = 0, members // 2  # in +/- pairs
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.peak(2 * mid, min(decode_batch, 2 * mid)) <= budget_bytes:
                lo = mid
            else:
                hi = mid - 1
        return 2 * lo


def balanced_chunk(members: int, budget: int) -> int:
    """Members per UNet call when `members` runs must fit calls of at most `budget`: the
    fewest calls, then equal sizes (60 on a budget of 26: 3 calls of 20, not 26+26+8 with
    18 padded members), rounded up to an even size (a mask's +/- pair stays together)."""
    budget = max(2, budget - budget % 2)
    calls = -(-members // budget)
    chunk = -(-members // calls)
    return min(budget, chunk + chunk % 2)
