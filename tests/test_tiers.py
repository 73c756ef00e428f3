"""The two test tiers: `-m "not slow"` is the inner loop, the whole suite is CI's.

A marker that misses its test puts an end-to-end run into the inner loop without a word (a helper
once slid in between `@pytest.mark.slow` and its test), and a misspelt one only warns. The fast
tier starts no MLflow server: a test that needs one registers or serves a model, and is slow.
Plain file reads and the session's own collection: no servers, no subprocesses.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
# pytest's own marks and those of the plugins we use; every other one is registered in pyproject
BUILTIN_MARKS = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings"}
PLUGIN_MARKS = {"timeout"}


def registered_marks() -> set[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    lines = config["tool"]["pytest"]["ini_options"]["markers"]
    return {line.split(":")[0].split("(")[0].strip() for line in lines}


def mark_names(node: ast.expr) -> list[str]:
    """NAME of every `pytest.mark.NAME` (called or not) in an expression."""
    names = []
    for sub in ast.walk(node):
        if (
            isinstance(sub, ast.Attribute)
            and isinstance(sub.value, ast.Attribute)
            and sub.value.attr == "mark"
            and isinstance(sub.value.value, ast.Name)
            and sub.value.value.id == "pytest"
        ):
            names.append(sub.attr)
    return names


def misplaced_marks(source: str) -> list[str]:
    """`pytest.mark.*` decorators on a function or class pytest does not collect."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        collected = node.name.startswith("Test" if isinstance(node, ast.ClassDef) else "test")
        for decorator in node.decorator_list:
            if mark_names(decorator) and not collected:
                found.append(f"{ast.unparse(decorator)} on {node.name} (line {node.lineno})")
    return found


def used_marks(source: str) -> set[str]:
    return set(mark_names(ast.parse(source)))


def test_every_mark_sits_on_a_test():
    misplaced = {
        path.name: found
        for path in sorted(TESTS.glob("*.py"))
        if (found := misplaced_marks(path.read_text(encoding="utf-8")))
    }
    assert misplaced == {}, misplaced


def test_every_mark_is_known():
    known = registered_marks() | BUILTIN_MARKS | PLUGIN_MARKS
    assert {"slow", "gpu"} <= registered_marks()
    unknown = {
        path.name: sorted(names - known)
        for path in sorted(TESTS.glob("*.py"))
        if (names := used_marks(path.read_text(encoding="utf-8"))) - known
    }
    assert unknown == {}, unknown


def test_the_checkers_see_a_misplaced_or_misspelt_mark():
    source = (
        "import pytest\n\n"
        "@pytest.mark.slow\n"
        "def _helper():\n    pass\n\n"
        "def test_unmarked():\n    pass\n\n"
        "@pytest.mark.slwo\n"
        "def test_typo():\n    pass\n\n"
        "@pytest.mark.parametrize('x', [1, pytest.param(2, marks=pytest.mark.slow)])\n"
        "def test_params(x):\n    pass\n\n"
        "@pytest.mark.gpu\n"
        "class TestGroup:\n    pass\n"
    )
    assert misplaced_marks(source) == ["pytest.mark.slow on _helper (line 4)"]
    assert used_marks(source) == {"slow", "slwo", "parametrize", "gpu"}


def test_the_fast_tier_starts_no_mlflow_server(request):
    """Of the tests this session runs (all of them, or those `-m "not slow"` selects), every one
    that uses the session's MLflow server is marked slow."""
    unmarked = [
        item.nodeid
        for item in request.session.items
        if "mlflow_server" in getattr(item, "fixturenames", ())
        and item.get_closest_marker("slow") is None
    ]
    assert unmarked == [], unmarked
