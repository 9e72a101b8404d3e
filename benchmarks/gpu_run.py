"""The one GPU session (`bash benchmarks/gpu_session.sh`): the headline first, then stages in
order of value. Each stage prints its estimate (benchmarks/gpu_plan.json, from the
performance model, planned for an H100) before it starts and writes OUT/<stage>.json when
it ends; the headline rewrites its file after every row, so a kill at any point keeps every
finished row and stage. a-env and b-headline are never skipped; a later stage whose
estimate exceeds the time left is skipped and recorded as skipped, and loops over images
and scenes stop at the session's deadline.

  a-env            GPU, driver, versions, commit and source digest, the first-seconds model
                   build on the meta device, measured bf16 matmul rate (the MFU denominator)
  b-headline       SD 2.1-base skeleton, 512 px, K = 30, bf16: fast eager, fast compiled
                   (default), then reference on one image; median s/image after warm-up,
                   compile apart, peak memory beside the memory model's, MFU, speed-up
  c-correctness    gate: fast fp32 vs reference fp32 at 256 px, K = 8, TF32 off (check_equivalence's
                   rule); report, not gated: fast bf16 against both (random weights: noise)
  d-mini           gate: the trained mini model, fast bf16 vs fast fp32 on 16 held-out scenes
                   (label agreement >= 0.97, |mIoU difference| <= 0.01), s/scene
  e-side           triton_attention, channels_last, presets grid25 and fastest, K = 10; then, with
                   time to spare, compile modes reduce-overhead and max-autotune-no-cudagraphs
  f-hyperfeatures  SD 1.5 skeleton, 512 px: extraction s/image, all steps and one step
  g-checks         kernel tests natively on CUDA (timeouts), kernels with offsets past 2^31, the
                   chunk under a capped budget, CUDA-graph replay (benchmarks/gpu_checks.py)

    python -m benchmarks.gpu_run --out DIR [--budget-s 480] [--started EPOCH]
    python -m benchmarks.gpu_run --dry-run --out DIR     # the same code, CPU, tiny model, toy sizes
    python -m benchmarks.gpu_run --preflight [--dry-run] # imports and meta-device model builds, seconds
    python -m benchmarks.gpu_run --check-out DIR         # OUT holds the stage files and the log, nothing else
    python -m benchmarks.gpu_run --table DIR [--results-md benchmarks/RESULTS.md]
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks.gpu_plan import GATE_MASKS, GATE_RESOLUTION, GATE_SCENES, OPTIONAL_ROWS, TIMED_IMAGES, load_plan
from benchmarks.gpu_travel import MAX_OUT_FILES, source_digest

ROOT = Path(__file__).resolve().parents[1]
NEVER_SKIP = ("a-env", "b-headline")
RESERVE_S = 15           # kept at the end for the last file and the table
KERNEL_TEST_S = 60       # per kernel test (pytest-timeout, which the GPU image has)
KERNEL_TESTS_S = 150     # the whole kernel-test subprocess


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
    record: dict = field(default_factory=dict)   # the running stage's file, as written so far
    deadline: float = float("inf")               # loops stop here (run() sets it per stage)

    def __post_init__(self):
        self.device = torch.device("cpu" if self.dry_run else "cuda")
        dry = self.dry_run
        self.resolution, self.masks = (64, 2) if dry else (512, 30)
        self.gate_resolution, self.gate_masks = (64, 2) if dry else (GATE_RESOLUTION, GATE_MASKS)
        self.timed_images = 1 if dry else TIMED_IMAGES
        self.gate_scenes = 1 if dry else GATE_SCENES

    def left(self) -> float:
        return self.budget_s - (time.time() - self.started)

    def estimate(self, stage: str) -> float:
        return self.plan["stages"][stage]["seconds"]

    def later(self, stage: str) -> float:
        """Estimated seconds of the stages after `stage`."""
        names = list(self.plan["stages"])
        return sum(self.estimate(n) for n in names[names.index(stage) + 1:])

    def checkpoint(self, data: dict) -> None:
        """Rewrite the running stage's file now, marked partial (run() writes the final one)."""
        self.record.update(data)
        _write(self.out / f"{self.record['stage']}.json", {**self.record, "partial": True})

    def until_deadline(self, items, note: dict):
        """The items, the first always, the rest while the deadline is ahead; note says
        whether the loop was cut short."""
        note["stopped_at_deadline"] = False
        for i, item in enumerate(items):
            if i and time.time() >= self.deadline:
                note["stopped_at_deadline"] = True
                print(f"   deadline: stopped after {i} of {len(items)}", flush=True)
                return
            yield item

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

    def images(self, n: int, size: int | None = None) -> list[torch.Tensor]:
        """Seeded smooth random images (no data set on the GPU machine)."""
        r = size or self.resolution
        out = []
        for i in range(n):
            low = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(100 + i))
            out.append(torch.nn.functional.interpolate(low[None], size=(r, r), mode="bicubic")[0].clamp(0, 1))
        return out

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _write(path: Path, data: dict) -> None:
    from emerdiff_fast.output import atomic_write  # (here: the preflight reports a failing import in one line)

    atomic_write(path, json.dumps(data, indent=1, default=str).encode())  # gpu_session.sh removes a leftover .tmp


