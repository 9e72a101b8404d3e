"""Fast vs reference on one image: relative L2 error of the difference maps and label
agreement, per dtype, plus both paths' per-stage timings.

    python -m benchmarks.check_equivalence --skeleton ../shared/model-skeletons/sd21-base \
        --resolution 512 --masks 30 --dtypes float32 bfloat16 float16 --device cuda
    python -m benchmarks.check_equivalence --model tiny --resolution 128 --masks 8   # CPU, seconds

Exits non-zero if any dtype misses its tolerance (fp32: rel. error < 1e-4 and labels agree
on >= 99.9% of pixels; 16-bit: rel. error < 5e-2 and >= 98%: rounding differs between the
paths' summation orders, and 16-bit keeps ~3 significant digits).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from emerdiff_fast import EmerDiff, EmerDiffConfig, load_pipeline
from benchmarks.common import environment, skeleton_path, test_image

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOLERANCE = {"float32": (1e-4, 0.999), "bfloat16": (5e-2, 0.98), "float16": (5e-2, 0.98)}


def compare(pipe, cfg, image, **fast_kwargs) -> dict:
    t0 = time.perf_counter()
    ref = EmerDiff(pipe, cfg, backend="reference")(image)
    t1 = time.perf_counter()
    fast = EmerDiff(pipe, cfg, backend="fast", **fast_kwargs)(image)
    t2 = time.perf_counter()
    d_ref, d_fast = ref.difference_maps, fast.difference_maps
    return {"rel_l2": float(np.linalg.norm(d_fast - d_ref) / np.linalg.norm(d_ref)),
            "label_agreement": float((fast.labels == ref.labels).mean()),
            "reference_s": t1 - t0, "fast_s": t2 - t1,
            "reference_timings": ref.timings, "fast_timings": fast.timings}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="'tiny' or a model source; default: random-init skeleton")
    p.add_argument("--skeleton", default=None)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--masks", type=int, default=30)
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=list(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    cfg = EmerDiffConfig(num_masks=args.masks, resolution=args.resolution)
    image = test_image()
    rows, ok = [], True
    print(json.dumps(environment(args.device)))
    for name in args.dtypes:
        if args.model:
            pipe = load_pipeline(args.model, device=args.device, dtype=DTYPES[name])
        else:
            pipe = load_pipeline(skeleton_path(args.skeleton), device=args.device, dtype=DTYPES[name], random_init=True)
        row = {"dtype": name, **compare(pipe, cfg, image, max_batch=args.max_batch)}
        tol_err, tol_agree = TOLERANCE[name]
        row["pass"] = row["rel_l2"] < tol_err and row["label_agreement"] >= tol_agree
        ok &= row["pass"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del pipe
    print("\n| dtype | rel. L2 error (diff maps) | label agreement | reference s | fast s | pass |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['dtype']} | {r['rel_l2']:.2e} | {100 * r['label_agreement']:.3f}% | {r['reference_s']:.1f} | "
              f"{r['fast_s']:.1f} | {'yes' if r['pass'] else 'NO'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": environment(args.device), "resolution": args.resolution, "masks": args.masks,
                       "rows": rows}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
