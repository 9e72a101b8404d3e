"""One way down (issue 19): no module of emerdiff_fast imports one that imports it back,
directly or through others, function-level imports included; the backends never see the
segmenter."""
import ast
import re
from pathlib import Path

import emerdiff_fast
import emerdiff_fast.kernels

PACKAGE = Path(emerdiff_fast.__file__).parent
KERNELS = Path(emerdiff_fast.kernels.__file__).parent  # kernels/, installed as emerdiff_fast.kernels


def _module_name(path: Path, root: Path, prefix: str) -> str:
    parts = [prefix, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p, PACKAGE, "emerdiff_fast"): p for p in PACKAGE.rglob("*.py")}
    modules |= {_module_name(p, KERNELS, "emerdiff_fast.kernels"): p for p in KERNELS.rglob("*.py")}
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
    no installer maps kernels/ to emerdiff_fast.kernels: the package loads it from beside
    itself. Simulated with site-packages on the path but its .pth files (the editable
    install's finder) not run."""
    import site
    import subprocess
    import sys

    code = (f"import sys; sys.path[:0] = [{str(PACKAGE.parent)!r}]; sys.path += {site.getsitepackages()!r}; "
            "import emerdiff_fast.kernels as k, emerdiff_fast; print(k.__name__, k.modulate is not None)")
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert r.returncode == 0 and r.stdout.split() == ["emerdiff_fast.kernels", "True"], r.stderr[-2000:]