# ---- the first seconds -------------------------------------------------------------------------
def skeleton_root() -> Path | None:
    for root in (os.environ.get("EMERDIFF_SKELETONS"), ROOT / ".skeletons", ROOT.parent / "shared" / "model-skeletons"):
        if root and (Path(root) / "sd21-base" / "unet" / "config.json").exists():
            return Path(root)
    return None


def preflight(dry_run: bool) -> dict:
    """Within seconds, what the stages need: the imports, and the full-size UNet, text
    encoder and VAE built from the skeleton configs on the meta device, the UNet and the text
    encoder each run once there (a failure in model construction shows now, not minutes in).
    In a dry run without skeletons (CI without them) the tiny model's configs stand in."""
    import importlib

    versions = {}
    for name in ("torch", "triton", "diffusers", "transformers", "huggingface_hub", "tokenizers", "safetensors",
                 "numpy", "scipy", "PIL"):
        versions[name] = getattr(importlib.import_module(name), "__version__", "?")
    for name in ("emerdiff_fast", "emerdiff_fast.kernels", "emerdiff_fast.hyperfeatures",
                 "diffusers.pipelines.pipeline_utils"):
        importlib.import_module(name)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = skeleton_root()
    if root is None and not dry_run:
        raise FileNotFoundError("no skeletons: carry .skeletons (bash benchmarks/gpu_prepare.sh)")
    built = {}
    for model in (("sd21-base", "sd15") if root else ("tiny",)):
        if root:
            folder = root / model
            unet_cfg = UNet2DConditionModel.load_config(folder / "unet")
            vae_cfg = AutoencoderKL.load_config(folder / "vae")
            text_cfg = CLIPTextConfig.from_pretrained(folder / "text_encoder")
        else:
            from emerdiff_fast import load_pipeline

            tiny = load_pipeline("tiny")
            unet_cfg, vae_cfg, text_cfg = dict(tiny.unet.config), dict(tiny.vae.config), tiny.text_encoder.config
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_cfg)
            text = CLIPTextModel(text_cfg)
            AutoencoderKL.from_config(vae_cfg)
            side = int(unet.config.sample_size)
            ctx = torch.empty(1, 77, unet.config.cross_attention_dim)
            unet(torch.empty(1, unet.config.in_channels, side, side), torch.tensor(1), encoder_hidden_states=ctx)
            text(torch.zeros(1, 77, dtype=torch.long))
        built[model] = {"unet_params": sum(p.numel() for p in unet.parameters()),
                        "text_encoder_params": sum(p.numel() for p in text.parameters())}
    return {"versions": versions, "meta_models": built, "skeletons": str(root) if root else None}


