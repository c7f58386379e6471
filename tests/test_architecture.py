"""Structural rules of the package that a refactoring must not break silently.

- Only :mod:`icstools.recording.hooks` registers hooks (so every hook is removed as a group).
- Only :mod:`icstools.recording.isolation` saves and restores RNG states (one side-effect guard).
- The recorder's core stays small, and no function of the recording package is long.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "icstools"
HOOK_CALL = re.compile(r"^register_(\w+_)?hook$")
RNG_CALLS = {"fork_rng", "get_rng_state", "set_rng_state", "get_rng_state_all"}


def _calls(path: Path) -> list[tuple[str, int]]:
    """(attribute or function name, line) of every call in a module."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            out.append((name, node.lineno))
    return out


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_only_the_hook_module_registers_hooks() -> None:
    offenders = [
        f"{p.relative_to(PACKAGE.parent)}:{line} {name}"
        for p in _modules()
        if p != PACKAGE / "recording" / "hooks.py"
        for name, line in _calls(p)
        if HOOK_CALL.match(name)
    ]
    assert not offenders, "hooks registered outside icstools/recording/hooks.py: " + ", ".join(
        offenders
    )


def test_the_rule_catches_a_hook_registration(tmp_path: Path) -> None:
    p = tmp_path / "m.py"
    p.write_text("m.register_forward_pre_hook(f)\nt.register_hook(g)\nopt.step()\n")
    assert [n for n, _ in _calls(p) if HOOK_CALL.match(n)] == [
        "register_forward_pre_hook",
        "register_hook",
    ]


def test_only_the_isolation_guard_saves_rng_states() -> None:
    offenders = [
        f"{p.relative_to(PACKAGE.parent)}:{line} {name}"
        for p in _modules()
        if p != PACKAGE / "recording" / "isolation.py"
        for name, line in _calls(p)
        if name in RNG_CALLS
    ]
    assert not offenders, "RNG saved outside icstools/recording/isolation.py: " + ", ".join(
        offenders
    )


def test_the_recorder_core_is_small() -> None:
    lines = (PACKAGE / "recording" / "core.py").read_text(encoding="utf-8").count("\n")
    assert lines <= 400, f"icstools/recording/core.py has {lines} lines (at most 400)"


@pytest.mark.parametrize(
    "path", sorted((PACKAGE / "recording").rglob("*.py")), ids=lambda p: p.name
)
def test_no_long_function_in_the_recording_package(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long, f"{path.name}: {long}"
