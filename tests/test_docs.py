"""Every shell and Python snippet in README.md and docs/ runs as written, unless it needs
something this machine lacks; those carry a marker saying what (`<!-- needs: weights -->`
on the line before the block), and this test checks that the marker is there and known.
`install` blocks run without their pip lines (the test runs in the installed environment)."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("triton_off")  # the kernels are not the point here (conftest)

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NEEDS = {"weights", "data", "gpu", "long", "install"}  # downloaded weights, data sets, a GPU, minutes, pip
BLOCK = re.compile(r"```(bash|sh|python)\n(.*?)```", re.S)
MARKER = re.compile(r"<!-- needs: ([\w, ]+) -->")


def blocks():
    """(page:line, language, code, needs) of every shell and Python block."""
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in BLOCK.finditer(text):
            before = text[:m.start()].rstrip().split("\n")[-1]
            marker = MARKER.fullmatch(before.strip())
            needs = {n.strip() for n in marker.group(1).split(",")} if marker else set()
            line = text[:m.start()].count("\n") + 1
            out.append((f"{page.relative_to(REPO)}:{line}", m.group(1), m.group(2), needs))
    return out


def test_markers_are_known():
    """A block that is not run says why, in known words; the rest run below."""
    for where, _, _, needs in blocks():
        assert needs <= NEEDS, f"{where}: unknown marker(s) {needs - NEEDS}; known: {sorted(NEEDS)}"
    assert sum(not (needs - {"install"}) for *_, needs in blocks()) >= 4


def test_the_pages_exist_and_do_not_point_outside_the_repository():
    names = {p.name for p in PAGES}
    assert {"method.md", "cli.md", "api.md", "evaluation.md", "hyperfeatures.md", "mini-model.md", "gpu.md",
            "architecture.md"} <= names
    for page in PAGES:
        assert "../shared" not in page.read_text(), page
    readme = (REPO / "README.md").read_text()
    assert 150 <= readme.count("\n") <= 200
    for link in re.findall(r"\]\((docs/[\w.-]+)\)", readme):
        assert (REPO / link).is_file(), link


@pytest.mark.parametrize("lang, code, needs", [pytest.param(lang, code, needs, id=where)
                                               for where, lang, code, needs in blocks() if not needs - {"install"}])
def test_snippet_runs(lang, code, needs, tmp_path):
    # the snippet's relative paths (examples/...) resolve in a scratch copy of the folders it reads
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    # PYTHONPATH puts the checkout's root first, as running from it does (its kernels/ folder
    # must not shadow Hugging Face's `kernels`); the running interpreter's bin folder comes
    # first on PATH, so `emerdiff-fast` is this environment's even when it is not activated.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": path}
    if lang == "python":
        cmd = [sys.executable, "-c", code]
    else:
        lines = [ln for ln in code.splitlines() if not ("install" in needs and ln.lstrip().startswith("pip "))]
        cmd = ["bash", "-euo", "pipefail", "-c", "\n".join(lines)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    if lang == "python":  # `print(...)  # what it prints` (up to "..."): the snippet says what to expect
        expected = [ln.split("#", 1)[1].strip() for ln in code.splitlines()
                    if ln.startswith("print(") and "#" in ln]
        printed = r.stdout.strip().splitlines()
        assert len(printed) == len(expected), r.stdout
        for got, want in zip(printed, expected):
            assert got.startswith(want.split("...")[0]), (got, want)
    if lang != "python" and "--out out/" in code:
        assert any((tmp_path / "out").iterdir())
