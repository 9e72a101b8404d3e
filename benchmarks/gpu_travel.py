"""What travels to the GPU machine, and what comes back: the device tool copies the working
tree (tracked files and untracked ones git does not ignore) plus the carried ignored folders,
64 MiB in all, and returns at most 8 files of $OUT. This module is the one list of what
the GPU image lacks (the wheels gpu_prepare.sh downloads) and the check the dry run makes.
It imports no torch, so it answers in a second.

    python -m benchmarks.gpu_travel --check     # sizes, limits, the wheel list against the image
    python -m benchmarks.gpu_travel --wheels    # the specs gpu_prepare.sh downloads, one a line
    python -m benchmarks.gpu_travel --digest    # the source digest a GPU run records (provenance)
"""
from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 60 * 2**20   # the tool's 64 MiB, less a margin
CARRY = (".whl", ".skeletons")
MAX_OUT_FILES = 8          # files of $OUT that come back, the log included

# What the GPU image has, as its notes last listed it (Python 3.12): nothing here is carried.
IMAGE_PACKAGES = ("torch", "triton", "transformers", "huggingface-hub", "safetensors", "tokenizers", "numpy",
                  "scipy", "pillow", "tqdm", "zipp", "scikit-image", "setuptools", "pytest", "pytest-benchmark",
                  "pytest-timeout", "pytest-xdist", "httpx", "filelock", "regex", "pyyaml", "packaging")
# What it lacks: diffusers and what diffusers imports that nothing in the image brings
# (importlib_metadata; requests, which pipeline_utils imports at the top, with its own two
# needs the image lacks: urllib3 and charset_normalizer; idna and certifi come with httpx).
WHEELS = ("diffusers==0.42.1", "importlib_metadata", "requests", "urllib3", "charset_normalizer")
SOURCES = ("emerdiff_fast", "kernels", "benchmarks", "setup.py")  # what the source digest covers


def norm(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def spec_name(spec: str) -> str:
    return norm(re.split(r"[=<>!~\[; ]", spec, maxsplit=1)[0])


def tree_files(root: Path = ROOT) -> list[Path]:
    """The working tree as the device tool copies it: tracked files and untracked files that
    git does not ignore (a tracked file deleted here is not there)."""
    try:
        r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                           capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):  # not a git checkout: every file but the carried ones
        return [p for p in root.rglob("*") if p.is_file() and not p.relative_to(root).parts[0] in (*CARRY, ".git")]
    return [root / p for p in sorted(set(r.stdout.decode().split("\0"))) if p and (root / p).is_file()]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def travel(root: Path = ROOT) -> dict:
    """Bytes that would travel: the tree, and each carried folder that exists."""
    parts = {"tree": sum(p.stat().st_size for p in tree_files(root))}
    parts.update({c: folder_bytes(root / c) for c in CARRY if (root / c).is_dir()})
    return {"parts": parts, "total": sum(parts.values()), "limit": LIMIT_BYTES}


def problems(root: Path = ROOT) -> list[str]:
    """Why the GPU call would be refused or carry more than it needs; [] when it fits."""
    found = []
    t = travel(root)
    if t["total"] > LIMIT_BYTES:
        found.append(f"{t['total'] / 2**20:.1f} MiB would travel, over the {LIMIT_BYTES / 2**20:.0f} MiB limit: "
                     + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in t["parts"].items()))
    image = {norm(n) for n in IMAGE_PACKAGES}
    wanted = {spec_name(w) for w in WHEELS}
    if wanted & image:
        found.append(f"the wheel list carries what the GPU image has: {', '.join(sorted(wanted & image))}")
    wheels = root / ".whl"
    if wheels.is_dir():  # the downloaded set (on a machine that ran gpu_prepare.sh)
        names = {norm(p.name.split("-")[0]) for p in wheels.glob("*.whl")}
        extra, missing = names - wanted, wanted - names
        if extra:
            found.append(f".whl holds wheels the list does not name (the image has them, or they are stale): "
                         f"{', '.join(sorted(extra))}; rerun benchmarks/gpu_prepare.sh")
        if missing:
            found.append(f".whl lacks {', '.join(sorted(missing))}; rerun benchmarks/gpu_prepare.sh")
    return found


def source_digest(root: Path = ROOT) -> str:
    """sha256 over the source files that decide a GPU run's numbers (names and bytes), the
    same on both machines: .git does not travel, so this ties the results to a commit."""
    h = hashlib.sha256()
    for path in sorted(p for s in SOURCES for p in ([root / s] if (root / s).is_file() else (root / s).rglob("*.py"))):
        if "__pycache__" in path.parts:
            continue
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--check", action="store_true", help="print what would travel; exit 1 on any problem")
    g.add_argument("--wheels", action="store_true", help="print the wheel specs to download, one a line")
    g.add_argument("--digest", action="store_true", help="print the source digest")
    args = p.parse_args(argv)
    if args.wheels:
        print("\n".join(WHEELS))
        return 0
    if args.digest:
        print(source_digest())
        return 0
    t = travel()
    print(f"travel: {t['total'] / 2**20:.1f} MiB of {LIMIT_BYTES / 2**20:.0f} ("
          + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in t["parts"].items()) + ")")
    found = problems()
    for line in found:
        print(f"travel: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
