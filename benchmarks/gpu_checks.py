"""GPU-only checks (issue 18; run by benchmarks/gpu_run.py: int64 in stage b, chunk and
cudagraphs in stage g; alone: `python -m benchmarks.gpu_checks`), each printing one
PASS/FAIL line and writing gpu_checks.json:

1. chunk: under a capped memory budget (so the chunk is below 2K and its choice matters),
   the chunk for images 1 and 2 and for a fresh segmenter made after them (the allocator
   keeps its blocks after image 1; the plan counts them as allocatable) agree, and each
   image's measured activation peak stays within the budget.
3. cudagraphs: compile mode reduce-overhead gives the eager difference maps on two images
   (decode outputs copied out of the graph's static buffers, steps marked).
5. int64: k-means assignment and update with the points' offsets past 2^31 and shared
   attention with P's offsets past 2^31 match PyTorch on the rows with the largest offsets.

`--smoke` runs the same code on the CPU at toy sizes (to keep the script working where no
GPU is).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import time

import numpy as np
import torch


def check_chunk(device, smoke: bool, pipe=None) -> dict:
    """Under a capped memory budget (so the chunk is below 2K and the decision matters), the
    chunk for images 1 and 2 and for a fresh segmenter made after them (allocator warm) is
    the same, and the measured activation peak of an image stays within the budget the
    chunk was chosen for. On the CPU (smoke) the plan's CUDA questions are mocked."""
    from types import SimpleNamespace

    from emerdiff_fast import EmerDiff, EmerDiffConfig, engine, load_pipeline

    from benchmarks.common import square_chunk

    if pipe is None:
        src = "tiny" if smoke else os.path.join(os.environ.get("EMERDIFF_SKELETONS", ".skeletons"), "sd15")
        pipe = load_pipeline(src, device=device, dtype=torch.bfloat16, random_init=not smoke)
    cfg = EmerDiffConfig(num_masks=4 if smoke else 30, resolution=64 if smoke else 512, feature_samples=2)
    two_k, target = 2 * cfg.num_masks, 4 if smoke else 20
    model = engine.ChunkPlan(dict(pipe.unet.config), dict(pipe.vae.config), pipe.unet.dtype, torch.device(device),
                             cfg.modulated_layer).memory_model((cfg.resolution,) * 2)
    cap = model.peak(target, min(target, engine.DEFAULT_DECODE_BATCH)) / engine.MEMORY_SAFETY
    real = engine.allocatable_bytes
    engine.allocatable_bytes = lambda dev: min(real(dev), cap) if not smoke else cap
    try:
        def segmenter():
            seg = EmerDiff(pipe, cfg)
            if smoke:
                seg.chunk_plan.device = SimpleNamespace(type="cuda")
            return seg

        seg, chunks, peaks = segmenter(), [], []
        for i in range(2):
            image = torch.rand(3, cfg.resolution, cfg.resolution, generator=torch.Generator().manual_seed(i))
            if not smoke:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            seg(image)
            chunks.append(square_chunk(seg))
            if not smoke:
                peaks.append(torch.cuda.max_memory_allocated(device) - base)
        fresh = square_chunk(segmenter())  # decided after image 2, allocator warm
    finally:
        engine.allocatable_bytes = real
    within = all(p <= cap for p in peaks)
    return {"ok": chunks[0] == chunks[1] == fresh < two_k and within, "chunks": chunks, "fresh_segmenter": fresh,
            "two_k": two_k, "budget_gb": cap / 1e9, "measured_peak_gb": [p / 1e9 for p in peaks],
            "predicted_peak_gb": model.peak(chunks[0], min(chunks[0], engine.DEFAULT_DECODE_BATCH)) / 1e9}


def check_cudagraphs(device, smoke: bool) -> dict:
    from emerdiff_fast import EmerDiff, EmerDiffConfig, load_pipeline

    pipe = load_pipeline("tiny", device=device)
    cfg = EmerDiffConfig(num_masks=4, resolution=128, feature_samples=2)
    images = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    eager = EmerDiff(pipe, cfg, max_batch=4, decode_batch=2)(images)
    start = time.perf_counter()
    graphed = EmerDiff(pipe, cfg, max_batch=4, decode_batch=2,
                       compile=False if smoke else "reduce-overhead")(images)
    errs = [float(np.abs(g.difference_maps - e.difference_maps).max() / np.abs(e.difference_maps).max())
            for g, e in zip(graphed, eager)]
    return {"ok": max(errs) < 1e-3, "max_rel_err": errs, "seconds_with_compile": time.perf_counter() - start}


