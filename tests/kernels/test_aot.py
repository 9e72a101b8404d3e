"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed), without
register spills and within the shared memory an sm_80 block may use."""
import json
import os
import subprocess
import sys

import pytest


def test_kernels_compile_for_sm80_and_sm90_without_spills():
    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the installed triton cannot target CUDA here: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    r = subprocess.run([sys.executable, "-m", "emerdiff_fast.kernels.aot", "--json"], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout)
    from emerdiff_fast.kernels.aot import SHARED_LIMIT, specs

    assert len(rows) == 2 * len(specs()) and {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    print("\n".join(f"{r['kernel']:32s} {r['arch']} regs={r['registers']} shared={r['shared_bytes']} "
                    f"spills={r['spill_bytes']}" for r in rows))
    for row in rows:
        assert row["spill_bytes"] == 0, row
        assert row["shared_bytes"] <= SHARED_LIMIT[80], row
        assert 0 < row["registers"] <= 255, row
