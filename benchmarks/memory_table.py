"""Predicted peak device memory of the fast path (emerdiff_fast.memory, traced on meta
tensors: no GPU needed) for SD 1.5 and SD 2.1-base at 512 px in bf16, and the chunk that
engine.ChunkPlan.auto_max_batch would pick on 24, 40 and 80 GB cards.

    python -m benchmarks.memory_table [--resolution 512] [--masks 10 30 40]

Peak = weights (UNet + VAE) + the larger of one UNet call of chunk + 1 members and one VAE
decode of the decode batch. "Free" memory is taken as the card's size minus the weights and
1 GB for the CUDA context and the text encoder (an assumption); auto_max_batch then keeps
to engine.MEMORY_SAFETY of it.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import skeleton_configs
from emerdiff_fast.config import EmerDiffConfig
from emerdiff_fast.engine import DEFAULT_DECODE_BATCH, MEMORY_SAFETY
from emerdiff_fast.memory import MemoryModel, balanced_chunk

CARDS_GB = (24, 40, 80)
CONTEXT_GB = 1.0


def rows(model: str, resolution: int, masks: list[int], dtype=torch.bfloat16) -> list[dict]:
    m = MemoryModel.of(*skeleton_configs(model), resolution, dtype, EmerDiffConfig().modulated_layer)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--masks", type=int, nargs="+", default=[10, 30, 40])
    args = p.parse_args(argv)
    print("| model | K | card | chunk (members per call) | calls per step | UNet call GB | decode GB | "
          "predicted peak GB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for model in ("sd15", "sd21-base"):
        for r in rows(model, args.resolution, args.masks):
            f = (lambda v: f"{v:.2f}" if v is not None else "-")
            print(f"| {r['model']} | {r['K']} | {r['card_gb']} GB | {r['chunk']} | {r['calls_per_step']} | "
                  f"{f(r['unet_call_gb'])} | {f(r['decode_gb'])} | {f(r['predicted_peak_gb'])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
