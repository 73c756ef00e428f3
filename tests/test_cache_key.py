"""Stage cache keys cover the code each stage runs (its import closure), so they cannot go stale.

Everything here reads source files only: no Prefect flows, no torch, no training.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from tasks.cache import ENTRY_MODULES, REPO_ROOT, STAGES, code_files, code_version

COPIED = ("flows", "tasks", "model", "storage", "bench", "tests")


def copy_tree(dest: Path) -> Path:
    for name in COPIED:
        shutil.copytree(REPO_ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def keys(root: Path) -> dict[str, str]:
    return {stage: code_version(stage, root) for stage in STAGES}


def append_comment(path: Path) -> None:
    with path.open("a") as f:
        f.write("\n# an edit\n")


def relative(stage: str, root: Path = REPO_ROOT) -> set[str]:
    return {p.relative_to(root).as_posix() for p in code_files(stage, root)}


def test_closures_hold_the_stage_code_and_nothing_else():
    closures = {stage: relative(stage) for stage in STAGES}
    assert {"model/data.py", "model/config.py", "tasks/train.py"} <= closures["train"]
    assert {"model/train.py", "model/launch/torchrun.py"} <= closures["train"]
    assert "tasks/split.py" in closures["split"]
    assert {"model/tokenizer.py", "tasks/tokenize.py"} <= closures["tokenize"]
    for stage, files in closures.items():
        # importing a.b runs a/__init__.py: each reached package's __init__ is in
        for name in files:
            assert f"{name.split('/')[0]}/__init__.py" in files, (stage, name)
        bad = {f for f in files if f.split("/")[0] in ("bench", "tests", "flows")}
        assert not bad, f"{stage}'s code reaches {sorted(bad)}"


def test_copy_has_the_same_closures(tmp_path):
    root = copy_tree(tmp_path)
    for stage in STAGES:
        assert relative(stage, root) == relative(stage)


@pytest.mark.parametrize(
    "edited, must_change",
    [
        ("model/data.py", {"tokenize", "split", "train"}),
        ("tasks/split.py", {"split"}),
        ("model/tokenizer.py", {"tokenize"}),
        ("tasks/tokenize.py", {"tokenize"}),
        ("model/train.py", {"train"}),  # run by model.launch as `python -m model.train`
        ("model/gpt.py", {"train"}),
        ("storage/uri.py", {"tokenize", "split", "train"}),
    ],
)
def test_editing_code_a_stage_runs_changes_its_key(tmp_path, edited, must_change):
    root = copy_tree(tmp_path)
    before = keys(root)
    append_comment(root / edited)
    after = keys(root)
    changed = {stage for stage in STAGES if before[stage] != after[stage]}
    assert must_change <= changed
    if edited == "tasks/split.py":
        assert "tokenize" not in changed  # tokenize runs before split and never imports it


@pytest.mark.parametrize(
    "edited",
    ["bench/tokenize.py", "bench/train_step.py", "tests/test_data.py", "flows/pipeline.py"],
)
def test_editing_code_no_stage_runs_keeps_the_keys(tmp_path, edited):
    root = copy_tree(tmp_path)
    before = keys(root)
    append_comment(root / edited)
    assert keys(root) == before


def test_keys_do_not_depend_on_where_the_tree_is(tmp_path):
    """Machines sharing a store check the code out in different folders: same code, same key."""
    one, two = copy_tree(tmp_path / "one"), copy_tree(tmp_path / "two")
    assert keys(one) == keys(two)
    (two / "model/data.py").rename(two / "model/data_moved.py")
    assert keys(two)["train"] != keys(one)["train"]  # a module gone is a change too


def _top_level_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_bytes()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_imports_inside_functions_are_followed(tmp_path):
    # tasks.train imports tasks.registry inside log_model only; storage.uri imports storage.s3
    # on first use only
    for stage, module, path in [
        ("train", "tasks.registry", "tasks/registry.py"),
        ("tokenize", "storage.s3", "storage/s3.py"),
    ]:
        files = code_files(stage)
        assert REPO_ROOT / path in files
        assert not any(module in _top_level_imports(f) for f in files), (
            f"{module} is imported at module level: pick another example"
        )
    root = copy_tree(tmp_path)
    before = keys(root)
    append_comment(root / "tasks/registry.py")
    assert code_version("train", root) != before["train"]


def test_relative_imports_are_followed(tmp_path):
    root = copy_tree(tmp_path)
    (root / "tasks/_helper.py").write_text("from .._other import nothing\nVALUE = 1\n")
    (root / "tasks/_helper2.py").write_text("VALUE = 2\n")
    with (root / "tasks/split.py").open("a") as f:
        f.write(
            "\n\ndef _uses_helpers():\n    from . import _helper\n    from ._helper2 import VALUE\n"
        )
    files = relative("split", root)
    assert {"tasks/_helper.py", "tasks/_helper2.py"} <= files
    before = code_version("split", root)
    append_comment(root / "tasks/_helper2.py")
    assert code_version("split", root) != before


def test_train_entry_modules_include_what_launch_runs():
    """The programs model.launch starts with `python -m NAME` run the training: their code is
    part of train's key."""
    tree = ast.parse((REPO_ROOT / "model/launch/torchrun.py").read_bytes())
    run_as_main = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.List):
            items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            pairs = zip(items, items[1:], strict=False)
            run_as_main.update(b for a, b in pairs if a == "-m" and b)
    first_party = {m for m in run_as_main if (REPO_ROOT / m.split(".")[0]).is_dir()}
    assert first_party == {"model.train"}
    assert first_party <= set(ENTRY_MODULES["train"])


def test_default_root_matches_cache_key_inputs():
    from tasks.cache import cache_key

    assert code_version("train") == code_version("train", REPO_ROOT)
    assert cache_key("split", a=1) == cache_key("split", a=1)
    assert cache_key("split", a=1) != cache_key("train", a=1)
