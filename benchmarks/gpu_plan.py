"""The GPU session's time plan: every stage's estimated seconds on an H200, from the
performance model (benchmarks/roofline.py: FLOPs and bytes of every op on meta tensors,
at 60% of peak compute and 75% of bandwidth) plus a floor of LAUNCH_S per eager op call,
and the ASSUMED costs no model predicts (install, model building, compile, kernel JIT).

    python -m benchmarks.gpu_plan            # writes benchmarks/gpu_plan.json, prints the arithmetic

benchmarks/gpu_run.py reads the JSON (computing it there would spend GPU time on meta
traces): it prints each stage's estimate before the stage starts and skips a stage whose
estimate exceeds the time left. The first GPU run measures what is assumed here.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

PLAN_PATH = Path(__file__).with_name("gpu_plan.json")
BUDGET_S = 480  # the session's 8 minutes of wall time, install included
DEVICE = "H200 SXM"
FP32 = {"tflops": 67.0, "tbps": 4.8}  # H200 fp32 without tensor cores (data sheet); torch's fp32 matmul default
LAUNCH_S = 10e-6  # (assumed) host dispatch + launch per eager op: what bounds small models
TIMED_IMAGES = 3  # each timed row: one untimed warm-up, then this many images
MINI_SCENES = 100
ASSUMED = {  # seconds, (assumed): no model predicts these; the first GPU run measures them
    "install": 30,              # pip from the carried wheels, the project itself
    "environment": 6,           # versions, nvidia-smi, the 8192^3 bf16 matmul rate
    "load_full_model": 25,      # a full-size random-init pipeline built and moved to the GPU
    "load_mini_model": 5,
    "kernel_tests": 60,         # pytest tests/kernels on CUDA: each kernel configuration JIT-compiles once
    "compile_default": 120,     # torch.compile of the UNet (2 graphs) and the VAE decode, inductor default
    "compile_reduce-overhead": 150,
    "compile_max-autotune-no-cudagraphs": 420,
    "compile_tiny_reduce-overhead": 60,  # gpu_checks' CUDA-graph check on the tiny model
    "int64_check": 15,          # 13 GB of k-means points, 4.8 GB of attention probabilities
}
OPTIONAL_ROWS = ("compile reduce-overhead", "compile max-autotune-no-cudagraphs")  # only with time to spare


def _image_seconds() -> dict[str, float]:
    """Modelled seconds per image on the H200 for every configuration the session times."""
    from benchmarks.roofline import DEVICES, Trace, count, image_traces, meta_models

    h200 = DEVICES[DEVICE]
    out = {}
    unet, vae = meta_models("sd21-base", torch.bfloat16)
    k30, k10 = image_traces(unet, vae, 512, 30), image_traces(unet, vae, 512, 10)
    grid25 = image_traces(unet, vae, 512, 30, steps=8)  # t = 281 on the 25-step grid: 8 steps, not 15
    out["reference_bf16"] = k30["reference"].seconds(h200, False, LAUNCH_S)
    out["fast_eager"] = k30["fast"].seconds(h200, False, LAUNCH_S)
    out["fast_compiled"] = k30["fast"].seconds(h200, True, LAUNCH_S)
    out["fast_k10"] = k10["fast"].seconds(h200, False, LAUNCH_S)
    out["fast_grid25"] = grid25["fast"].seconds(h200, False, LAUNCH_S)  # also bounds `fastest`
    unet32, vae32 = meta_models("sd21-base", torch.float32)
    out["reference_fp32"] = image_traces(unet32, vae32, 512, 30)["reference"].seconds(FP32, False, LAUNCH_S)
    unet15, vae15 = meta_models("sd15", torch.bfloat16)
    out["fast_sd15"] = image_traces(unet15, vae15, 512, 30)["fast"].seconds(h200, False, LAUNCH_S)
    x = torch.empty(1, 4, 64, 64, device="meta", dtype=torch.bfloat16)
    ctx = torch.empty(1, 77, unet15.config.cross_attention_dim, device="meta", dtype=torch.bfloat16)
    call = count(lambda: unet15(x, torch.tensor(1, device="meta"), encoder_hidden_states=ctx))
    enc = count(lambda: vae15.encode(torch.empty(1, 3, 512, 512, device="meta", dtype=torch.bfloat16)))
    out["hyperfeatures_all_steps"] = Trace().add(enc).add(call, 50).seconds(h200, False, LAUNCH_S)
    out["hyperfeatures_one_step"] = Trace().add(enc).add(call).seconds(h200, False, LAUNCH_S)
    out["mini_scene"] = _mini_scene_seconds(h200)
    return out


def _mini_scene_seconds(h200: dict) -> float:
    """One 64 px scene on the mini model at its own settings (launch-bound)."""
    from emerdiff_fast import load_pipeline
    from emerdiff_fast.memory import meta_models as build
    from emerdiff_fast.sampling import ReverseSchedule
    from emerdiff_fast.segmenter import recommended_config

    from benchmarks.roofline import Trace, count

    pipe = load_pipeline("mini")
    cfg = recommended_config(pipe)
    steps = len(ReverseSchedule.build(pipe.scheduler.config, cfg))
    unet, vae = build(pipe.unet.config, pipe.vae.config, torch.bfloat16)
    side, members = cfg.resolution // 8, 2 * cfg.num_masks + 1
    x = torch.empty(members, unet.config.in_channels, side, side, device="meta", dtype=torch.bfloat16)
    ctx = torch.empty(members, 77, unet.config.cross_attention_dim, device="meta", dtype=torch.bfloat16)
    call = count(lambda: unet(x, torch.tensor(1, device="meta"), encoder_hidden_states=ctx))
    dec = count(lambda: vae.decode(x[:8, :vae.config.latent_channels]))
    return Trace().add(call, steps + 1).add(dec, 2).seconds(h200, False, LAUNCH_S)


def stages(img: dict[str, float]) -> dict[str, dict]:
    """Per stage: its estimate and the terms it adds up (name -> seconds)."""
    a, n = ASSUMED, 1 + TIMED_IMAGES
    rows = {"triton_attention": n * img["fast_eager"], "channels_last": n * img["fast_eager"],
            "preset grid25": n * img["fast_grid25"], "preset fastest": n * img["fast_grid25"],
            "K = 10": n * img["fast_k10"],
            "compile reduce-overhead": a["compile_reduce-overhead"] + TIMED_IMAGES * img["fast_compiled"],
            "compile max-autotune-no-cudagraphs": (a["compile_max-autotune-no-cudagraphs"]
                                                   + TIMED_IMAGES * img["fast_compiled"])}
    terms = {
        "a-env": {"environment and matmul rate": a["environment"]},
        "b-correctness": {"load SD 2.1-base fp32": a["load_full_model"], "reference fp32, 1 image": img["reference_fp32"],
                          "fast bf16, 1 image": img["fast_eager"], "kernel tests on CUDA": a["kernel_tests"],
                          "int64 offsets check": a["int64_check"]},
        "c-headline": {"reference bf16": n * img["reference_bf16"], "fast eager": n * img["fast_eager"],
                       "fast compiled: compile": a["compile_default"],
                       "fast compiled: timed": n * img["fast_compiled"]},
        "d-side": {k: v for k, v in rows.items() if k not in OPTIONAL_ROWS},
        "e-mini": {"load mini": a["load_mini_model"], f"{MINI_SCENES} scenes": MINI_SCENES * img["mini_scene"]},
        "f-hyperfeatures": {"load SD 1.5": a["load_full_model"], "all steps": n * img["hyperfeatures_all_steps"],
                            "one step": n * img["hyperfeatures_one_step"]},
        "g-checks": {"chunk check (f's SD 1.5), 2 images": 2 * img["fast_sd15"],
                     "CUDA-graph check (tiny model)": a["compile_tiny_reduce-overhead"]},
    }
    out = {name: {"seconds": sum(t.values()), "terms": t} for name, t in terms.items()}
    out["d-side"]["optional_rows"] = {k: rows[k] for k in OPTIONAL_ROWS}
    out["d-side"]["row_seconds"] = rows
    return out


def make_plan() -> dict:
    img = _image_seconds()
    st = stages(img)
    total = ASSUMED["install"] + sum(s["seconds"] for s in st.values())
    return {"device": DEVICE, "budget_s": BUDGET_S, "launch_s": LAUNCH_S, "assumed_s": ASSUMED,
            "image_seconds": img, "stages": st, "total_s": total}


def load_plan(path: Path = PLAN_PATH) -> dict:
    return json.loads(Path(path).read_text())


def markdown(plan: dict) -> str:
    lines = [f"| stage | estimate s | terms (s) |", "| --- | --- | --- |",
             f"| install | {plan['assumed_s']['install']:.0f} | wheels and the project (assumed) |"]
    for name, s in plan["stages"].items():
        terms = "; ".join(f"{k} {v:.1f}" for k, v in s["terms"].items())
        lines.append(f"| {name} | {s['seconds']:.0f} | {terms} |")
    lines.append(f"| **total** | **{plan['total_s']:.0f}** | budget {plan['budget_s']} s |")
    opt = plan["stages"]["d-side"]["optional_rows"]
    lines += ["", "Rows run only when time is left over: " + "; ".join(f"{k} {v:.0f} s" for k, v in opt.items()),
              "", "Modelled seconds per image (H200): " + "; ".join(
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
