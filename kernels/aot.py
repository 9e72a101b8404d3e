"""Ahead-of-time compilation of every Triton kernel for real GPUs, without a GPU.

Triton compiles to PTX and, with the ptxas it ships, to a cubin for any target; no
driver is needed. For each kernel, in every dtype and constexpr configuration the launch
code uses, this compiles for sm_80 (A100) and sm_90 (H100) and reads the cubin's resource
usage with the cuobjdump Triton ships: registers per thread, static and dynamic shared
memory, local memory and stack frame. Register spills land in the stack frame (ptxas -v
reports them as "bytes spill stores" of the same size), so stack + local > 0 counts as
spilling: the bundled ptxas cannot re-read Triton's sm_90 PTX for -v, cuobjdump reads
every cubin. `python -m emerdiff_fast.kernels.aot`
prints the table (--json for machine use); tests/kernels/test_aot.py fails on spills or on
shared memory above what an sm_80 block may use.

Must run without TRITON_INTERPRET (under the interpreter, @triton.jit functions are not
compilable); the test starts it as a subprocess for that reason.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

# Shared memory one thread block may use (opt-in maximum), bytes: A100 163 KB, H100 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
HEAD_DIMS = (40, 64, 80, 160)  # SD 1.5 (40/80/160) and SD 2.1 (64) attention head sizes


def specs() -> list[tuple[str, object, dict, dict]]:
    """(label, jit function, signature, constexprs) for every configuration launched."""
    import importlib

    # the modules, not the same-named ops that the package namespace exports
    kmeans_step, modulate, shared_attention = (importlib.import_module(f"{__package__}.{m}")
                                               for m in ("kmeans_step", "modulate", "shared_attention"))
    out = []
    for dt in ("bf16", "fp16", "fp32"):
        sig = {"shared_ptr": f"*{dt}", "masks_ptr": f"*{dt}", "index_ptr": "*i64", "coef_ptr": f"*{dt}",
               "out_ptr": f"*{dt}", "N": "i32", "C": "i32", **dict.fromkeys(modulate.BLOCKS, "constexpr")}
        out.append((f"modulate[{dt}]", modulate._modulate_kernel, sig, dict(modulate.BLOCKS)))
    sig = {"x_ptr": "*fp32", "c_ptr": "*fp32", "labels_ptr": "*i64", "dist_ptr": "*fp32", "N": "i32", "K": "i32",
           "D": "i32", "R": "i32", **dict.fromkeys(kmeans_step.ASSIGN_BLOCKS, "constexpr")}
    out.append(("kmeans_assign[fp32]", kmeans_step._assign_kernel, sig, dict(kmeans_step.ASSIGN_BLOCKS)))
    sig = {"x_ptr": "*fp32", "labels_ptr": "*i64", "sums_ptr": "*fp32", "counts_ptr": "*fp32", "N": "i32",
           "K": "i32", "D": "i32", "R": "i32", **dict.fromkeys(kmeans_step.UPDATE_BLOCKS, "constexpr")}
    out.append(("kmeans_update[fp32]", kmeans_step._update_kernel, sig, dict(kmeans_step.UPDATE_BLOCKS)))
    for dt in ("bf16", "fp16", "fp32"):
        for d in HEAD_DIMS:
            blocks = shared_attention.BLOCKS["fp32" if dt == "fp32" else "16bit"]
            const = {"D": d, "IEEE": dt == "fp32", "UPCAST": False, **blocks}
            sig = {"p_ptr": f"*{dt}", "v_ptr": f"*{dt}", "out_ptr": f"*{dt}", "N": "i32", "M": "i32", "C": "i32",
                   "BD": "i32", "stride_ph": "i32", "stride_pn": "i32", **dict.fromkeys(const, "constexpr")}
            out.append((f"shared_attention[{dt},D={d}]", shared_attention._shared_pv_kernel, sig, const))
    return out


def _tool(name: str) -> str:
    import triton.backends.nvidia as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin", name)


def resource_usage(cubin: bytes) -> dict:
    """cuobjdump -res-usage of one cubin -> {REG, STACK, SHARED, LOCAL} of its kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def compile_all(archs=(80, 90)) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    for label, fn, sig, const in specs():
        for arch in archs:
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", arch, 32))
            use = resource_usage(k.asm["cubin"])
            rows.append({"kernel": label, "arch": f"sm_{arch}", "registers": use["REG"],
                         "shared_bytes": use["SHARED"] + k.metadata.shared,
                         "spill_bytes": use["LOCAL"] + use["STACK"], "num_warps": k.metadata.num_warps,
                         "shared_limit": SHARED_LIMIT[arch], "triton": triton.__version__})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("error: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    rows = compile_all()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("| kernel | arch | registers | shared (B) | spills: stack + local (B) | warps |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['kernel']} | {r['arch']} | {r['registers']} | {r['shared_bytes']} | {r['spill_bytes']} "
              f"| {r['num_warps']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
