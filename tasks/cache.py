"""Content-keyed stage results kept in the store, so every process and machine sharing the store
re-uses them.

A stage's outputs live in a folder named by a key over what they depend on (content hashes and
settings, never names or run ids), and `manifest.json`, written last, marks the folder complete.
A crashed stage leaves no manifest, so its folder is simply written again.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

import storage

MANIFEST = "manifest.json"
STAGES = ("tokenize", "split", "train")
# the code each stage's result depends on, relative to the repository's model/ package
_CODE = {
    "tokenize": ("tokenizer.py", "data.py", "corpus.py", "dataset.py"),
    "split": ("data.py", "dataset.py"),
    "train": (
        "gpt.py",
        "train.py",
        "batching.py",
        "dataset.py",
        "evaluate.py",
        "dist.py",
        "checkpoint.py",
    ),
}


@cache
def code_version(stage: str) -> str:
    """sha256 over the source of the modules a stage's result depends on."""
    model_dir = Path(__file__).resolve().parent.parent / "model"
    digest = hashlib.sha256()
    for name in _CODE[stage]:
        digest.update(name.encode())
        digest.update((model_dir / name).read_bytes())
    return digest.hexdigest()


def cache_key(stage: str, **inputs: Any) -> str:
    payload = json.dumps({"stage": stage, "code": code_version(stage), **inputs}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def stage_dir(store: str, stage: str, key: str) -> str:
    kind = "models" if stage == "train" else "datasets"
    return storage.join(store, kind, f"{stage}-{key}")


def load_manifest(folder: str) -> dict | None:
    uri = storage.join(folder, MANIFEST)
    if not storage.exists(uri):
        return None
    return json.loads(storage.get_bytes(uri))


def save_manifest(folder: str, manifest: dict) -> None:
    storage.put_bytes(storage.join(folder, MANIFEST), json.dumps(manifest, indent=2).encode())


def check_refresh(refresh: list[str] | tuple[str, ...]) -> list[str]:
    """--refresh names: stages, or `all`."""
    from model.errors import GptpipeError

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
