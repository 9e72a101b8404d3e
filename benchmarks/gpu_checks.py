"""GPU-only checks of issue 18 (`bash benchmarks/gpu_session.sh gpu18`), each printing one
PASS/FAIL line and writing gpu_checks.json:

1. chunk: the fast path's chunk for images 1 and 2 is the same at SD size (the allocator
   keeps its blocks after image 1; the chunk counts them as allocatable), and a second
   segmenter created after the first agrees.
3. cudagraphs: compile mode reduce-overhead gives the eager difference maps on two images
   (decode outputs copied out of the graph's static buffers, steps marked).
5. int64: k-means assignment with B*R*N*D past 2^31 (a COCO-scale dataset pass, K = 38,
   10 restarts) and shared attention at 1024 px (h*N*M past 2^31) match PyTorch on a slice.

`--smoke` runs the same code on the CPU at toy sizes (to keep the script working where no
GPU is).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


def check_chunk(device, smoke: bool) -> dict:
    from emerdiff_fast import EmerDiff, EmerDiffConfig, load_pipeline

    from benchmarks.common import square_chunk

    src = "tiny" if smoke else os.path.join(os.environ.get("EMERDIFF_SKELETONS", ".skeletons"), "sd15")
    pipe = load_pipeline(src, device=device, dtype=torch.bfloat16, random_init=not smoke)
    cfg = EmerDiffConfig(num_masks=4 if smoke else 30, resolution=64 if smoke else 512, feature_samples=2)
    seg = EmerDiff(pipe, cfg)
    chunks = []
    for i in range(2):
        seg(torch.rand(3, cfg.resolution, cfg.resolution, generator=torch.Generator().manual_seed(i)))
        chunks.append(square_chunk(seg))
    fresh = square_chunk(EmerDiff(pipe, cfg))  # decided after image 2, allocator warm
    return {"ok": chunks[0] == chunks[1] == fresh, "chunks": chunks, "fresh_segmenter": fresh}


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


def check_int64(device, smoke: bool) -> dict:
    from emerdiff_fast.kernels import kmeans_assign, kmeans_assign_torch, shared_attention, shared_attention_torch

    n, d, r, k = (5000, 64, 10, 38) if smoke else (5000 * 38, 1280, 10, 38)  # B*R*N*D = 2.4e9 at full size
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, n, d, device=device, generator=g)
    c = torch.randn(r, k, d, device=device, generator=g)
    labels, _ = kmeans_assign(x, c)
    last = slice(n - 2048, n)  # the rows whose offsets are largest in the last restart
    ref, _ = kmeans_assign_torch(x[:, last].contiguous(), c)
    kmeans_ok = float((labels[:, last] == ref).float().mean()) > 0.999
    heads, tokens, b, dh = (2, 256, 2, 40) if smoke else (8, 128 * 128, 2, 40)  # 1024 px, 64x64 latent level
    probs = torch.softmax(torch.randn(heads, tokens, tokens, device=device, dtype=torch.bfloat16, generator=g), -1)
    v = torch.randn(b, tokens, heads * dh, device=device, dtype=torch.bfloat16, generator=g)
    out = shared_attention(probs, v)
    rows = slice(tokens - 64, tokens)
    ref_out = shared_attention_torch(probs[:, rows].contiguous(), v)
    attn_err = float((out[:, rows].float() - ref_out.float()).abs().max())
    return {"ok": kmeans_ok and attn_err < 2e-2, "kmeans_agreement_ok": kmeans_ok, "attention_max_abs_err": attn_err,
            "kmeans_elements": r * n * d}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, toy sizes")
    p.add_argument("--json", default="gpu_checks.json")
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    results = {}
    for name, fn in (("chunk", check_chunk), ("cudagraphs", check_cudagraphs), ("int64", check_int64)):
        try:
            results[name] = fn(device, args.smoke)
        except Exception as exc:  # one failing check must not hide the others
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"{'PASS' if results[name]['ok'] else 'FAIL'} {name}: {json.dumps(results[name])}", flush=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