# ---- stages -----------------------------------------------------------------------------
def stage_env(s: Session) -> dict:
    from benchmarks.common import environment, peak_matmul_tflops

    env = environment(s.device)
    env["commit"] = os.environ.get("EMERDIFF_COMMIT") or env.get("commit") or None
    env["source_digest"] = source_digest()  # `python -m benchmarks.gpu_travel --digest` on the CPU side
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
    return {"env": env, "preflight": s.results.get("preflight"), "planned_for": s.plan["device"],
            "matmul_tflops": rates, "mfu_denominator_tflops": rates["bfloat16"]}


def timed_row(s: Session, name: str, pipe, cfg, *, backend="fast", options=None, compile=False,
              timed: int | None = None, warm: bool = True, agree_with=None) -> dict:
    """One untimed warm-up image (compile included; none with warm=False), then `timed`
    images (default s.timed_images) while the deadline allows: median seconds per image
    (CUDA events), peak memory beside the memory model's prediction, MFU."""
    from emerdiff_fast import EmerDiff

    from benchmarks.common import floor_flops, peak_memory_gb, reset_peak_memory, square_chunk, time_calls
    from benchmarks.waterfall import warm_up

    timed = s.timed_images if timed is None else timed
    images = s.images(1 + timed)
    kwargs = {} if backend != "fast" else {"options": options, "compile": compile}
    seg = EmerDiff(pipe, cfg, backend=backend, **kwargs)
    row = {"name": name, "backend": backend, "compile": compile or None}
    warm_s, result = None, {}
    if warm:
        s.sync()
        t0 = time.perf_counter()
        result["warm"], _ = warm_up(seg, images[0], count=False)  # the chunk is decided first
        s.sync()
        warm_s = time.perf_counter() - t0
    reset_peak_memory(s.device)
    weights = torch.cuda.memory_allocated(s.device) if s.device.type == "cuda" else None
    times = []
    for im in s.until_deadline(images[1:], row):
        times += time_calls(lambda im=im: result.__setitem__("last", seg(im)), s.device, 1)
    median = statistics.median(times)
    floor = floor_flops(pipe, cfg.resolution, cfg.num_masks, len(seg.schedule))
    row.update({"median_s_per_image": median, "times_s": times,
                "compile_s": max(0.0, warm_s - median) if compile and warm_s is not None else None,
                "warm_up_s": warm_s, "peak_mem_gb": peak_memory_gb(s.device),
                "chunk": square_chunk(seg) if backend == "fast" else None, "floor_tflop": floor["floor_tflop"],
                "mfu": (floor["floor_tflop"] / (median * s.results["peak_tflops"])
                        if s.results.get("peak_tflops") else None)})
    if backend == "fast":
        chunk = square_chunk(seg)
        model = seg.chunk_plan.memory_model((cfg.resolution,) * 2)
        row["predicted_peak_gb"] = (model.weights() + model.peak(chunk, seg.chunk_plan.decode_size(chunk))) / 1e9
        row["weights_gb_allocated"] = None if weights is None else weights / 1e9
    labels = result.get("warm", result.get("last")).labels  # the first image's
    s.results[f"labels:{name}"] = labels if warm else None
    if agree_with is not None and warm:
        row["label_agreement"] = float((labels == agree_with).mean())
    print(json.dumps(row), flush=True)
    return row


HEADLINE = (("fast eager", {}), ("fast compiled (default)", {"compile": "default"}),
            ("reference", {"backend": "reference", "timed": 1, "warm": False}))  # one image, nothing to compile


