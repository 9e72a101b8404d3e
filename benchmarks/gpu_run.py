"""The one GPU session (`bash benchmarks/gpu_session.sh`): stages in order of value, each
printing its estimated seconds (benchmarks/gpu_plan.json, from the performance model)
before it starts and writing OUT/<stage>.json the moment it ends, so a kill at any point
keeps every finished stage. A stage whose estimate exceeds the time left is skipped and
recorded as skipped; the optional side rows (the slow compile modes) run only when they
and every later stage fit.

  a-env            GPU, memory, driver, versions, measured bf16 matmul rate (the MFU denominator)
  b-correctness    SD 2.1-base skeleton, 512 px, K = 30: fast bf16 vs reference fp32 (relative
                   error of the difference maps, label agreement); kernel tests natively on
                   CUDA; kernels with offsets past 2^31
  c-headline       reference, fast eager, fast compiled (bf16, shipped FastOptions): median
                   s/image over 3 images after warm-up, compile apart, peak memory beside the
                   memory model's prediction, MFU against the floor, speed-up
  d-side           triton_attention, channels_last, presets grid25 and fastest, K = 10; then, with
                   time to spare, compile modes reduce-overhead and max-autotune-no-cudagraphs
  e-mini           the shipped mini model in bf16 on 100 held-out scenes: many-to-one mIoU, s/scene
  f-hyperfeatures  SD 1.5 skeleton, 512 px: extraction s/image, all steps and one step
  g-checks         the chunk under a capped budget, CUDA-graph replay (benchmarks/gpu_checks.py)

    python -m benchmarks.gpu_run --out DIR [--budget-s 480] [--started EPOCH]
    python -m benchmarks.gpu_run --dry-run --out DIR     # the same code, CPU, tiny model, toy sizes
    python -m benchmarks.gpu_run --table DIR [--results-md benchmarks/RESULTS.md]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks.gpu_plan import OPTIONAL_ROWS, load_plan

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Session:
    """What the stages share: settings (full size or toy), the clock, loaded models, results."""

    out: Path
    dry_run: bool
    budget_s: float
    started: float
    plan: dict
    device: torch.device = field(init=False)
    pipes: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)

    def __post_init__(self):
        self.device = torch.device("cpu" if self.dry_run else "cuda")
        dry = self.dry_run
        self.resolution, self.masks = (64, 2) if dry else (512, 30)
        self.timed_images = 1 if dry else 3
        self.mini_scenes = 2 if dry else 100

    def left(self) -> float:
        return self.budget_s - (time.time() - self.started)

    def estimate(self, stage: str) -> float:
        return self.plan["stages"][stage]["seconds"]

    def later(self, stage: str) -> float:
        """Estimated seconds of the stages after `stage`."""
        names = list(self.plan["stages"])
        return sum(self.estimate(n) for n in names[names.index(stage) + 1:])

    def pipeline(self, model: str, dtype: torch.dtype):
        """A full-size random-init skeleton (sd21-base, sd15), or the tiny model in a dry run;
        kept for later stages (one copy of the weights per model, converted in place)."""
        from emerdiff_fast import load_pipeline

        if model not in self.pipes:
            if self.dry_run:
                self.pipes[model] = load_pipeline("tiny", device=self.device, dtype=dtype)
            else:
                root = Path(os.environ.get("EMERDIFF_SKELETONS", ROOT / ".skeletons")) / model
                self.pipes[model] = load_pipeline(root, random_init=True, device=self.device, dtype=dtype)
        pipe = self.pipes[model]
        if pipe.unet.dtype != dtype:
            pipe.to(dtype=dtype)
        return pipe

    def images(self, n: int) -> list[torch.Tensor]:
        """Seeded smooth random images at the processing size (no data set on the GPU machine)."""
        r = self.resolution
        out = []
        for i in range(n):
            low = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(100 + i))
            out.append(torch.nn.functional.interpolate(low[None], size=(r, r), mode="bicubic")[0].clamp(0, 1))
        return out

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


# ---- stages -----------------------------------------------------------------------------
def stage_env(s: Session) -> dict:
    from benchmarks.common import environment, peak_matmul_tflops

    env = environment(s.device)
    if s.device.type == "cuda":
        props = torch.cuda.get_device_properties(s.device)
        env.update(memory_gb=props.total_memory / 1e9, capability=f"{props.major}.{props.minor}",
                   cuda=torch.version.cuda)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    import transformers

    env["transformers"] = transformers.__version__
    rates = peak_matmul_tflops(s.device)
    s.results["peak_tflops"] = rates["bfloat16"]
    return {"env": env, "matmul_tflops": rates, "mfu_denominator_tflops": rates["bfloat16"]}


def stage_correctness(s: Session) -> dict:
    from emerdiff_fast import EmerDiff, EmerDiffConfig

    from benchmarks.check_equivalence import TOLERANCE, _rel_l2
    from benchmarks.gpu_checks import run_checks

    out = {}
    cfg = EmerDiffConfig(num_masks=s.masks, resolution=s.resolution)
    image = s.images(1)[0]
    pipe = s.pipeline("sd21-base", torch.float32)
    t0 = time.perf_counter()
    ref = EmerDiff(pipe, cfg, backend="reference")(image)
    ref_s = time.perf_counter() - t0
    pipe = s.pipeline("sd21-base", torch.bfloat16)
    t0 = time.perf_counter()
    fast = EmerDiff(pipe, cfg)(image)
    fast_s = time.perf_counter() - t0
    s.results["fast_bf16_labels"] = fast.labels
    rel = _rel_l2(fast.difference_maps, ref.difference_maps)
    agree = float((fast.labels == ref.labels).mean())
    tol_err, tol_agree = TOLERANCE["bfloat16"]
    out["equivalence"] = {"fast": "bfloat16", "reference": "float32", "rel_l2": rel, "label_agreement": agree,
                          "tolerance": {"rel_l2": tol_err, "label_agreement": tol_agree},
                          "pass": rel < tol_err and agree >= tol_agree, "reference_s": ref_s, "fast_s": fast_s}
    print(json.dumps(out["equivalence"]), flush=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if s.dry_run:  # on the CPU the kernels run under Triton's interpreter; on CUDA natively
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels"]
    if s.dry_run:  # the interpreter is slow: the fast cases only (the full files run in CI)
        cmd += ["-k", "fake or mismatch or kill"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    summary = (r.stdout.strip().splitlines() or [""])[-1]
    out["kernel_tests"] = {"rc": r.returncode, "summary": summary, "native": s.device.type == "cuda",
                           "seconds": time.perf_counter() - t0, "tail": r.stdout[-1500:] if r.returncode else ""}
    print(f"kernel tests: {summary}", flush=True)
    out["int64"] = run_checks(s.device, s.dry_run, names=("int64",))["int64"]
    out["pass"] = (out["equivalence"]["pass"] and r.returncode == 0 and out["int64"]["ok"])
    return out


def timed_row(s: Session, name: str, pipe, cfg, *, backend="fast", options=None, compile=False,
              reference_labels=None) -> dict:
    """One untimed warm-up image (compile included), then s.timed_images images: median
    seconds per image (CUDA events), peak memory beside the memory model's prediction, MFU."""
    from emerdiff_fast import EmerDiff

    from benchmarks.common import floor_flops, peak_memory_gb, reset_peak_memory, square_chunk, time_calls
    from benchmarks.waterfall import warm_up

    images = s.images(1 + s.timed_images)
    kwargs = {} if backend != "fast" else {"options": options, "compile": compile}
    seg = EmerDiff(pipe, cfg, backend=backend, **kwargs)
    s.sync()
    t0 = time.perf_counter()
    warm, _ = warm_up(seg, images[0], count=False)  # the chunk is decided first, then the warm-up call
    s.sync()
    warm_s = time.perf_counter() - t0
    reset_peak_memory(s.device)
    weights = torch.cuda.memory_allocated(s.device) if s.device.type == "cuda" else None
    times = [time_calls(lambda im=im: seg(im), s.device, 1)[0] for im in images[1:]]
    median = statistics.median(times)
    n_steps = len(seg.schedule)
    floor = floor_flops(pipe, cfg.resolution, cfg.num_masks, n_steps)
    row = {"name": name, "backend": backend, "compile": compile or None, "median_s_per_image": median,
           "times_s": times, "compile_s": max(0.0, warm_s - median) if compile else None, "warm_up_s": warm_s,
           "peak_mem_gb": peak_memory_gb(s.device), "chunk": square_chunk(seg) if backend == "fast" else None,
           "floor_tflop": floor["floor_tflop"],
           "mfu": floor["floor_tflop"] / (median * s.results["peak_tflops"]) if s.results.get("peak_tflops") else None}
    if backend == "fast":
        chunk = square_chunk(seg)
        model = seg.chunk_plan.memory_model((cfg.resolution,) * 2)
        row["predicted_peak_gb"] = (model.weights() + model.peak(chunk, seg.chunk_plan.decode_size(chunk))) / 1e9
        row["weights_gb_allocated"] = None if weights is None else weights / 1e9
    if reference_labels is not None:
        row["label_agreement"] = float((warm.labels == reference_labels).mean())
    print(json.dumps(row), flush=True)
    return row


