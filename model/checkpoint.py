"""Checkpoints: one `torch.save` dict of tensors and plain values, loaded with weights_only=True.

weights_only=True means a checkpoint can hold tensors, numbers, strings, lists and dicts but no
pickled objects, so loading an untrusted file cannot run code.
"""

from __future__ import annotations

import io
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

import storage
from model.errors import GptpipeError

CHECKPOINT_NAME = "ckpt.pt"
FORMAT_VERSION = 1


def save_checkpoint(uri: str, payload: dict[str, Any]) -> None:
    """Write through a local temporary file so large checkpoints never sit whole in memory twice."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CHECKPOINT_NAME
        torch.save({"format_version": FORMAT_VERSION, **payload}, path)
        storage.put_file(uri, path)


def load_checkpoint(uri: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    raw = storage.get_bytes(uri)
    try:
        ckpt = torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0]
        raise GptpipeError(
            f"refusing to load {uri}: it holds more than weights ({first})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise GptpipeError(
            f"{uri} is not a readable checkpoint (corrupt or truncated): {first}"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise GptpipeError(f"{uri} is not a gptpipe checkpoint (no model weights or config in it)")
    return ckpt
