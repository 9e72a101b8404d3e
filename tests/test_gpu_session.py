"""The one GPU command: its dry run (every stage's code on the CPU), the time plan, the skip
rule, and the results table from a partial set of stage files."""
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks import gpu_run
from benchmarks.gpu_plan import BUDGET_S, PLAN_PATH, load_plan, stages

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-dry")
    start = time.perf_counter()
    r = subprocess.run(["bash", "benchmarks/gpu_session.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OUT": str(out)}, timeout=600)
    return out, r, time.perf_counter() - start


def test_dry_run_writes_every_stage(dry_run):
    out, r, seconds = dry_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in gpu_run.STAGES:
        record = json.loads((out / f"{stage}.json").read_text())
        assert record["dry_run"] and not record.get("skipped") and "error" not in record, (stage, record)
        assert record["estimate_s"] > 0 and record["wall_s"] >= 0
    assert (out / "log.txt").stat().st_size > 0
    assert "every stage wrote its JSON" in r.stdout
    headline = json.loads((out / "c-headline.json").read_text())["rows"]
    assert [row["name"] for row in headline] == ["reference", "fast eager", "fast compiled (default)"]
    side = [row["name"] for row in json.loads((out / "d-side.json").read_text())["rows"]]
    assert side[:5] == ["triton_attention", "channels_last", "preset grid25", "preset fastest", "K = 10"]
    assert seconds < 180, f"the dry run took {seconds:.0f} s"


def test_table_works_on_a_partial_set(dry_run, tmp_path):
    out, _, _ = dry_run
    for stage in ("a-env", "b-correctness", "c-headline"):  # a run killed during d-side
        (tmp_path / f"{stage}.json").write_text((out / f"{stage}.json").read_text())
    text = gpu_run.table(tmp_path)
    assert "| d-side | missing (killed before it ended?)" in text and "| c-headline | done" in text
    assert "| fast eager |" in text and "Correctness: fast bf16 vs reference fp32" in text
    results = tmp_path / "RESULTS.md"
    assert gpu_run.main(["--table", str(tmp_path), "--results-md", str(results)]) == 0
    assert "## GPU session" in results.read_text()


def test_a_stage_over_the_time_left_is_skipped_and_recorded(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(gpu_run, "STAGES", {name: (lambda s, n=name: ran.append(n) or {"x": 1})
                                            for name in gpu_run.STAGES})
    plan = load_plan()
    s = gpu_run.Session(tmp_path, dry_run=False, budget_s=100.0, started=time.time(), plan=plan)
    fits = [n for n in gpu_run.STAGES if plan["stages"][n]["seconds"] <= 90]
    assert gpu_run.run(s) == 0
    assert ran == fits and len(fits) < len(gpu_run.STAGES)
    for name in gpu_run.STAGES:
        record = json.loads((tmp_path / f"{name}.json").read_text())
        assert record.get("skipped", False) == (name not in fits)
        if name not in fits:
            assert "exceeds the" in record["reason"]


def test_the_plan_fits_eight_minutes_and_is_current():
    plan = load_plan()
    assert list(plan["stages"]) == list(gpu_run.STAGES)
    total = plan["assumed_s"]["install"] + sum(s["seconds"] for s in plan["stages"].values())
    assert abs(total - plan["total_s"]) < 1e-6 and total <= BUDGET_S
    for s in plan["stages"].values():
        assert abs(s["seconds"] - sum(s["terms"].values())) < 1e-6
    # the committed estimates are today's arithmetic on the committed per-image seconds (the
    # meta traces behind those take ~15 s: `python -m benchmarks.gpu_plan` redoes them)
    again = stages(plan["image_seconds"])
    assert {k: round(v["seconds"], 6) for k, v in again.items()} == \
        {k: round(v["seconds"], 6) for k, v in plan["stages"].items()}, PLAN_PATH


def test_without_cuda_the_real_run_refuses(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real session")
    assert gpu_run.main(["--out", str(tmp_path / "o")]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_env_stage_on_cuda_with_the_queries_mocked(tmp_path, monkeypatch):
    """Stage a's CUDA branch (device properties, driver, the matmul rate), CUDA queries mocked."""
    from types import SimpleNamespace

    import torch

    import benchmarks.common as common

    s = gpu_run.Session(tmp_path, dry_run=True, budget_s=1e9, started=time.time(), plan=load_plan())
    s.device = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: SimpleNamespace(total_memory=141e9, major=9, minor=0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "NVIDIA H200")
    monkeypatch.setattr(common, "peak_matmul_tflops", lambda d: {"bfloat16": 800.0, "float32": 50.0})
    monkeypatch.setattr(gpu_run.subprocess, "run", lambda *a, **k: SimpleNamespace(stdout="570.1\n"))
    out = gpu_run.stage_env(s)
    assert out["env"]["device"] == "NVIDIA H200" and out["env"]["memory_gb"] == 141
    assert out["env"]["capability"] == "9.0" and out["env"]["driver"] == "570.1"
    assert out["mfu_denominator_tflops"] == 800.0 and s.results["peak_tflops"] == 800.0
