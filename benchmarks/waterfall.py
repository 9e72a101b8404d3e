"""The waterfall: the reference path, then the fast path with its techniques switched on
one at a time, each row timed on the same image and model, plus a memory sweep over the
chunk size and a profile of one denoising step.

    python -m benchmarks.waterfall                      # tiny model, CPU, a few minutes
    python -m benchmarks.waterfall --full               # full-size random-init SD 2.1-base, 512 px, K=30
    python -m benchmarks.waterfall --full --skeleton DIR --resolution 256 --masks 4

Every row reports median seconds per image (after one untimed warm-up; compile time is
that warm-up minus the median, reported apart), images per hour, peak memory (CUDA
allocator peak; on the CPU the process's peak resident set), MFU = the compute floor's
FLOPs (docs/gpu.md), counted with torch.utils.flop_counter on this model, / (seconds x the measured peak
matmul rate), the FLOPs the row actually executed (counted in its warm-up; not for compiled
rows), and label agreement with the reference row. Results go to
benchmarks/results/<date>-<device>.json and a readable table is appended to
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from emerdiff_fast import EmerDiff, EmerDiffConfig
from emerdiff_fast.attention import installed
from emerdiff_fast.config import vae_scale_factor
from emerdiff_fast.engine import FastOptions
from emerdiff_fast.sampling import ReverseSchedule

from .common import (bench_pipeline, count_flops, demo_modulation, environment, floor_flops, peak_matmul_tflops,
                     peak_memory_gb, reset_peak_memory, skeleton_path, square_chunk, test_image, time_calls)

HERE = Path(__file__).parent
NO_TECHNIQUE = FastOptions(share_attention=False, reuse_cross_attention=False, triton_modulation=False,
                           triton_kmeans=False, prefix_sharing=False)


@dataclass(frozen=True)
class Step:
    """One row: the settings in force (cumulative over the rows above it)."""

    name: str
    backend: str = "fast"
    options: FastOptions = NO_TECHNIQUE
    dtype: str = "float32"
    compile: bool = False
    compile_decode: bool = False
    max_batch: int | None = None  # None: the engine's default (all members on CPU, memory estimate on CUDA)


def steps() -> list[Step]:
    rows = [Step("reference path", backend="reference"), Step("+ batching (all +/- runs per batch, replayed P)")]
    rows.append(replace(rows[-1], name="+ shared attention injection", options=replace(rows[-1].options, share_attention=True)))
    rows.append(replace(rows[-1], name="+ cross-attention reuse", options=replace(rows[-1].options, reuse_cross_attention=True)))
    rows.append(replace(rows[-1], name="+ Triton modulation", options=replace(rows[-1].options, triton_modulation=True)))
    rows.append(replace(rows[-1], name="+ Triton k-means", options=replace(rows[-1].options, triton_kmeans=True)))
    rows.append(replace(rows[-1], name="+ step-0 prefix sharing", options=replace(rows[-1].options, prefix_sharing=True)))
    rows.append(replace(rows[-1], name="+ Triton shared-P attention", options=replace(rows[-1].options, triton_attention=True)))
    rows.append(replace(rows[-1], name="+ bf16", dtype="bfloat16"))
    rows.append(replace(rows[-1], name="+ channels_last", options=replace(rows[-1].options, channels_last=True)))
    rows.append(replace(rows[-1], name="+ torch.compile (UNet)", compile=True))
    rows.append(replace(rows[-1], name="+ compiled VAE decode (static batch)", compile_decode=True))
    return rows  # the chunk-size row is appended after the memory sweep picks the chunk


@dataclass
class Row:
    name: str
    median_s_per_image: float
    images_per_hour: float
    peak_mem_gb: float | None
    mfu: float
    label_agreement: float
    executed_tflop: float | None
    compile_s: float | None
    dtype: str
    chunk: int | None
    rounds_s: list[float] = field(default_factory=list)


def warm_up(seg: EmerDiff, image, count: bool):
    """The untimed first call: (result, TFLOP it executed, or None when not counted). The
    fast path's chunk is decided first, outside the FLOP counter: on CUDA deciding it traces
    the memory model on meta tensors, whose ops the counter would otherwise add."""
    if seg.fast is not None:
        square_chunk(seg)
    if not count:
        return seg(image), None
    flops, result = count_flops(lambda: seg(image))
    return result, flops / 1e12


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.image = test_image()
        self.config = EmerDiffConfig(num_masks=args.masks, resolution=args.resolution)
        self.pipe = bench_pipeline(args.full, self.device, torch.float32, args.skeleton)
        self.pipe_dtype = "float32"
        self.channels_last = False
        self.n_steps = len(ReverseSchedule.build(self.pipe.scheduler.config, self.config))
        self.floor = floor_flops(self.pipe, args.resolution, args.masks, self.n_steps)
        self.peak_rates = peak_matmul_tflops(self.device)
        self.peak_tflops = args.peak_tflops or max(self.peak_rates.values())
        self.reference_labels = None

    def segmenter(self, step: Step) -> EmerDiff:
        if step.dtype != self.pipe_dtype:  # convert in place: one copy of the weights at a time
            self.pipe.to(dtype=getattr(torch, step.dtype))
            self.pipe_dtype = step.dtype
        if step.backend != "fast":
            return EmerDiff(self.pipe, self.config, backend=step.backend)
        self.channels_last |= step.options.channels_last
        return EmerDiff(self.pipe, self.config, backend="fast", options=step.options,
                        compile=step.compile, compile_decode=step.compile_decode, max_batch=step.max_batch)

    def run_fitting(self, step: Step, rounds: int) -> Row:
        """run(), halving the chunk after an out-of-memory error (the replayed-P row keeps a
        per-member copy of every probability matrix, so it fits fewer members)."""
        while True:
            try:
                return self.run(step, rounds)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                chunk = square_chunk(self.segmenter(step))
                if step.backend != "fast" or chunk <= 2:
                    raise
                step = replace(step, max_batch=max(2, chunk // 2))
                print(f"{step.name}: out of memory, retrying with chunk {step.max_batch}", flush=True)

    def run(self, step: Step, rounds: int) -> Row:
        seg = self.segmenter(step)
        t0 = time.perf_counter()
        result, executed = warm_up(seg, self.image, count=not step.compile)  # FLOPs in eager rows only
        warm_s = time.perf_counter() - t0
        reset_peak_memory(self.device)
        times = time_calls(lambda: seg(self.image), self.device, rounds)
        median = statistics.median(times)
        if self.reference_labels is None:
            self.reference_labels = result.labels
        chunk = square_chunk(seg) if step.backend == "fast" else None
        return Row(name=step.name, median_s_per_image=median, images_per_hour=3600 / median,
                   peak_mem_gb=peak_memory_gb(self.device),
                   mfu=self.floor["floor_tflop"] / (median * self.peak_tflops),
                   label_agreement=float((result.labels == self.reference_labels).mean()),
                   executed_tflop=executed, compile_s=max(0.0, warm_s - median) if step.compile else None,
                   dtype=step.dtype, chunk=chunk, rounds_s=times)

    def sweep(self, step: Step, chunks: list[int], budgets: list[float], rounds: int) -> dict:
        """Peak memory and seconds per image for each chunk (modulated members per batch,
        plus the reference member); the largest chunk under each budget."""
        points = []
        for chunk in chunks:
            try:
                row = self.run(replace(step, name=f"chunk {chunk}", max_batch=chunk, compile=False,
                                       compile_decode=False), rounds)
            except torch.OutOfMemoryError:
                points.append({"chunk": chunk, "oom": True})
                torch.cuda.empty_cache()
                break
            points.append({"chunk": chunk, "median_s_per_image": row.median_s_per_image,
                           "peak_mem_gb": row.peak_mem_gb, "label_agreement": row.label_agreement})
            print(json.dumps(points[-1]), flush=True)
        fits = {}
        for budget in budgets:
            ok = [p for p in points if not p.get("oom") and p["peak_mem_gb"] is not None and p["peak_mem_gb"] <= budget]
            fits[str(budget)] = max(ok, key=lambda p: p["chunk"]) if ok else None
        return {"points": points, "largest_chunk_under_budget_gb": fits}

    @torch.inference_mode()
    def profile_step(self, step: Step, chunk: int, top: int = 15) -> str:
        """torch.profiler table of one modulated denoising step of the fast path (eager)."""
        from torch.profiler import ProfilerActivity, profile

        seg = self.segmenter(replace(step, compile=False, compile_decode=False, max_batch=chunk))
        cfg, dev = self.config, self.device
        lat = cfg.resolution // vae_scale_factor(seg.vae.config)
        state = seg.fast.state
        x = torch.randn(chunk + 1, seg.unet.config.in_channels, lat, lat, device=dev, dtype=seg.dtype)
        cond = seg.cond_at((cfg.resolution, cfg.resolution)).kwargs(chunk + 1)
        t = torch.tensor(cfg.t_modulate, device=dev)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with installed(seg.unet, seg.fast.processors):
            state.modulation, state.step, state.modulate_now = demo_modulation(seg, chunk + 1), 0, True
            for _ in range(2):  # warm-up
                seg.unet(x, t, **cond)
            with profile(activities=activities) as prof:
                seg.unet(x, t, **cond)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            state.modulation = None
        key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        return prof.key_averages().table(sort_by=key, row_limit=top)


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    env, m = report["env"], report["model"]
    lines = [f"\n## Waterfall: {env['device']}, {report['date']}, commit {env['commit']}\n",
             f"Model {m['name']}, {report['resolution']} px, K = {report['num_masks']}, {report['n_steps']} denoising "
             f"steps; torch {env['torch']}, triton {env['triton']}, diffusers {env['diffusers']}. "
             f"Floor {report['floor']['floor_tflop']:.3f} TFLOP per image (UNet {report['floor']['unet_gflop']:.1f}, "
             f"VAE decode {report['floor']['vae_decode_gflop']:.1f}, encode {report['floor']['vae_encode_gflop']:.1f} "
             f"GFLOP per call, counted on this model); peak rate {report['peak_tflops']:.3g} TFLOP/s (measured matmul: "
             + ", ".join(f"{k} {v:.3g}" for k, v in report["peak_rates_tflops"].items()) + ").\n",
             *(["On the CPU the Triton rows run the ops' PyTorch fallbacks (Triton kernels run natively on "
                "CUDA only), so those rows differ by run-to-run noise; the CPU has no fast bf16 matmul, and "
                "its peak memory is the process's peak resident set.\n"] if env["device"].startswith("CPU") else []),
             "| technique (cumulative) | s / image (median) | images / h | peak mem GB | MFU | executed TFLOP | "
             "label agreement | chunk | compile s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        lines.append(f"| {r['name']} | {r['median_s_per_image']:.3f} | {r['images_per_hour']:.0f} | "
                     f"{_fmt(r['peak_mem_gb'], '.2f')} | {100 * r['mfu']:.2f}% | {_fmt(r['executed_tflop'], '.3f')} | "
                     f"{100 * r['label_agreement']:.2f}% | {_fmt(r['chunk'], 'd')} | {_fmt(r['compile_s'], '.1f')} |")
    sweep = report.get("memory_sweep")
    if sweep:
        lines += ["", "Memory sweep (" + sweep["settings"] + "):", "",
                  "| chunk | s / image | peak mem GB |", "| --- | --- | --- |"]
        for p in sweep["points"]:
            lines.append(f"| {p['chunk']} | OOM | - |" if p.get("oom") else
                         f"| {p['chunk']} | {p['median_s_per_image']:.3f} | {_fmt(p['peak_mem_gb'], '.2f')} |")
        lines += ["", "| budget GB | largest chunk | s / image |", "| --- | --- | --- |"]
        for budget, p in sweep["largest_chunk_under_budget_gb"].items():
            lines.append(f"| {budget} | {p['chunk'] if p else 'none fits'} | "
                         f"{p['median_s_per_image']:.3f} |" if p else f"| {budget} | none fits | - |")
    if report.get("profile"):
        lines += ["", "Profile of one modulated denoising step (fast path, eager, top kernels by self time):", "",
                  "```", report["profile"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="full-size random-init SD 2.1-base from a skeleton folder")
    p.add_argument("--skeleton", default=None, help="skeleton folder (default $EMERDIFF_SKELETONS/sd21-base, "
                                                    "else the shared model-skeletons/sd21-base beside the checkout)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolution", type=int, default=None, help="default 512 with --full, else 128")
    p.add_argument("--masks", type=int, default=None, help="default 30 with --full, else 8")
    p.add_argument("--rounds", type=int, default=3, help="timed calls per row (median reported)")
    p.add_argument("--chunks", type=int, nargs="+", default=None,
                   help="memory sweep chunk sizes (default 2, 4, 8, ... up to 2K)")
    p.add_argument("--budgets", type=float, nargs="+", default=[24, 40, 80], help="memory budgets in GB")
    p.add_argument("--sweep-rounds", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=None, help="override the measured peak rate")
    p.add_argument("--skip", nargs="*", default=[], help="row names to leave out (e.g. '+ torch.compile')")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--results-md", default=str(HERE / "RESULTS.md"), help="append the table here ('' to skip)")
    args = p.parse_args(argv)
    args.resolution = args.resolution or (512 if args.full else 128)
    args.masks = args.masks or (30 if args.full else 8)
    bench = Bench(args)
    env = environment(args.device)
    print(json.dumps({"env": env, "floor": bench.floor, "peak_rates_tflops": bench.peak_rates}), flush=True)

    rows, last = [], None
    for step in steps():
        if step.name in args.skip:
            continue
        rows.append(bench.run_fitting(step, args.rounds))
        last = step
        print(json.dumps(asdict(rows[-1])), flush=True)

    two_k = 2 * args.masks
    chunks = args.chunks or sorted({c for c in (2, 4, 8, 12, 16, 24, 32, 48, 64) if c < two_k} | {two_k})
    sweep = bench.sweep(replace(last, compile=False, compile_decode=False), chunks, args.budgets, args.sweep_rounds)
    sweep["settings"] = f"{last.dtype}, channels_last={bench.channels_last}, eager, {args.sweep_rounds} timed rounds"
    fitting = [q for q in sweep["points"] if not q.get("oom")]
    best = min(fitting, key=lambda q: q["median_s_per_image"])["chunk"]
    if "+ chunk size" not in args.skip:
        rows.append(bench.run_fitting(replace(last, name=f"+ chunk size {best} (fastest in the sweep)",
                                              max_batch=best), args.rounds))
        print(json.dumps(asdict(rows[-1])), flush=True)
    profile = None if args.no_profile else bench.profile_step(last, best)
    if profile:
        print(profile)

    date = datetime.date.today().isoformat()
    report = {"date": date, "env": env, "device": env["device"],
              "versions": {k: env[k] for k in ("torch", "triton", "diffusers")}, "commit": env["commit"],
              "model": {"name": f"sd21-base skeleton, random init ({skeleton_path(args.skeleton)})" if args.full
                        else "tiny (random init)"},
              "resolution": args.resolution, "num_masks": args.masks, "n_steps": bench.n_steps,
              "dtype": last.dtype, "floor": bench.floor, "peak_rates_tflops": bench.peak_rates,
              "peak_tflops": bench.peak_tflops, "rows": [asdict(r) for r in rows], "memory_sweep": sweep,
              "profile": profile}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    path = out / f"{date}-{slug}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    table = markdown(report)
    print(table)
    if args.results_md:
        with open(args.results_md, "a") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