def stage_headline(s: Session) -> dict:
    from emerdiff_fast import EmerDiffConfig

    pipe = s.pipeline("sd21-base", torch.bfloat16)
    cfg = EmerDiffConfig(num_masks=s.masks, resolution=s.resolution)
    rows = [timed_row(s, "reference", pipe, cfg, backend="reference")]
    rows.append(timed_row(s, "fast eager", pipe, cfg, reference_labels=s.results.get("fast_bf16_labels")))
    rows.append(timed_row(s, "fast compiled (default)", pipe, cfg, compile="default",
                          reference_labels=s.results.get("fast_bf16_labels")))
    for r in rows:
        r["speedup_vs_reference"] = rows[0]["median_s_per_image"] / r["median_s_per_image"]
    s.results["default_labels"] = s.results.get("fast_bf16_labels")
    return {"model": "sd21-base skeleton, random init" if not s.dry_run else "tiny", "resolution": s.resolution,
            "masks": s.masks, "dtype": "bfloat16", "rows": rows}


def stage_side(s: Session) -> dict:
    from emerdiff_fast import EmerDiffConfig
    from emerdiff_fast.engine import FastOptions

    pipe = s.pipeline("sd21-base", torch.bfloat16)
    cfg = EmerDiffConfig(num_masks=s.masks, resolution=s.resolution)
    labels = s.results.get("default_labels")
    row_s = s.plan["stages"]["d-side"]["row_seconds"]
    rows, skipped = [], []
    specs = [("triton_attention", cfg, {"options": FastOptions(triton_attention=True)}),
             ("channels_last", cfg, {"options": FastOptions(channels_last=True)}),
             ("preset grid25", cfg.with_preset("grid25"), {}),
             ("preset fastest", cfg.with_preset("fastest"), {}),
             ("K = 10", EmerDiffConfig(num_masks=min(10, s.masks * 2), resolution=s.resolution), {}),
             ("compile reduce-overhead", cfg, {"compile": "reduce-overhead"}),
             ("compile max-autotune-no-cudagraphs", cfg, {"compile": "max-autotune-no-cudagraphs"})]
    for name, c, kw in specs:
        need = row_s[name] + (s.later("d-side") if name in OPTIONAL_ROWS else 0.0)
        if not s.dry_run and need > s.left():
            skipped.append({"name": name, "estimate_s": row_s[name], "needed_s": need, "left_s": s.left()})
            print(f"skipped {name}: needs {need:.0f} s, {s.left():.0f} s left", flush=True)
            continue
        try:
            rows.append(timed_row(s, name, pipe, c, reference_labels=labels if c.num_masks == cfg.num_masks else None,
                                  **kw))
        except Exception as exc:  # one failing row must not lose the others
            rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}"[:800]})
        finally:
            if name == "channels_last":  # EmerDiff converted the pipeline in place: back for later rows
                pipe.unet.to(memory_format=torch.contiguous_format)
                pipe.vae.to(memory_format=torch.contiguous_format)
    return {"rows": rows, "skipped": skipped}


