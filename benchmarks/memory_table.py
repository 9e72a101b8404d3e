"""Predicted peak device memory of the fast path (emerdiff_fast.memory, traced on meta
tensors: no GPU needed) for SD 1.5 and SD 2.1-base (and SDXL base, --models) at 512 px
(--resolution) in bf16, and the chunk that engine.ChunkPlan.auto_max_batch would pick on
24, 40 and 80 GB cards.

    python -m benchmarks.memory_table [--resolution 512] [--masks 10 30 40] [--models sd15 sd21-base sdxl-base]

Peak = weights (UNet + VAE) + the larger of one UNet call of chunk + 1 members and one VAE
decode of the decode batch. "Free" memory is taken as the card's size minus the weights and
1 GB for the CUDA context and the text encoder (an assumption); auto_max_batch then keeps
to engine.MEMORY_SAFETY of it.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import skeleton_configs
from emerdiff_fast.config import default_layers
from emerdiff_fast.engine import DEFAULT_DECODE_BATCH, MEMORY_SAFETY
from emerdiff_fast.memory import MemoryModel, balanced_chunk, meta_models

CARDS_GB = (24, 40, 80)
CONTEXT_GB = 1.0


def rows(model: str, resolution: int, masks: list[int], dtype=torch.bfloat16) -> list[dict]:
    configs = skeleton_configs(model)
    _, modulated = default_layers(meta_models(*configs, dtype)[0])  # the model's default layer
    m = MemoryModel.of(*configs, resolution, dtype, modulated)
    weights = m.weights()
    out = []
    for k in masks:
        members = 2 * k
        for card in CARDS_GB:
            free = card * 1e9 - weights - CONTEXT_GB * 1e9
            budget = m.largest_chunk(MEMORY_SAFETY * free, members, DEFAULT_DECODE_BATCH)
            chunk = balanced_chunk(members, budget) if budget else 0
            decode_batch = min(chunk, DEFAULT_DECODE_BATCH)
            out.append({"model": model, "K": k, "card_gb": card, "chunk": chunk,
                        "calls_per_step": -(-members // chunk) if chunk else None,
                        "unet_call_gb": m.unet_call(chunk + 1) / 1e9 if chunk else None,
                        "decode_gb": m.decode(decode_batch) / 1e9 if chunk else None,
                        "predicted_peak_gb": (weights + m.peak(chunk, decode_batch)) / 1e9 if chunk else None})
    return out


def reference_row(model: str, resolution: int, steps: int = 15, dtype=torch.bfloat16) -> dict:
    """The reference path's peak for one image: weights + the Q and K it records for every
    attention layer at each of the `steps` denoising steps + the larger of one +/- pair
    call (2 members, injecting) and one decode of the pair; traced on meta tensors."""
    from emerdiff_fast.attention import Modulation, ReferenceProcessor, RunState, installed, make_processors
    from emerdiff_fast.conditioning import placeholder
    from emerdiff_fast.config import layer_grid, vae_scale_factor
    from emerdiff_fast.memory import peak_bytes

    configs = skeleton_configs(model)
    unet, vae = meta_models(*configs, dtype)
    _, layer = default_layers(unet)
    side = resolution // vae_scale_factor(vae.config)
    h, w = layer_grid(unet.config, vae.config, (resolution, resolution), layer)
    state = RunState(mode="record", modulated_layer=layer)
    t = torch.tensor(281, device="meta")

    def call(members):
        x = torch.empty(members, unet.config.in_channels, side, side, device="meta", dtype=dtype)
        return unet(x, t, **placeholder(unet.config, (resolution, resolution), dtype).kwargs(members)).sample

    with torch.inference_mode(), installed(unet, make_processors(unet, ReferenceProcessor, state)):
        call(1)
        stored = sum(q.numel() * q.element_size() + k.numel() * k.element_size() for q, k in state.store.values())
        state.mode, state.modulate_now = "inject", True
        state.modulation = Modulation(torch.zeros(2, h * w, device="meta"), torch.zeros(2, dtype=torch.long,
                                      device="meta"), torch.zeros(2, device="meta"))
        pair = peak_bytes(lambda: call(2), [*unet.parameters(), *unet.buffers()])
    m = MemoryModel.of(*configs, resolution, dtype, layer)
    weights = m.weights()
    return {"model": model, "resolution": resolution, "qk_store_gb": stored * steps / 1e9,
            "pair_call_gb": pair / 1e9, "decode_gb": m.decode(2) / 1e9,
            "predicted_peak_gb": (weights + stored * steps + max(pair, m.decode(2))) / 1e9}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--masks", type=int, nargs="+", default=[10, 30, 40])
    p.add_argument("--models", nargs="+", default=["sd15", "sd21-base"],
                   help="skeletons beside the default one (default: sd15 sd21-base; also sdxl-base)")
    args = p.parse_args(argv)
    print("| model | K | card | chunk (members per call) | calls per step | UNet call GB | decode GB | "
          "predicted peak GB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for model in args.models:
        for r in rows(model, args.resolution, args.masks):
            f = (lambda v: f"{v:.2f}" if v is not None else "-")
            print(f"| {r['model']} | {r['K']} | {r['card_gb']} GB | {r['chunk']} | {r['calls_per_step']} | "
                  f"{f(r['unet_call_gb'])} | {f(r['decode_gb'])} | {f(r['predicted_peak_gb'])} |")
    print("\nReference path (one +/- pair per call, Q and K recorded for 15 steps):\n")
    print("| model | Q/K store GB | pair call GB | decode GB | predicted peak GB |")
    print("| --- | --- | --- | --- | --- |")
    for model in args.models:
        r = reference_row(model, args.resolution)
        print(f"| {model} | {r['qk_store_gb']:.2f} | {r['pair_call_gb']:.2f} | {r['decode_gb']:.2f} | "
              f"{r['predicted_peak_gb']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