INT32_MAX = 2 ** 31 - 1


def check_int64(device, smoke: bool) -> dict:
    """Both offset-heavy kernels on inputs whose element offsets pass 2^31: k-means over 5
    images of 2^19 x 1280 (the last image starts at element 2.7e9) and shared attention
    with 9 heads of 128x128 tokens (1024 px; P holds 2.4e9 elements). The rows with the
    largest offsets are compared with PyTorch; an int32 offset would read other memory.
    Smoke: toy sizes, the same code; the full sizes' offsets are asserted either way."""
    from emerdiff_fast.kernels import kmeans_assign, kmeans_assign_torch, kmeans_update, kmeans_update_torch
    from emerdiff_fast.kernels import shared_attention, shared_attention_torch

    full = {"kmeans": (5, 2 ** 19, 1280, 2, 38), "attention": (9, 128 * 128, 2, 40)}
    b, n, d, r, k = (5, 4000, 64, 2, 38) if smoke else full["kmeans"]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(b, n, d, device=device, generator=g)
    c = torch.randn(b * r, k, d, device=device, generator=g)
    labels, _ = kmeans_assign(x, c)
    last = slice(n - 2048, n)  # the last image's last rows: the largest offsets
    ref, _ = kmeans_assign_torch(x[-1:, last].contiguous(), c[-r:])
    kmeans_ok = float((labels[-r:, last] == ref).float().mean()) > 0.999
    sums, counts = kmeans_update(x, labels, k)
    ref_sums, ref_counts = kmeans_update_torch(x[-1:], labels[-r:], k)
    update_ok = bool(torch.allclose(sums[-r:], ref_sums, rtol=1e-4, atol=1e-2) and torch.equal(counts[-r:], ref_counts))
    del x, c, labels, sums
    heads, tokens, batch, dh = (9, 256, 2, 40) if smoke else full["attention"]
    probs = torch.softmax(torch.randn(heads, tokens, tokens, device=device, dtype=torch.bfloat16, generator=g), -1)
    v = torch.randn(batch, tokens, heads * dh, device=device, dtype=torch.bfloat16, generator=g)
    out = shared_attention(probs, v)
    rows = slice(tokens - 64, tokens)  # the last head's last rows: the largest offsets into P
    ref_out = shared_attention_torch(probs[-1:, rows].contiguous(), v[..., -dh:].contiguous())
    attn_err = float((out[:, rows, -dh:].float() - ref_out.float()).abs().max())
    kb, kn, kd, _, _ = full["kmeans"]
    ah, at, _, _ = full["attention"]
    offsets = {"kmeans_x_full_size": kb * kn * kd - 1, "attention_p_full_size": ah * at * at - 1}
    reach = all(o > INT32_MAX for o in offsets.values())  # the sizes must keep passing 2^31
    return {"ok": kmeans_ok and update_ok and attn_err < 2e-2 and reach, "kmeans_assign_ok": kmeans_ok,
            "kmeans_update_ok": update_ok, "attention_max_abs_err": attn_err, "max_offsets": offsets,
            "sizes_pass_2_31": reach}


CHECKS = {"chunk": check_chunk, "cudagraphs": check_cudagraphs, "int64": check_int64}


def run_checks(device, smoke: bool, names=tuple(CHECKS), **kwargs) -> dict:
    """The named checks (kwargs go to those that take them, e.g. chunk's pipe), each
    reported as it ends; one failing check never hides the others."""
    results = {}
    for name in names:
        fn = CHECKS[name]
        try:
            takes = inspect.signature(fn).parameters
            results[name] = fn(device, smoke, **{k: v for k, v in kwargs.items() if k in takes})
        except Exception as exc:
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"{'PASS' if results[name]['ok'] else 'FAIL'} {name}: {json.dumps(results[name])}", flush=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, toy sizes")
    p.add_argument("--json", default="gpu_checks.json")
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    results = run_checks(device, args.smoke)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
