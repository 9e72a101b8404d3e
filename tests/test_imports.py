"""One way down (issue 19): no module of emerdiff_fast imports one that imports it back,
directly or through others, function-level imports included; the backends never see the
segmenter."""
import ast
import re
from pathlib import Path

import emerdiff_fast
import emerdiff_fast.kernels

PACKAGE = Path(emerdiff_fast.__file__).parent
ROOT = PACKAGE.parent
# emerdiff_fast/kernels/ holds the package's __init__; the op sources sit in the top-level
# kernels/ folder of a checkout (copies beside __init__ in an installed wheel)
KERNEL_SOURCES = [Path(p) for p in emerdiff_fast.kernels.__path__]


def _module_name(path: Path, root: Path, prefix: str) -> str:
    parts = [prefix, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p, PACKAGE, "emerdiff_fast"): p for p in PACKAGE.rglob("*.py")}
    for folder in KERNEL_SOURCES:
        modules |= {_module_name(p, folder, "emerdiff_fast.kernels"): p for p in folder.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):  # every import, at any depth
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from X import y`: the submodule X.y where there is one, else X itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def _cycle(graph):
    colour, stack = {}, []

    def visit(n):
        colour[n] = "grey"
        stack.append(n)
        for m in sorted(graph[n]):
            if colour.get(m) == "grey":
                return stack[stack.index(m):] + [m]
            if m not in colour and (found := visit(m)):
                return found
        colour[n] = "black"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in colour and (found := visit(n)):
            return found
    return None


def test_no_import_cycles():
    graph = _graph()
    assert "emerdiff_fast.cli" in graph and graph["emerdiff_fast.commands.segment"]  # the walk sees them
    assert graph["emerdiff_fast.kernels.modulate"] == {"emerdiff_fast.kernels._dispatch"}
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_walk_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_backends_do_not_touch_the_segmenter():
    graph = _graph()
    for backend in ("engine", "reference", "replay", "batching", "sampling", "attention", "prefix"):
        name = f"emerdiff_fast.{backend}"
        assert "emerdiff_fast.segmenter" not in graph[name] and "emerdiff_fast" not in graph[name], name
        source = (PACKAGE / f"{backend}.py").read_text()
        assert not re.search(r"\bseg\b", source), name  # the segmenter is never passed in


def test_a_checkout_imports_its_kernels_without_an_installer():
    """On the GPU machine the project is a --target install shadowed by the checkout itself
    (`python -m benchmarks.gpu_run` from the repository root puts it first on sys.path), so
    no installer's copy of the kernel sources is found: the package reads them from the
    checkout's kernels/ folder. Simulated with site-packages on the path but its .pth files (the editable
    install's finder) not run."""
    import site
    import subprocess
    import sys

    code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}]; sys.path += {site.getsitepackages()!r}; "
            "import emerdiff_fast.kernels as k, emerdiff_fast; print(k.__name__, k.modulate is not None)")
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.split() == ["emerdiff_fast.kernels", "True"], r.stderr[-2000:]


# Imports, from the repository's root as `python -m` and pytest's pythonpath put it first on
# sys.path, with every custom-op registration counted (a second copy of our sources would
# register each op again, and the later registration silently wins).
_ROOT_IMPORTS = """
import importlib.metadata, json, sys, torch
registered = []
_custom_op = torch.library.custom_op
def counting(name, *args, **kwargs):
    registered.append(name)
    return _custom_op(name, *args, **kwargs)
torch.library.custom_op = counting
import kernels
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextModel
import emerdiff_fast, emerdiff_fast.kernels
from transformers.integrations import hub_kernels
dist = importlib.metadata.distribution("kernels")
print(json.dumps({"kernels": kernels.__file__, "installed": str(dist.locate_file("kernels/__init__.py")),
                  "hub_kernels_imports": hub_kernels.__name__, "registered": registered,
                  "ours": sorted(m for m, mod in sys.modules.items() if (getattr(mod, "__file__", None) or "")
                                 .startswith(sys.argv[1]))}))
"""


def test_the_root_shadows_no_kernels_package():
    """Hugging Face's `kernels` (a dependency of the newest transformers; in the test extras)
    is what `import kernels` gives from the root: our kernels/ folder has no __init__.py.
    diffusers' and transformers' models import, and our ops register once. (tests/test_docs.py
    runs the `emerdiff-fast` console script with PYTHONPATH at the root too.)"""
    import json
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _ROOT_IMPORTS, str(ROOT / "kernels")], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert not seen["kernels"].startswith(str(ROOT)) and Path(seen["kernels"]) == Path(seen["installed"]), seen
    ops = [name for name in seen["registered"] if name.startswith("emerdiff::")]
    assert sorted(ops) == sorted(set(ops)) and len(ops) == 4, ops  # modulate, shared_attention, kmeans x 2
    assert all(m.startswith("emerdiff_fast.kernels.") for m in seen["ours"]), seen["ours"]

