"""The suite passes in any order: tests change torch's settings only through torch's own
context managers, and conftest's settings_left_as_found checks every test at run time."""
import ast
from pathlib import Path

TESTS = Path(__file__).parent
CONFIG_MODULES = ("torch._dynamo.config", "torch._inductor.config", "torch._functorch.config")


def _monkeypatched_configs(source: str) -> list[str]:
    """`monkeypatch.setattr(<torch config module>, ...)` calls in source: undoing such a patch
    can hide the option for the rest of the process (seen with dynamo's recompile_limit)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setattr"
                and node.args and ast.unparse(node.args[0]) in CONFIG_MODULES):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_check_finds_a_monkeypatched_config():
    assert _monkeypatched_configs("monkeypatch.setattr(torch._dynamo.config, 'recompile_limit', 5)")
    assert not _monkeypatched_configs("with torch._dynamo.config.patch(recompile_limit=5): pass")


def test_no_test_monkeypatches_a_torch_config():
    found = {p.name: hits for p in sorted(TESTS.rglob("*.py")) if (hits := _monkeypatched_configs(p.read_text()))}
    assert not found, f"use torch's config.patch(...) instead: {found}"
