"""Checkpoints: one `torch.save` dict of tensors and plain values, loaded with weights_only=True.

weights_only=True means a checkpoint can hold tensors, numbers, strings, lists and dicts but no
pickled objects, so loading an untrusted file cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import shutil
import sys
import threading
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import storage
from model.config import GPTConfig
from model.tokenizer import tokenizer_from_json, vocabulary_mismatch
from storage.errors import GptpipeError, first_line
from storage.local import atomic_write

CHECKPOINT_NAME = "ckpt.pt"
FORMAT_VERSION = 1


def local_copy_path(uri: str) -> Path:
    """Where rank 0 keeps the latest checkpoint on its own disk: the file itself for a local store,
    else a folder per checkpoint URI under $GPTPIPE_CACHE_DIR (default ~/.cache/gptpipe)."""
    if "://" not in uri or uri.startswith("file://"):
        return storage.local_path(uri)
    root = Path(os.environ.get("GPTPIPE_CACHE_DIR", Path.home() / ".cache" / "gptpipe"))
    return root / "checkpoints" / hashlib.sha256(uri.encode()).hexdigest()[:20] / CHECKPOINT_NAME


class CheckpointWriter:
    """Rank 0's checkpoints: saved to local disk at once, uploaded to the store in the background.

    The training loop never waits on the store. When an upload fails (the store is away), training
    goes on with a warning and the local copy stays; `finish()` waits for the last upload and, if
    it failed, raises an error that says where the checkpoint was kept, so that `--resume` (which
    takes the newer of the stored and the local copy) can continue once the store is back.
    """

    def __init__(self, uri: str):
        self.uri = uri
        self.local = local_copy_path(uri)
        self.remote = "://" in uri and not uri.startswith("file://")
        self._upload: threading.Thread | None = None
        self._error: str | None = None

    def save(self, payload: dict[str, Any]) -> None:
        self.wait()  # one upload at a time; the last one is usually long done
        try:
            with atomic_write(self.local, on_error=self._write_error) as f:
                torch.save({"format_version": FORMAT_VERSION, **payload}, f)
        except RuntimeError as exc:  # torch reports a full disk as a RuntimeError
            raise self._write_error(exc) from None
        if self.remote:
            self._error = None
            self._upload = threading.Thread(target=self._put, daemon=True)
            self._upload.start()

    def _write_error(self, exc: Exception) -> GptpipeError:
        # torch.save turns the file's OSError (a full disk) into a RuntimeError, the OSError
        # kept as its context: name the OSError's reason
        if not isinstance(exc, OSError) and isinstance(exc.__context__, OSError):
            exc = exc.__context__
        reason = getattr(exc, "strerror", None) or first_line(exc)
        return GptpipeError(
            f"could not write the checkpoint {self.local}: {reason} "
            f"({_free_mb(self.local.parent):.1f} MB free on that disk)"
        )

    def _put(self) -> None:
        try:
            storage.put_file(self.uri, self.local)
        except Exception as exc:  # the store is away: keep training, keep the local copy
            self._error = first_line(exc)
            print(
                f"warning: could not upload the checkpoint to {self.uri} ({self._error}); "
                f"kept at {self.local}",
                file=sys.stderr,
                flush=True,
            )

    def wait(self) -> None:
        if self._upload is not None:
            self._upload.join()
            self._upload = None

    def finish(self) -> None:
        self.wait()
        if self._error:
            raise GptpipeError(
                f"could not upload the final checkpoint to {self.uri} ({self._error}); it is kept "
                f"at {self.local}: run again with --resume once the store is back"
            )


def _free_mb(folder: Path) -> float:
    """Free MB on the disk that holds folder, or would: it may not exist (could not be made)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free / 1e6
    except OSError:
        return 0.0


def latest_checkpoint(uri: str, map_location: str | torch.device = "cpu") -> dict | None:
    """The newer (by step) of the stored checkpoint and this machine's local copy, if any."""
    found = []
    if storage.exists(uri):
        found.append(load_checkpoint(uri, map_location))
    local = local_copy_path(uri)
    if "://" in uri and local.is_file():
        found.append(load_checkpoint(str(local), map_location))
    return max(found, key=lambda c: int(c["step"]), default=None)