def stage_headline(s: Session) -> dict:
    """The rows in order, each caught on its own and written the moment it ends."""
    from emerdiff_fast import EmerDiffConfig

    out = {"model": "sd21-base skeleton, random init" if not s.dry_run else "tiny", "resolution": s.resolution,
           "masks": s.masks, "dtype": "bfloat16", "rows": []}
    pipe = s.pipeline("sd21-base", torch.bfloat16)
    cfg = EmerDiffConfig(num_masks=s.masks, resolution=s.resolution)
    for name, kw in HEADLINE:
        try:
            row = timed_row(s, name, pipe, cfg, agree_with=s.results.get("labels:fast eager"), **kw)
        except Exception as exc:  # one failing row must not lose the others
            row = {"name": name, "error": f"{type(exc).__name__}: {exc}"[:800],
                   "traceback": traceback.format_exc()[-2000:]}
            print(row["traceback"], flush=True)
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
        out["rows"].append(row)
        ref = next((r for r in out["rows"] if r["name"] == "reference" and "error" not in r), None)
        for r in out["rows"]:
            if ref and "error" not in r:
                r["speedup_vs_reference"] = ref["median_s_per_image"] / r["median_s_per_image"]
        s.checkpoint(out)
    return out


def stage_correctness(s: Session) -> dict:
    """(a) The algorithm, gated: fast fp32 vs reference fp32 on the full-size skeleton, TF32
    off, by check_equivalence's rule (relative L2 below 1e-4 or within twice the rounding
    floor; labels >= 99.9%). (c) bf16, reported and not gated: on random weights its error
    is noise a bug would hide in (bf16 is gated on the trained mini model, d-mini)."""
    from emerdiff_fast import EmerDiff, EmerDiffConfig

    from benchmarks.check_equivalence import TOLERANCE, _rel_l2, compare, verdict

    cfg = EmerDiffConfig(num_masks=s.gate_masks, resolution=s.gate_resolution)
    image = s.images(1, s.gate_resolution)[0]
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    kept = {}
    try:
        pipe = s.pipeline("sd21-base", torch.float32)
        row = compare(pipe, cfg, image, floor=True, results=kept)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    row = {k: v for k, v in row.items() if not k.endswith("timings")}
    gate = {"compared": "fast float32 vs reference float32", "tf32": False,
            "model": "sd21-base skeleton, random init" if not s.dry_run else "tiny",
            "resolution": s.gate_resolution, "masks": s.gate_masks, "tolerance": TOLERANCE["float32"], **row,
            "pass": verdict(row, "float32")}
    print(json.dumps(gate), flush=True)
    s.checkpoint({"gate_fp32": gate})
    pipe = s.pipeline("sd21-base", torch.bfloat16)  # the same weights (bf16 -> fp32 -> bf16 is exact)
    bf16 = EmerDiff(pipe, cfg)(image)
    report = {"compared": "fast bfloat16 vs fast float32 and reference float32", "gated": False,
              "rel_l2_vs_fast_fp32": _rel_l2(bf16.difference_maps, kept["fast"].difference_maps),
              "rel_l2_vs_reference_fp32": _rel_l2(bf16.difference_maps, kept["reference"].difference_maps),
              "label_agreement_vs_fast_fp32": float((bf16.labels == kept["fast"].labels).mean())}
    print(json.dumps(report), flush=True)
    return {"gate_fp32": gate, "bf16_report": report, "pass": gate["pass"]}


