"""The GPU session's time plan: every stage's estimated seconds on an H100 (what a plain
request gets), from the performance model (benchmarks/roofline.py: FLOPs and bytes of every
op on meta tensors, at 60% of peak compute and 75% of bandwidth), bounded below by the host:
LAUNCH_S per eager op call (the GPU waits for the launches of a small or launch-bound
model), and the ASSUMED costs no model predicts (install, model building, compile, kernel JIT).

    python -m benchmarks.gpu_plan            # writes benchmarks/gpu_plan.json, prints the arithmetic

benchmarks/gpu_run.py reads the JSON (computing it there would spend GPU time on meta
traces): it prints each stage's estimate before the stage starts and skips a stage whose
estimate exceeds the time left (never the first two). The first GPU run measures what is
assumed here.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

PLAN_PATH = Path(__file__).with_name("gpu_plan.json")
BUDGET_S = 480  # the session's 8 minutes of wall time, install included
DEVICE = "H100 SXM"  # a plain request's card; an H200 is as fast in compute, faster in memory
FP32 = {"tflops": 67.0, "tbps": 3.35}  # H100 SXM fp32 without tensor cores (data sheet): TF32 off
# (assumed) host dispatch + launch per eager aten op. An SD 2.1 UNet call is ~1,218 ops (counted
# on the meta device), so ~24 ms a call: the reference's hundreds of batch-1 calls are host-bound
LAUNCH_S = 20e-6
COMPILED_LAUNCH_S = 5e-6  # (assumed) per op of the eager count under inductor: fused, wrapper-launched
TIMED_IMAGES = 3  # each timed row: one untimed warm-up, then this many images (the reference: 1, cold)
GATE_SCENES = 16  # d-mini's held-out scenes, each in fp32 and bf16
GATE_RESOLUTION, GATE_MASKS = 256, 8  # c-correctness's fp32 gate
ASSUMED = {  # seconds, (assumed): no model predicts these; the first GPU run measures them
    "install": 30,              # pip from the carried wheels, the project itself, the meta-device preflight
    "environment": 6,           # versions, nvidia-smi, the 8192^3 bf16 matmul rate
    "load_full_model": 25,      # a full-size random-init pipeline built and moved to the GPU
    "load_mini_model": 5,
    "kernel_tests": 45,         # pytest -n 4 tests/kernels on CUDA: each kernel configuration JIT-compiles once
    "compile_default": 210,     # torch.compile of the UNet (2 graphs) and the VAE decode, cold: 2-5 min
    "compile_default_worst": 300,  # the headline must still fit with this
    "compile_reduce-overhead": 250,
    "compile_max-autotune-no-cudagraphs": 420,
    "compile_tiny_reduce-overhead": 60,  # gpu_checks' CUDA-graph check on the tiny model
    "int64_check": 15,          # 13 GB of k-means points, 4.8 GB of attention probabilities
}
OPTIONAL_ROWS = ("compile reduce-overhead", "compile max-autotune-no-cudagraphs")  # only with time to spare


def image_seconds(trace, device: dict, compiled: bool = False) -> float:
    """Launches are asynchronous: an image takes the longer of the device's time (the
    roofline) and the host's (LAUNCH_S per eager op call, COMPILED_LAUNCH_S compiled)."""
    calls = sum(s.calls for s in trace.ops.values())
    return max(trace.seconds(device, compiled), calls * (COMPILED_LAUNCH_S if compiled else LAUNCH_S))


