"""Content-keyed stage results kept in the store, so every process and machine sharing the store
re-uses them.

A stage's outputs live in a folder named by a key over what they depend on (content hashes and
settings, never names or run ids), and `manifest.json`, written last, marks the folder complete.
A crashed stage leaves no manifest, so its folder is simply written again.

Two runs that need the same result at the same time do not both compute it: `claim` takes a
lease on the stage's key in the store (`storage.lease`) before the work, so the second run waits
for the first and re-uses its result, and a run whose holder died takes its work over.
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import storage
from storage.lease import Holder, Lease

MANIFEST = "manifest.json"
STAGES = ("tokenize", "split", "train")
REPO_ROOT = Path(__file__).resolve().parent.parent
# The modules each stage runs; its code is everything they import, found by `code_files`. train
# also runs the program model.launch starts in child processes (`python -m model.train`).
ENTRY_MODULES = {
    "tokenize": ("tasks.tokenize",),
    "split": ("tasks.split",),
    "train": ("tasks.train", "model.train"),
}


def _module_file(root: Path, name: str) -> Path | None:
    """The file under root that module `name` is, or None (third-party, stdlib, not a module)."""
    if not all(part.isidentifier() for part in name.split(".")):
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(tree: ast.AST, name: str, is_package: bool) -> set[str]:
    """Every module an import statement anywhere in tree (function bodies too) may load,
    with the packages above it, whose __init__ runs first."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = (name if is_package else name.rpartition(".")[0]).split(".")
                if node.level > len(package):
                    continue  # beyond the top-level package: fails when run, loads nothing
                parts = package[: len(package) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            # `from a import b` loads module a.b when b is one
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return _with_parents(found)


def _with_parents(names: set[str] | tuple[str, ...]) -> set[str]:
    """names and the packages above them (importing a.b runs a/__init__.py first)."""
    return {".".join(n.split(".")[:i]) for n in names if n for i in range(1, n.count(".") + 2)}


def code_files(stage: str, root: Path = REPO_ROOT) -> list[Path]:
    """The source files a stage's result depends on: the import closure of its entry modules,
    read statically (`import`, `from ... import`, relative and function-level imports alike),
    kept to modules that are files under root (the project's own packages). Sorted."""
    root = Path(root)
    pending = sorted(_with_parents(ENTRY_MODULES[stage]))
    seen: set[str] = set()
    files: set[Path] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(root, name)
        if path is None:
            continue
        files.add(path)
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except SyntaxError:
            continue  # hashed all the same; it has no imports to follow
        pending.extend(_imported_modules(tree, name, path.name == "__init__.py") - seen)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _code_version(stage: str, root: Path) -> str:
    digest = hashlib.sha256()
    for path in code_files(stage, root):
        data = path.read_bytes()
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


@cache
def _repo_code_version(stage: str, root: Path) -> str:
    return _code_version(stage, root)


def code_version(stage: str, root: Path = REPO_ROOT) -> str:
    """sha256 over the relative paths and bytes of `code_files(stage, root)`.

    Computed once per process for this repository's own tree (the code the process runs), every
    time for any other root (tests edit copies of the tree)."""
    root = Path(root)
    if root == REPO_ROOT:
        return _repo_code_version(stage, root)
    return _code_version(stage, root)


def cache_key(stage: str, **inputs: Any) -> str:
    payload = json.dumps({"stage": stage, "code": code_version(stage), **inputs}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def stage_dir(store: str, stage: str, key: str) -> str:
    kind = "models" if stage == "train" else "datasets"
    return storage.join(store, kind, f"{stage}-{key}")


def lease_dir(store: str, stage: str, key: str) -> str:
    """Where the lease on a stage's key lives: beside the results, never inside their folder."""
    return storage.join(store, "leases", f"{stage}-{key}")


@dataclass
class Claim:
    """What `claim` found: a finished result to re-use (``manifest``), or the work to do under
    the lease, continuing the work of ``took_over`` (a holder that died) if there is one."""

    folder: str
    manifest: dict | None = None
    took_over: Holder | None = None
    lease: Lease | None = None

    def save(self, manifest: dict) -> None:
        """Publish the result: the manifest, written last, marks the folder complete (unless
        another run took this one's lease over meanwhile: then its result is the one kept)."""
        if self.lease is not None:
            self.lease.check()
        save_manifest(self.folder, manifest)
        self.manifest = manifest


@contextmanager
def claim(
    store: str,
    stage: str,
    key: str,
    *,
    refresh: bool = False,
    owner: str,
    log: Callable[[str], None],
) -> Iterator[Claim]:
    """``with claim(store, stage, key, owner=..., log=...) as found:`` the stage's cached result
    (``found.manifest``), or the lease to compute it (``found.save(manifest)`` at the end).

    A cached result is returned without a lease. Otherwise the block runs holding the key's lease:
    a run that had to wait for another gets that run's result (the manifest is read again once
    the lease is held); ``refresh`` computes it again unless it waited for a run that just did.
    """
    folder = stage_dir(store, stage, key)
    manifest = None if refresh else load_manifest(folder)
    if manifest is not None:
        yield Claim(folder, manifest)
        return
    what = f"{stage}-{key}"
    with Lease(lease_dir(store, stage, key), owner=owner, what=what, on_wait=log) as lease:
        if lease.waited_for is not None or not refresh:
            manifest = load_manifest(folder)
        yield Claim(folder, manifest, None if manifest else lease.took_over, lease)


def load_manifest(folder: str) -> dict | None:
    uri = storage.join(folder, MANIFEST)
    if not storage.exists(uri):
        return None
    return json.loads(storage.get_bytes(uri))


def save_manifest(folder: str, manifest: dict) -> None:
    storage.put_bytes(storage.join(folder, MANIFEST), json.dumps(manifest, indent=2).encode())


def check_refresh(refresh: list[str] | tuple[str, ...]) -> list[str]:
    """--refresh names: stages, or `all`."""
    from storage.errors import GptpipeError

    names = set(refresh)
    if "all" in names:
        return list(STAGES)
    unknown = names - set(STAGES)
    if unknown:
        raise GptpipeError(
            f"--refresh {', '.join(sorted(unknown))}: not a cached stage; "
            f"choose from {', '.join(STAGES)} or all"
        )
    return sorted(names)