def stage_mini(s: Session) -> dict:
    """(b) bf16 gated on the trained mini model: fast bf16 vs fast fp32 on held-out scenes,
    label agreement (ids matched one-to-one) >= 0.97 and |mIoU difference| <= 0.01."""
    from emerdiff_fast import EmerDiff, load_pipeline
    from emerdiff_fast.metrics import instance_scores
    from emerdiff_fast.scenes import HELDOUT_SEEDS, make_scene

    from benchmarks.quality import label_agreement

    segs = {str(dt).removeprefix("torch."): EmerDiff(load_pipeline("mini", device=s.device, dtype=dt))
            for dt in (torch.float32, torch.bfloat16)}
    scenes = [make_scene(seed) for seed in HELDOUT_SEEDS[:s.gate_scenes]]
    for seg in segs.values() if not s.dry_run else ():
        seg(scenes[0].image)  # warm-up for the s/scene timing (scored below with the rest)
    out = {"model": "mini (trained)", "dtypes": {k: str(v.unet.dtype) for k, v in segs.items()},
           "settings": {k: getattr(segs["float32"].config, k) for k in ("resolution", "num_masks", "lam",
                                                                         "t_modulate")}}
    labels, scores, wall = {k: [] for k in segs}, {k: [] for k in segs}, {k: 0.0 for k in segs}
    for scene in s.until_deadline(scenes, out):
        for k, seg in segs.items():
            s.sync()
            t0 = time.perf_counter()
            result = seg(scene.image)
            s.sync()
            wall[k] += time.perf_counter() - t0
            labels[k].append(result.labels)
            scores[k].append(instance_scores(result.labels, scene.instances)["many_to_one_miou"])
    n = len(labels["float32"])
    agreement = float(np.mean([label_agreement(b, f) for b, f in zip(labels["bfloat16"], labels["float32"])]))
    miou = {k: float(np.mean(v)) for k, v in scores.items()}
    gate = {"compared": "fast bfloat16 vs fast float32", "agreement_min": 0.97, "miou_delta_max": 0.01,
            "label_agreement": agreement, "miou_delta": miou["bfloat16"] - miou["float32"],
            "pass": agreement >= 0.97 and abs(miou["bfloat16"] - miou["float32"]) <= 0.01}
    print(json.dumps(gate), flush=True)
    out.update(scenes=n, seeds=f"{HELDOUT_SEEDS[0]}..{HELDOUT_SEEDS[0] + n - 1}", many_to_one_miou=miou,
               s_per_scene={k: v / n for k, v in wall.items()}, gate_bf16=gate)
    out["pass"] = gate["pass"]
    return out


def stage_side(s: Session) -> dict:
    from emerdiff_fast import EmerDiffConfig
    from emerdiff_fast.engine import FastOptions

    pipe = s.pipeline("sd21-base", torch.bfloat16)
    cfg = EmerDiffConfig(num_masks=s.masks, resolution=s.resolution)
    labels = s.results.get("labels:fast eager")
    row_s = s.plan["stages"]["e-side"]["row_seconds"]
    rows, skipped = [], []
    specs = [("triton_attention", cfg, {"options": FastOptions(triton_attention=True)}),
             ("channels_last", cfg, {"options": FastOptions(channels_last=True)}),
             ("preset grid25", cfg.with_preset("grid25"), {}),
             ("preset fastest", cfg.with_preset("fastest"), {}),
             ("K = 10", EmerDiffConfig(num_masks=min(10, s.masks * 2), resolution=s.resolution), {}),
             ("compile reduce-overhead", cfg, {"compile": "reduce-overhead"}),
             ("compile max-autotune-no-cudagraphs", cfg, {"compile": "max-autotune-no-cudagraphs"})]
    for name, c, kw in specs:
        need = row_s[name] + (s.later("e-side") if name in OPTIONAL_ROWS else 0.0)
        if not s.dry_run and (need > s.left() or time.time() >= s.deadline):
            skipped.append({"name": name, "estimate_s": row_s[name], "needed_s": need, "left_s": s.left()})
            print(f"skipped {name}: needs {need:.0f} s, {s.left():.0f} s left", flush=True)
            continue
        try:
            rows.append(timed_row(s, name, pipe, c, agree_with=labels if c.num_masks == cfg.num_masks else None,
                                  **kw))
        except Exception as exc:  # one failing row must not lose the others
            rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}"[:800]})
        finally:
            if name == "channels_last":  # EmerDiff converted the pipeline in place: back for later rows
                pipe.unet.to(memory_format=torch.contiguous_format)
                pipe.vae.to(memory_format=torch.contiguous_format)
        s.checkpoint({"rows": rows, "skipped": skipped})
    return {"rows": rows, "skipped": skipped}


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
        row = {"timesteps": len(cfg.save_timestep)}
        times = []
        for im in s.until_deadline(images[1:], row):
            s.sync()
            t0 = time.perf_counter()
            ex.extract(im)
            s.sync()
            times.append(time.perf_counter() - t0)
        out[name] = {"median_s_per_image": statistics.median(times), "times_s": times, **row}
        print(json.dumps({name: out[name]}), flush=True)
    return out