def _image_seconds() -> dict[str, float]:
    """Modelled seconds per image on DEVICE for every configuration the session times."""
    from benchmarks.roofline import DEVICES, Trace, count, image_traces, meta_models

    dev = DEVICES[DEVICE]
    out = {}
    unet, vae = meta_models("sd21-base", torch.bfloat16)
    k30, k10 = image_traces(unet, vae, 512, 30), image_traces(unet, vae, 512, 10)
    grid25 = image_traces(unet, vae, 512, 30, steps=8)  # t = 281 on the 25-step grid: 8 steps, not 15
    gate16 = image_traces(unet, vae, GATE_RESOLUTION, GATE_MASKS)
    out["reference_bf16"] = image_seconds(k30["reference"], dev)
    out["fast_eager"] = image_seconds(k30["fast"], dev)
    out["fast_compiled"] = image_seconds(k30["fast"], dev, compiled=True)
    out["fast_k10"] = image_seconds(k10["fast"], dev)
    out["fast_grid25"] = image_seconds(grid25["fast"], dev)  # also bounds `fastest`
    out["gate_fast_bf16"] = image_seconds(gate16["fast"], dev)
    unet32, vae32 = meta_models("sd21-base", torch.float32)
    gate32 = image_traces(unet32, vae32, GATE_RESOLUTION, GATE_MASKS)
    out["gate_reference_fp32"] = image_seconds(gate32["reference"], FP32)
    out["gate_fast_fp32"] = image_seconds(gate32["fast"], FP32)
    unet15, vae15 = meta_models("sd15", torch.bfloat16)
    out["fast_sd15"] = image_seconds(image_traces(unet15, vae15, 512, 30)["fast"], dev)
    x = torch.empty(1, 4, 64, 64, device="meta", dtype=torch.bfloat16)
    ctx = torch.empty(1, 77, unet15.config.cross_attention_dim, device="meta", dtype=torch.bfloat16)
    call = count(lambda: unet15(x, torch.tensor(1, device="meta"), encoder_hidden_states=ctx))
    enc = count(lambda: vae15.encode(torch.empty(1, 3, 512, 512, device="meta", dtype=torch.bfloat16)))
    out["hyperfeatures_all_steps"] = image_seconds(Trace().add(enc).add(call, 50), dev)
    out["hyperfeatures_one_step"] = image_seconds(Trace().add(enc).add(call), dev)
    out["mini_scene_bf16"] = _mini_scene_seconds(dev, torch.bfloat16)
    out["mini_scene_fp32"] = _mini_scene_seconds(FP32, torch.float32)
    return out


def _mini_scene_seconds(dev: dict, dtype: torch.dtype) -> float:
    """One 64 px scene on the mini model at its own settings (launch-bound)."""
    from emerdiff_fast import load_pipeline
    from emerdiff_fast.memory import meta_models as build
    from emerdiff_fast.sampling import ReverseSchedule
    from emerdiff_fast.segmenter import recommended_config

    from benchmarks.roofline import Trace, count

    pipe = load_pipeline("mini")
    cfg = recommended_config(pipe)
    steps = len(ReverseSchedule.build(pipe.scheduler.config, cfg))
    unet, vae = build(pipe.unet.config, pipe.vae.config, dtype)
    side, members = cfg.resolution // 8, 2 * cfg.num_masks + 1
    x = torch.empty(members, unet.config.in_channels, side, side, device="meta", dtype=dtype)
    ctx = torch.empty(members, 77, unet.config.cross_attention_dim, device="meta", dtype=dtype)
    call = count(lambda: unet(x, torch.tensor(1, device="meta"), encoder_hidden_states=ctx))
    dec = count(lambda: vae.decode(x[:8, :vae.config.latent_channels]))
    return image_seconds(Trace().add(call, steps + 1).add(dec, 2), dev)