def stage_mini(s: Session) -> dict:
    from emerdiff_fast import EmerDiff, load_pipeline
    from emerdiff_fast.metrics import instance_scores
    from emerdiff_fast.scenes import HELDOUT_SEEDS, make_scene

    pipe = load_pipeline("mini", device=s.device, dtype=torch.bfloat16)
    seg = EmerDiff(pipe)
    scenes = [make_scene(seed) for seed in HELDOUT_SEEDS[:s.mini_scenes]]
    seg(scenes[0].image)  # warm-up (not scored twice: scored below with the rest)
    s.sync()
    t0 = time.perf_counter()
    scores = []
    for scene in scenes:
        scores.append(instance_scores(seg(scene.image).labels, scene.instances))
    s.sync()
    wall = time.perf_counter() - t0
    m2o = [x["many_to_one_miou"] for x in scores]
    return {"scenes": len(scenes), "seeds": f"{HELDOUT_SEEDS[0]}..{HELDOUT_SEEDS[0] + len(scenes) - 1}",
            "dtype": "bfloat16", "settings": {k: getattr(seg.config, k) for k in ("resolution", "num_masks", "lam",
                                                                                  "t_modulate")},
            "many_to_one_miou": float(np.mean(m2o)), "hungarian_miou": float(np.mean([x["hungarian_miou"]
                                                                                        for x in scores])),
            "s_per_scene": wall / len(scenes)}