def kernel_test_command(s: Session) -> list[str]:
    """pytest on tests/kernels without the ahead-of-time compile test (it needs no GPU; CI
    runs it), each test under pytest-timeout where installed (the GPU image has it)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels",
           "--ignore=tests/kernels/test_aot.py"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append(f"--timeout={KERNEL_TEST_S}")
    if not s.dry_run and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "4"]  # the kernels' JIT compiles in parallel (the GPU image has pytest-xdist)
    if s.dry_run:  # the interpreter is slow: the fast cases only (the full files run in CI)
        cmd += ["-k", "fake or mismatch or kill"]
    return cmd


def run_bounded(cmd: list[str], limit_s: float, env: dict) -> dict:
    """Run cmd in its own process group; past limit_s the whole group is killed."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        stdout, _ = p.communicate(timeout=limit_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        stdout, _ = p.communicate()
        timed_out = True
    except BaseException:  # the session's SIGINT: its own group does not get it, so end it here
        os.killpg(p.pid, signal.SIGKILL)
        raise
    return {"rc": None if timed_out else p.returncode, "timed_out": timed_out, "timeout_s": limit_s,
            "seconds": time.perf_counter() - t0, "summary": (stdout.strip().splitlines() or [""])[-1],
            "tail": stdout[-1500:] if timed_out or p.returncode else ""}


def stage_checks(s: Session) -> dict:
    from benchmarks.gpu_checks import run_checks

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if s.dry_run:  # on the CPU the kernels run under Triton's interpreter; on CUDA natively
        env["TRITON_INTERPRET"] = "1"
    cmd = kernel_test_command(s)
    tests = {"cmd": cmd, "native": s.device.type == "cuda",
             **run_bounded(cmd, max(10.0, min(KERNEL_TESTS_S, s.deadline - time.time())), env)}
    print(f"kernel tests: {tests['summary']}{' (TIMED OUT)' if tests['timed_out'] else ''}", flush=True)
    s.checkpoint({"kernel_tests": tests})
    names = ["int64", "chunk"]
    optional = s.plan["stages"]["g-checks"]["optional_checks"]
    skipped = [n for n, est in optional.items() if not s.dry_run and est > s.deadline - time.time()]
    names += [n for n in optional if n not in skipped]
    results = run_checks(s.device, s.dry_run, names=tuple(names), pipe=s.pipes.get("sd15") if not s.dry_run else None)
    return {"kernel_tests": tests, "checks": results, "skipped": skipped,
            "pass": tests["rc"] == 0 and all(r["ok"] for r in results.values())}


STAGES = {"a-env": stage_env, "b-headline": stage_headline, "c-correctness": stage_correctness,
          "d-mini": stage_mini, "e-side": stage_side, "f-hyperfeatures": stage_hyperfeatures,
          "g-checks": stage_checks}