@dataclass(frozen=True)
class InitFrom:
    """The checkpoint a warm start begins from: where it is (any store URI every rank can read),
    its sha256 (checked when it is loaded: the weights are those that were resolved) and what
    people call it, e.g. "models:/NAME/3" or the path they gave."""

    uri: str
    sha256: str
    label: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InitFrom:
        return cls(uri=data["uri"], sha256=data["sha256"], label=data["label"])


def load_init_checkpoint(init: InitFrom, map_location: str | torch.device = "cpu") -> dict:
    """The warm start's checkpoint, refused (one line) when its bytes are not those resolved."""
    if not storage.exists(init.uri):
        raise GptpipeError(
            f"the checkpoint to start from ({init.label}) is gone: {init.uri} does not exist"
        )
    raw = storage.get_bytes(init.uri)
    found = hashlib.sha256(raw).hexdigest()
    if found != init.sha256:
        raise GptpipeError(
            f"the checkpoint to start from ({init.label}) changed: {init.uri} has sha256 "
            f"{found[:12]}..., expected {init.sha256[:12]}...; resolve it again"
        )
    return checkpoint_from_bytes(raw, init.uri, map_location)


# what a warm start's checkpoint must share with tonight's model (the --set names of the config)
SHAPE_KEYS = ("n_embd", "n_layer", "n_head", "block_size", "bias")


def check_warm_start(
    ckpt: dict[str, Any], init: InitFrom, model_config: GPTConfig, tokenizer_json: str
) -> int:
    """Refuse (one line that says what to change) a checkpoint tonight's model cannot start
    from: another shape, or a vocabulary whose ids tonight's tokenizer does not keep. Returns
    how many token ids the two share (the rows of the embedding and lm_head to copy)."""
    stored = ckpt.get("model_config") or {}
    wanted = model_config.__dict__
    differ = [k for k in SHAPE_KEYS if stored.get(k) != wanted[k]]
    if differ:
        theirs = " ".join(f"{k}={stored.get(k)}" for k in differ)
        ours = ", ".join(f"{k} {wanted[k]}" for k in differ)
        raise GptpipeError(
            f"cannot start from {init.label}: its model has {theirs} where this config has "
            f"{ours}; set {theirs} to start from it, or train without init_from"
        )
    base = tokenizer_from_json(ckpt["tokenizer"])
    problem = vocabulary_mismatch(base, tokenizer_from_json(tokenizer_json))
    if problem:
        raise GptpipeError(
            f"cannot start from {init.label}: {problem}; tokenize with its vocabulary kept "
            "(vocab keep, its tokenizer as the base) or train without init_from"
        )
    return base.vocab_size


def load_checkpoint(uri: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint at uri; one that is not a gptpipe checkpoint, or whose format_version is
    newer than this gptpipe's FORMAT_VERSION, is a one-line GptpipeError."""
    return checkpoint_from_bytes(storage.get_bytes(uri), uri, map_location)


def checkpoint_from_bytes(
    raw: bytes, uri: str, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """`load_checkpoint` of bytes already read from uri (named in its errors)."""
    if not raw.startswith(b"PK\x03\x04"):  # torch.save writes a zip archive
        raise GptpipeError(f"{uri} is not a readable checkpoint (corrupt or truncated)")
    try:
        ckpt = torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise GptpipeError(
            f"refusing to load {uri}: it holds more than weights ({_refusal_reason(exc)})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as exc:
        # torch goes on with advice on how checkpoints get corrupted
        first = first_line(exc).split(". ")[0]
        raise GptpipeError(
            f"{uri} is not a readable checkpoint (corrupt or truncated): {first}"
        ) from None
    version = ckpt.get("format_version", FORMAT_VERSION) if isinstance(ckpt, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise GptpipeError(
            f"checkpoint {uri} has format_version {version}; this gptpipe reads up to "
            f"{FORMAT_VERSION}: upgrade gptpipe"
        )
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise GptpipeError(f"{uri} is not a gptpipe checkpoint (no model weights or config in it)")
    return ckpt


def _refusal_reason(exc: Exception) -> str:
    """The line of torch's weights_only refusal that names what was refused, without colours."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    named = [line for line in lines if "Unsupported global" in line]
    return (named or [line for line in lines if line] or ["a pickled object"])[0]