def stage_hyperfeatures(s: Session) -> dict:
    from emerdiff_fast.hyperfeatures import ExtractConfig
    from emerdiff_fast.hyperfeatures.extract import FeatureExtractor

    pipe = s.pipeline("sd15", torch.bfloat16)
    out = {"model": "sd15 skeleton, random init" if not s.dry_run else "tiny", "resolution": s.resolution}
    for name, cfg in (("all_steps", ExtractConfig(load_resolution=s.resolution)),
                      ("one_step", ExtractConfig.one_step(load_resolution=s.resolution))):
        ex = FeatureExtractor(pipe, cfg)
        images = [im[None] * 2 - 1 for im in s.images(1 + s.timed_images)]
        ex.extract(images[0])
        times = []
        for im in images[1:]:
            s.sync()
            t0 = time.perf_counter()
            ex.extract(im)
            s.sync()
            times.append(time.perf_counter() - t0)
        out[name] = {"median_s_per_image": statistics.median(times), "times_s": times,
                     "timesteps": len(cfg.save_timestep)}
        print(json.dumps({name: out[name]}), flush=True)
    return out


def stage_checks(s: Session) -> dict:
    from benchmarks.gpu_checks import run_checks

    results = run_checks(s.device, s.dry_run, names=("chunk", "cudagraphs"),
                         pipe=s.pipes.get("sd15") if not s.dry_run else None)
    return {"checks": results, "pass": all(r["ok"] for r in results.values())}


STAGES = {"a-env": stage_env, "b-correctness": stage_correctness, "c-headline": stage_headline,
          "d-side": stage_side, "e-mini": stage_mini, "f-hyperfeatures": stage_hyperfeatures,
          "g-checks": stage_checks}


def run(s: Session) -> int:
    s.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name, fn in STAGES.items():
        est, left = s.estimate(name), s.left()
        print(f"== {name}: estimated {est:.0f} s on an H200 (performance model), {left:.0f} s left", flush=True)
        record = {"stage": name, "estimate_s": est, "dry_run": s.dry_run,
                  "date": datetime.date.today().isoformat()}
        if not s.dry_run and est > left:
            record.update(skipped=True, reason=f"estimate {est:.0f} s exceeds the {left:.0f} s left")
            print(f"   skipped: {record['reason']}", flush=True)
        else:
            t0 = time.perf_counter()
            try:
                record.update(fn(s))
            except Exception as exc:  # a failed stage is recorded; the later stages still run
                failed += 1
                record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                record["traceback"] = traceback.format_exc()[-4000:]
                print(record["traceback"], flush=True)
            record["wall_s"] = time.perf_counter() - t0
            print(f"   {name} done in {record['wall_s']:.0f} s", flush=True)
        _write(s.out / f"{name}.json", record)
    print(table(s.out))
    return 1 if failed else 0


# ---- the table ---------------------------------------------------------------------------
def _f(v, spec=".2f", scale=1.0, unit=""):
    return "-" if v is None else format(v * scale, spec) + unit