def run(s: Session) -> int:
    s.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name, fn in STAGES.items():
        est, left = s.estimate(name), s.left()
        print(f"== {name}: estimated {est:.0f} s on an {s.plan['device']} (performance model), {left:.0f} s left",
              flush=True)
        record = {"stage": name, "estimate_s": est, "dry_run": s.dry_run, "date": datetime.date.today().isoformat(),
                  "commit": os.environ.get("EMERDIFF_COMMIT")}
        if not s.dry_run and name not in NEVER_SKIP and est > left:
            record.update(skipped=True, reason=f"estimate {est:.0f} s exceeds the {left:.0f} s left")
            print(f"   skipped: {record['reason']}", flush=True)
            _write(s.out / f"{name}.json", record)
            continue
        s.record = record
        # loops stop at the session's end; a stage allowed to start gets at most twice its estimate
        s.deadline = s.started + s.budget_s - RESERVE_S
        if not s.dry_run and name not in NEVER_SKIP:
            s.deadline = min(s.deadline, time.time() + 2 * est)
        t0 = time.perf_counter()
        try:
            record.update(fn(s))
        except KeyboardInterrupt:  # gpu_session.sh's timeout: keep what this stage had, then stop
            record["error"] = "interrupted at the session's time limit"
            record["wall_s"] = time.perf_counter() - t0
            _write(s.out / f"{name}.json", record)
            print(table(s.out))
            return 1
        except Exception as exc:  # a failed stage is recorded; the later stages still run
            failed += 1
            record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            record["traceback"] = traceback.format_exc()[-4000:]
            print(record["traceback"], flush=True)
        record.pop("partial", None)
        record["wall_s"] = time.perf_counter() - t0
        print(f"   {name} done in {record['wall_s']:.0f} s", flush=True)
        _write(s.out / f"{name}.json", record)
    print(table(s.out))
    return 1 if failed else 0


def check_out(out: Path) -> list[str]:
    """What is wrong with OUT after a run: anything but the stage files and log.txt, or more
    files than come back."""
    names = sorted(p.name for p in Path(out).iterdir())
    allowed = {f"{n}.json" for n in STAGES} | {"log.txt"}
    found = [f"unexpected in OUT: {n}" for n in names if n not in allowed]
    found += [f"missing from OUT: {n}" for n in sorted(allowed - set(names))]
    if len(names) > MAX_OUT_FILES:
        found.append(f"{len(names)} files in OUT; at most {MAX_OUT_FILES} come back")
    return found


# ---- the table ---------------------------------------------------------------------------
def _f(v, spec=".2f", scale=1.0, unit=""):
    return "-" if v is None else format(v * scale, spec) + unit


