"""The layer contract in pyproject.toml holds, and a wrong-way import breaks it.

`lint-imports` (import-linter) runs in CI too; these tests show the contract is not vacuous: a copy
of the tree with one upward import (storage importing tasks) fails it and names the import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("flows", "tasks", "model", "storage", "bench", "tests")

pytestmark = pytest.mark.skipif(
    not LINT_IMPORTS.exists(), reason="import-linter is not installed (pip install -e '.[dev]')"
)


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _copy_tree(dest: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_tree_keeps_its_layers():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.lower().replace("0 broken", "")


@pytest.mark.parametrize(
    ("module", "line", "named"),
    [
        ("storage/uri.py", "import tasks.cache", "storage.uri -> tasks.cache"),
        ("model/gpt.py", "import flows.defaults", "model.gpt -> flows.defaults"),
        ("model/gpt.py", "import prefect", "model.gpt -> prefect"),
        ("bench/common.py", "import tests.conftest", "bench.common -> tests.conftest"),
    ],
)
def test_a_wrong_way_import_breaks_the_contract(tmp_path, module, line, named):
    root = _copy_tree(tmp_path)
    path = root / module
    path.write_text(path.read_text(encoding="utf-8") + f"\n{line}  # noqa\n", encoding="utf-8")
    result = _lint(root)
    assert result.returncode != 0, result.stdout
    assert named in result.stdout, result.stdout