def table(out: Path) -> str:
    """Markdown of whatever stage files exist in `out` (a partial set says which are missing)."""
    out = Path(out)
    st = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.stem in STAGES}
    lines = []
    env = st.get("a-env", {}).get("env", {})
    title = env.get("device", "unknown device")
    date = next((v.get("date") for v in st.values() if v.get("date")), "")
    dry = any(v.get("dry_run") for v in st.values())
    lines.append(f"\n## GPU session: {title}, {date}{' (DRY RUN: CPU, tiny model, toy sizes)' if dry else ''}\n")
    if env:
        lines.append(f"torch {env.get('torch')}, triton {env.get('triton')}, diffusers {env.get('diffusers')}, "
                     f"transformers {env.get('transformers')}, driver {env.get('driver', '-')}, commit "
                     f"{env.get('commit')}; bf16 matmul {_f(st['a-env'].get('mfu_denominator_tflops'), '.3g')} "
                     "TFLOP/s (8192^3, do_bench median: the MFU denominator).\n")
    lines += ["| stage | status | estimate s | wall s |", "| --- | --- | --- | --- |"]
    for name in STAGES:
        v = st.get(name)
        status = ("missing (killed before it ended?)" if v is None else "skipped" if v.get("skipped")
                  else "error" if v.get("error") else "done")
        lines.append(f"| {name} | {status} | {_f(v and v.get('estimate_s'), '.0f')} | "
                     f"{_f(v and v.get('wall_s'), '.0f')} |")
    b = st.get("b-correctness", {})
    if "equivalence" in b:
        e = b["equivalence"]
        lines.append(f"\nCorrectness: fast bf16 vs reference fp32, relative L2 error of the difference maps "
                     f"{e['rel_l2']:.2e}, label agreement {100 * e['label_agreement']:.2f}% "
                     f"({'pass' if e['pass'] else 'FAIL'}); kernel tests ({'native CUDA' if b['kernel_tests']['native'] else 'interpreter'}): "
                     f"{b['kernel_tests']['summary']}; int64 offsets: {'pass' if b['int64'].get('ok') else 'FAIL'}.")
    rows = st.get("c-headline", {}).get("rows", []) + st.get("d-side", {}).get("rows", [])
    if rows:
        lines += ["", "| row | s / image (median) | speed-up vs reference | compile s | peak mem GB | predicted GB | "
                      "MFU | label agreement vs fast eager |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        ref = rows[0].get("median_s_per_image") if rows[0].get("name") == "reference" else None
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['name']} | error: {r['error'][:120]} | | | | | | |")
                continue
            speed = ref / r["median_s_per_image"] if ref else None
            lines.append(f"| {r['name']} | {r['median_s_per_image']:.3f} | {_f(speed, '.2f', unit='x')} | "
                         f"{_f(r.get('compile_s'), '.0f')} | {_f(r.get('peak_mem_gb'))} | "
                         f"{_f(r.get('predicted_peak_gb'))} | {_f(r.get('mfu'), '.1f', 100, '%')} | "
                         f"{_f(r.get('label_agreement'), '.2f', 100, '%')} |")
        for r in st.get("d-side", {}).get("skipped", []):
            lines.append(f"| {r['name']} | skipped (needs {r['needed_s']:.0f} s, {r['left_s']:.0f} left) | | | | | | |")
    m = st.get("e-mini", {})
    if "many_to_one_miou" in m:
        lines.append(f"\nMini model ({m['dtype']}, {m['scenes']} held-out scenes {m['seeds']}): many-to-one mIoU "
                     f"{m['many_to_one_miou']:.3f}, Hungarian {m['hungarian_miou']:.3f}, {m['s_per_scene']:.3f} s/scene.")
    h = st.get("f-hyperfeatures", {})
    if "all_steps" in h:
        lines.append(f"\nHyperfeatures extraction ({h['model']}, {h['resolution']} px): all steps "
                     f"{h['all_steps']['median_s_per_image']:.3f} s/image, one step "
                     f"{h['one_step']['median_s_per_image']:.3f} s/image.")
    g = st.get("g-checks", {})
    if "checks" in g:
        lines.append("\nGPU checks: " + ", ".join(f"{k} {'pass' if v.get('ok') else 'FAIL'}"
                                                  for k, v in g["checks"].items()) + ".")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu-out", help="folder for the stage JSON files (default gpu-out)")
    p.add_argument("--budget-s", type=float, default=None, help="wall seconds for the whole session "
                   "(default: the plan's 480; unlimited with --dry-run)")
    p.add_argument("--started", type=float, default=None,
                   help="epoch seconds the session began (gpu_session.sh passes its start; default now)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, toy sizes: the same stage code")
    p.add_argument("--table", metavar="DIR", help="print the table of the stage files in DIR and exit")
    p.add_argument("--results-md", default=None, help="with --table: also append the table to this file")
    args = p.parse_args(argv)
    if args.table:
        text = table(Path(args.table))
        print(text)
        if args.results_md:
            with open(args.results_md, "a") as f:
                f.write(text)
        return 0
    plan = load_plan()
    if args.dry_run:
        # inductor takes minutes per graph on the CPU: the dry run checks the stages' code, so
        # torch.compile passes the function through; the kernels run their PyTorch fallbacks
        # in-process (the kernel tests still run them under the interpreter)
        torch.compile = lambda fn, **kwargs: fn
        os.environ.pop("TRITON_INTERPRET", None)
    budget = args.budget_s if args.budget_s is not None else (float("inf") if args.dry_run else plan["budget_s"])
    s = Session(Path(args.out), args.dry_run, budget, args.started or time.time(), plan)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    return run(s)


if __name__ == "__main__":
    raise SystemExit(main())