def _status(v: dict | None) -> str:
    return ("missing (killed before it ended?)" if v is None else "skipped" if v.get("skipped")
            else "partial (killed during it)" if v.get("partial") else "error" if v.get("error") else "done")


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
                     f"{env.get('commit')} (source digest {env.get('source_digest')}); bf16 matmul "
                     f"{_f(st['a-env'].get('mfu_denominator_tflops'), '.3g')} TFLOP/s (8192^3, do_bench median: "
                     "the MFU denominator).\n")
    lines += ["| stage | status | estimate s | wall s |", "| --- | --- | --- | --- |"]
    for name in STAGES:
        v = st.get(name)
        lines.append(f"| {name} | {_status(v)} | {_f(v and v.get('estimate_s'), '.0f')} | "
                     f"{_f(v and v.get('wall_s'), '.0f')} |")
    rows = st.get("b-headline", {}).get("rows", []) + st.get("e-side", {}).get("rows", [])
    if rows:
        lines += ["", "| row | s / image (median) | speed-up vs reference | compile s | peak mem GB | predicted GB | "
                      "MFU | label agreement vs fast eager |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        ref = next((r.get("median_s_per_image") for r in rows if r.get("name") == "reference" and "error" not in r),
                   None)
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['name']} | error: {r['error'][:120]} | | | | | | |")
                continue
            speed = ref / r["median_s_per_image"] if ref else None
            lines.append(f"| {r['name']} | {r['median_s_per_image']:.3f} | {_f(speed, '.2f', unit='x')} | "
                         f"{_f(r.get('compile_s'), '.0f')} | {_f(r.get('peak_mem_gb'))} | "
                         f"{_f(r.get('predicted_peak_gb'))} | {_f(r.get('mfu'), '.1f', 100, '%')} | "
                         f"{_f(r.get('label_agreement'), '.2f', 100, '%')} |")
        for r in st.get("e-side", {}).get("skipped", []):
            lines.append(f"| {r['name']} | skipped (needs {r['needed_s']:.0f} s, {r['left_s']:.0f} left) | | | | | | |")
    c = st.get("c-correctness", {})
    if "gate_fp32" in c:
        g = c["gate_fp32"]
        lines.append(f"\nCorrectness gate ({g['compared']}, {g['model']}, {g['resolution']} px, K = {g['masks']}, "
                     f"TF32 off): relative L2 {g['rel_l2']:.2e} (rounding floor {_f(g.get('floor_rel_l2'), '.2e')}), "
                     f"labels {100 * g['label_agreement']:.2f}%: {'pass' if g['pass'] else 'FAIL'}.")
    if "bf16_report" in c:
        b = c["bf16_report"]
        lines.append(f"bf16 on random weights (not gated): relative L2 {b['rel_l2_vs_fast_fp32']:.2e} vs fast fp32, "
                     f"{b['rel_l2_vs_reference_fp32']:.2e} vs reference fp32; labels "
                     f"{100 * b['label_agreement_vs_fast_fp32']:.2f}% vs fast fp32.")
    m = st.get("d-mini", {})
    if "gate_bf16" in m:
        g = m["gate_bf16"]
        lines.append(f"\nbf16 gate (mini, {m['scenes']} held-out scenes {m['seeds']}): label agreement "
                     f"{100 * g['label_agreement']:.2f}% (>= 97%), mIoU {m['many_to_one_miou']['bfloat16']:.3f} vs "
                     f"{m['many_to_one_miou']['float32']:.3f} fp32 (|diff| <= 0.01): "
                     f"{'pass' if g['pass'] else 'FAIL'}; {m['s_per_scene']['bfloat16']:.3f} s/scene in bf16.")
    h = st.get("f-hyperfeatures", {})
    if "all_steps" in h:
        lines.append(f"\nHyperfeatures extraction ({h['model']}, {h['resolution']} px): all steps "
                     f"{h['all_steps']['median_s_per_image']:.3f} s/image, one step "
                     f"{h['one_step']['median_s_per_image']:.3f} s/image.")
    g = st.get("g-checks", {})
    if "checks" in g:
        k = g["kernel_tests"]
        lines.append(f"\nKernel tests ({'native CUDA' if k['native'] else 'interpreter'}): {k['summary']}"
                     f"{' (timed out)' if k['timed_out'] else ''}. GPU checks: " + ", ".join(
                         f"{n} {'pass' if v.get('ok') else 'FAIL'}" for n, v in g["checks"].items()) + ".")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu-out", help="folder for the stage JSON files (default gpu-out)")
    p.add_argument("--budget-s", type=float, default=None, help="wall seconds for the whole session "
                   "(default: the plan's 480; unlimited with --dry-run)")
    p.add_argument("--started", type=float, default=None,
                   help="epoch seconds the session began (gpu_session.sh passes its start; default now)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, toy sizes: the same stage code")
    p.add_argument("--preflight", action="store_true", help="imports and meta-device model builds only")
    p.add_argument("--check-out", metavar="DIR", help="check that DIR holds the stage files and the log only")
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
    if args.check_out:
        found = check_out(Path(args.check_out))
        print("\n".join(found) or f"OUT holds the {len(STAGES)} stage files and the log, nothing else")
        return 1 if found else 0
    if not args.dry_run and not args.preflight and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    try:
        checked = preflight(args.dry_run)
    except Exception as exc:  # one line, in the first seconds
        print(f"FAILED preflight: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("preflight: " + ", ".join(f"{k} {v}" for k, v in checked["versions"].items()) + "; built on meta: "
          + ", ".join(f"{m} UNet {v['unet_params'] / 1e6:.0f} M" for m, v in checked["meta_models"].items()), flush=True)
    if args.preflight:
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
    s.results["preflight"] = checked
    return run(s)


if __name__ == "__main__":
    raise SystemExit(main())
