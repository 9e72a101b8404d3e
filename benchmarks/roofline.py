"""A performance model of one image, from FLOPs and bytes counted on meta tensors.

Every aten op of the fast and reference paths' UNet calls, VAE decodes and encode (the
real modules and processors, built from the model's configs on the meta device: no
weights, no device) is recorded with its FLOPs (torch.utils.flop_counter's formulas) and
the bytes it moves. Two byte counts: "eager" (every op reads its inputs and writes its
outputs) and "fused" (pointwise ops cost nothing, assumed fused into their neighbours, as
torch.compile's inductor does; reductions, normalisations, softmax, copies and the
matmuls keep their bytes). Per op, time = max(FLOPs / (peak * compute efficiency),
bytes / (bandwidth * memory efficiency)); the image's time is the sum.

This is a model, not a measurement: its assumptions are the DEVICES table and the
efficiencies below; benchmarks/waterfall.py on a GPU is what checks it. Not modelled:
k-means (tiny), kernel launch overheads and host gaps (the fast path has few, large
launches; the reference path many more), cuDNN algorithm choice.

    python -m benchmarks.roofline [--model sd21-base|sd15|sdxl-base|tiny] [--resolution 512] [--masks 30]
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from benchmarks.common import skeleton_configs

# Dense bf16 tensor-core peak (TFLOP/s, fp32 accumulate) and HBM/GDDR bandwidth (TB/s) from
# the vendors' data sheets.
DEVICES = {
    "H100 SXM": {"tflops": 989.0, "tbps": 3.35},
    "H200 SXM": {"tflops": 989.0, "tbps": 4.8},  # H100's compute, faster and larger HBM3e
    "A100 80GB SXM": {"tflops": 312.0, "tbps": 2.04},
    "L4": {"tflops": 121.0, "tbps": 0.30},
    "RTX 4090": {"tflops": 165.2, "tbps": 1.01},
}
# Assumed efficiencies (choice): large cuBLAS/cuDNN GEMMs and convolutions reach ~60% of
# the dense peak (an 8192^3 bf16 matmul measures ~800 of 989 TFLOP/s on an H100, docs/gpu.md,
# and the UNet's GEMMs are smaller); memory-bound kernels ~75% of peak bandwidth.
COMPUTE_EFFICIENCY = 0.6
MEMORY_EFFICIENCY = 0.75


@dataclass
class OpStats:
    calls: int = 0
    flops: float = 0.0
    bytes_eager: float = 0.0
    bytes_fused: float = 0.0


@dataclass
class Trace:
    ops: dict = field(default_factory=lambda: defaultdict(OpStats))

    def add(self, other: "Trace", times: float = 1.0) -> "Trace":
        for name, s in other.ops.items():
            t = self.ops[name]
            t.calls += s.calls * times
            t.flops += s.flops * times
            t.bytes_eager += s.bytes_eager * times
            t.bytes_fused += s.bytes_fused * times
        return self

    def totals(self) -> dict:
        return {k: sum(getattr(s, k) for s in self.ops.values()) for k in ("flops", "bytes_eager", "bytes_fused")}

    def seconds(self, device: dict, fused: bool, launch_s: float = 0.0) -> float:
        """Modelled seconds; launch_s > 0 adds a floor per op call (launch-bound small models)."""
        peak, bw = device["tflops"] * 1e12 * COMPUTE_EFFICIENCY, device["tbps"] * 1e12 * MEMORY_EFFICIENCY
        return sum(max(s.flops / peak, (s.bytes_fused if fused else s.bytes_eager) / bw, s.calls * launch_s)
                   for s in self.ops.values())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CountOps(TorchDispatchMode):
    """Records FLOPs and bytes per aten op (per call summed under the op's name)."""

    def __init__(self):
        super().__init__()
        self.trace = Trace()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # composite aten ops (linear, conv2d): count their parts. Only aten's: decomposing this
        # project's custom ops here corrupted memory (vector::reserve errors, segfaults)
        if func.namespace == "aten" and func._overloadpacket not in flop_registry:
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        in_storages = {t.untyped_storage()._cdata for t in ins}
        if outs and all(t.untyped_storage()._cdata in in_storages for t in outs):
            return out  # a view (or in-place op on its input's storage): nothing moved as such
        packet = func._overloadpacket
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        moved = sum(map(_nbytes, ins)) + sum(map(_nbytes, outs))
        s = self.trace.ops[str(packet).removeprefix("aten.")]
        s.calls += 1
        s.flops += flops
        s.bytes_eager += moved
        s.bytes_fused += 0 if torch.Tag.pointwise in func.tags else moved
        return out


def count(fn) -> Trace:
    with torch.inference_mode(), CountOps() as mode:
        fn()
    return mode.trace


def meta_models(model: str, dtype: torch.dtype):
    """UNet and VAE of a skeleton (sd21-base, sd15, sdxl-base) or the tiny model, on the meta device."""
    from emerdiff_fast import memory

    if model == "tiny":
        from emerdiff_fast.loading import tiny_pipeline

        pipe = tiny_pipeline()
        return memory.meta_models(pipe.unet.config, pipe.vae.config, dtype)
    return memory.meta_models(*skeleton_configs(model), dtype)


def image_traces(unet, vae, resolution: int, num_masks: int, feature_samples: int = 8, steps: int = 15,
                 decode_batch: int = 8) -> dict[str, Trace]:
    """Per-image traces of the fast path (one chunk of all 2K members, step-0 prefix
    sharing) and the reference path."""
    from emerdiff_fast.attention import (Modulation, ReferenceProcessor, RunState, SharedProcessor, installed,
                                         make_processors)
    from emerdiff_fast.conditioning import placeholder
    from emerdiff_fast.config import default_layers, layer_grid, vae_scale_factor
    from emerdiff_fast.prefix import PrefixState, prefix_hooks

    dt, (_, layer) = unet.dtype, default_layers(unet)
    side, members = resolution // vae_scale_factor(vae.config), 2 * num_masks + 1
    h, w = layer_grid(unet.config, vae.config, (resolution, resolution), layer)
    n = h * w  # positions of the modulated layer
    cond = placeholder(unet.config, (resolution, resolution), dt)
    t = torch.tensor(281, device="meta")

    def latents(b):
        return torch.empty(b, unet.config.in_channels, side, side, device="meta", dtype=dt)

    def modulation(b):
        return Modulation(torch.zeros(num_masks, n, device="meta"), torch.zeros(b, dtype=torch.long, device="meta"),
                          torch.zeros(b, device="meta"))

    def call(b):
        return lambda: unet(latents(b), t, **cond.kwargs(b))

    shared = RunState(mode="shared", modulated_layer=layer, modulation=modulation(members))
    prefix = PrefixState()
    with installed(unet, make_processors(unet, SharedProcessor, shared)), prefix_hooks(unet, layer, prefix):
        shared.modulate_now, prefix.width = True, members
        step0 = count(call(1))
        shared.modulate_now, prefix.width = False, 0
        step = count(call(members))
    record = RunState(mode="record", modulated_layer=layer)
    with installed(unet, make_processors(unet, ReferenceProcessor, record)):
        ref_run = count(call(1))
        record.mode, record.modulation, record.modulate_now = "inject", modulation(2), True
        pair = count(call(2))
    feature = count(call(feature_samples))  # an upper bound: the real call stops at the feature layer
    decode = count(lambda: vae.decode(torch.empty(decode_batch, vae.config.latent_channels, side, side,
                                                  device="meta", dtype=dt)))
    encode = count(lambda: vae.encode(torch.empty(1, 3, resolution, resolution, device="meta", dtype=dt)))
    common = Trace().add(encode).add(feature)
    fast = Trace().add(common).add(step0).add(step, steps - 1).add(decode, 2 * num_masks / decode_batch)
    reference = (Trace().add(common).add(ref_run, steps).add(pair, num_masks * steps)
                 .add(decode, 2 * num_masks / decode_batch))
    return {"fast": fast, "reference": reference}


def report(model: str, resolution: int, num_masks: int, dtype=torch.bfloat16) -> dict:
    unet, vae = meta_models(model, dtype)
    traces = image_traces(unet, vae, resolution, num_masks)
    out = {"model": model, "resolution": resolution, "masks": num_masks, "dtype": str(dtype).removeprefix("torch."),
           "assumptions": {"compute_efficiency": COMPUTE_EFFICIENCY, "memory_efficiency": MEMORY_EFFICIENCY,
                           "devices": DEVICES},
           "paths": {}}
    for path, tr in traces.items():
        tot = tr.totals()
        out["paths"][path] = {"tflop": tot["flops"] / 1e12, "gb_eager": tot["bytes_eager"] / 1e9,
                              "gb_fused": tot["bytes_fused"] / 1e9,
                              "seconds": {d: {"eager": tr.seconds(spec, False), "fused": tr.seconds(spec, True)}
                                          for d, spec in DEVICES.items()}}
    h100 = DEVICES["H100 SXM"]
    peak, bw = h100["tflops"] * 1e12 * COMPUTE_EFFICIENCY, h100["tbps"] * 1e12 * MEMORY_EFFICIENCY
    top = sorted(traces["fast"].ops.items(), key=lambda kv: -max(kv[1].flops / peak, kv[1].bytes_eager / bw))[:10]
    out["top_ops_fast_eager_h100"] = [
        {"op": k, "calls": s.calls, "tflop": s.flops / 1e12, "gb": s.bytes_eager / 1e9,
         "seconds": max(s.flops / peak, s.bytes_eager / bw)} for k, s in top]
    return out


def markdown(r: dict) -> str:
    lines = [f"Performance model: {r['model']}, {r['resolution']} px, K = {r['masks']}, {r['dtype']} "
             f"(compute at {COMPUTE_EFFICIENCY:.0%} of peak, memory at {MEMORY_EFFICIENCY:.0%} of bandwidth)", "",
             "| path | TFLOP | GB moved (eager / fused) | " + " | ".join(f"{d} s/img" for d in DEVICES) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in DEVICES) + " |"]
    for path, label in (("reference", "reference, eager"), ("fast", "fast, eager"), ("fast", "fast, compiled (fused)")):
        p = r["paths"][path]
        kind = "fused" if "fused" in label else "eager"
        lines.append(f"| {label} | {p['tflop']:.0f} | {p['gb_eager']:.0f} / {p['gb_fused']:.0f} | "
                     + " | ".join(f"{p['seconds'][d][kind]:.2f}" for d in DEVICES) + " |")
    lines += ["", "Top ops, fast path, eager, H100 SXM:", "", "| op | calls | TFLOP | GB | modelled s |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {o['op']} | {o['calls']:.0f} | {o['tflop']:.1f} | {o['gb']:.1f} | {o['seconds']:.3f} |"
              for o in r["top_ops_fast_eager_h100"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd21-base", help="sd21-base, sd15, sdxl-base (skeletons) or tiny")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--masks", type=int, default=30)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = report(args.model, args.resolution, args.masks)
    print(json.dumps(r, indent=1) if args.json else markdown(r))
    return 0 if all(math.isfinite(v["tflop"]) for v in r["paths"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