def stages(img: dict[str, float]) -> dict[str, dict]:
    """Per stage, in the session's order: its estimate and the terms it adds up (name -> s)."""
    a, n = ASSUMED, 1 + TIMED_IMAGES
    rows = {"triton_attention": n * img["fast_eager"], "channels_last": n * img["fast_eager"],
            "preset grid25": n * img["fast_grid25"], "preset fastest": n * img["fast_grid25"],
            "K = 10": n * img["fast_k10"],
            "compile reduce-overhead": a["compile_reduce-overhead"] + n * img["fast_compiled"],
            "compile max-autotune-no-cudagraphs": a["compile_max-autotune-no-cudagraphs"] + n * img["fast_compiled"]}
    terms = {
        "a-env": {"environment and matmul rate": a["environment"]},
        "b-headline": {"load SD 2.1-base": a["load_full_model"], "fast eager": n * img["fast_eager"],
                       "fast compiled: compile": a["compile_default"], "fast compiled: images": n * img["fast_compiled"],
                       "reference, 1 image": img["reference_bf16"]},
        "c-correctness": {"reference fp32": img["gate_reference_fp32"], "fast fp32": img["gate_fast_fp32"],
                          "rounding floor (replay) fp32": img["gate_reference_fp32"],
                          "fast bf16": img["gate_fast_bf16"]},
        "d-mini": {"load mini twice": 2 * a["load_mini_model"],
                   f"{GATE_SCENES} + 1 scenes, fp32 and bf16": (GATE_SCENES + 1) * (img["mini_scene_fp32"]
                                                                                 + img["mini_scene_bf16"])},
        "e-side": {k: v for k, v in rows.items() if k not in OPTIONAL_ROWS},
        "f-hyperfeatures": {"load SD 1.5": a["load_full_model"], "all steps": n * img["hyperfeatures_all_steps"],
                            "one step": n * img["hyperfeatures_one_step"]},
        "g-checks": {"kernel tests on CUDA": a["kernel_tests"], "int64 offsets check": a["int64_check"],
                     "chunk check (f's SD 1.5), 2 images": 2 * img["fast_sd15"]},
    }
    out = {name: {"seconds": sum(t.values()), "terms": t} for name, t in terms.items()}
    out["e-side"]["optional_rows"] = {k: rows[k] for k in OPTIONAL_ROWS}
    out["e-side"]["row_seconds"] = rows
    out["g-checks"]["optional_checks"] = {"cudagraphs": a["compile_tiny_reduce-overhead"]}  # with time to spare
    return out


def headline_worst(plan: dict) -> float:
    """Seconds until the headline has ended if compiling takes the worst assumed time."""
    a, st = plan["assumed_s"], plan["stages"]
    return (a["install"] + st["a-env"]["seconds"] + st["b-headline"]["seconds"]
            - a["compile_default"] + a["compile_default_worst"])


def make_plan() -> dict:
    img = _image_seconds()
    st = stages(img)
    total = ASSUMED["install"] + sum(s["seconds"] for s in st.values())
    return {"device": DEVICE, "budget_s": BUDGET_S, "launch_s": LAUNCH_S, "compiled_launch_s": COMPILED_LAUNCH_S,
            "assumed_s": ASSUMED, "image_seconds": img, "stages": st, "total_s": total}


def load_plan(path: Path = PLAN_PATH) -> dict:
    return json.loads(Path(path).read_text())


def markdown(plan: dict) -> str:
    lines = [f"| stage | estimate s | terms (s) |", "| --- | --- | --- |",
             f"| install | {plan['assumed_s']['install']:.0f} | wheels and the project (assumed) |"]
    for name, s in plan["stages"].items():
        terms = "; ".join(f"{k} {v:.1f}" for k, v in s["terms"].items())
        lines.append(f"| {name} | {s['seconds']:.0f} | {terms} |")
    lines.append(f"| **total** | **{plan['total_s']:.0f}** | budget {plan['budget_s']} s |")
    opt = {**plan["stages"]["e-side"]["optional_rows"], **plan["stages"]["g-checks"]["optional_checks"]}
    lines += ["", "Run only when time is left over: " + "; ".join(f"{k} {v:.0f} s" for k, v in opt.items()),
              "", f"With compiling at its worst assumed {plan['assumed_s']['compile_default_worst']} s the headline "
              f"ends at {headline_worst(plan):.0f} s.",
              "", f"Modelled seconds per image ({plan['device']}): " + "; ".join(
                  f"{k} {v:.2f}" for k, v in plan["image_seconds"].items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(PLAN_PATH))
    args = p.parse_args(argv)
    plan = make_plan()
    Path(args.out).write_text(json.dumps(plan, indent=1) + "\n")
    print(markdown(plan))
    return 0 if plan["total_s"] <= BUDGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
