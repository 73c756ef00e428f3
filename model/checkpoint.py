"""Checkpoints: one `torch.save` dict of tensors and plain values, loaded with weights_only=True.

weights_only=True means a checkpoint can hold tensors, numbers, strings, lists and dicts but no
pickled objects, so loading an untrusted file cannot run code.
"""

from __future__ import annotations

import io
import pickle
import re
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
    if not raw.startswith(b"PK\x03\x04"):  # torch.save writes a zip archive
        raise GptpipeError(f"{uri} is not a readable checkpoint (corrupt or truncated)")
    try:
        ckpt = torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise GptpipeError(
            f"refusing to load {uri}: it holds more than weights ({_refusal_reason(exc)})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise GptpipeError(
            f"{uri} is not a readable checkpoint (corrupt or truncated): {first}"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise GptpipeError(f"{uri} is not a gptpipe checkpoint (no model weights or config in it)")
    return ckpt


def _refusal_reason(exc: Exception) -> str:
    """The line of torch's weights_only refusal that names what was refused, without colours."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    named = [line for line in lines if "Unsupported global" in line]
    return (named or [line for line in lines if line] or ["a pickled object"])[0]
