"""URI helpers and dispatch to a backend by scheme (a plain path or `file://` is local)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from model.errors import GptpipeError
from storage.local import LocalBackend

_LOCAL = LocalBackend()


def _is_local(uri: str) -> bool:
    scheme = urlparse(uri).scheme
    return scheme in ("", "file") or len(scheme) == 1  # a Windows drive letter counts as local


def local_path(uri: str) -> Path:
    """The filesystem path of a local URI."""
    if not _is_local(uri):
        raise GptpipeError(f"{uri} is not a local path")
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri)


def _backend(uri: str):
    if _is_local(uri):
        return _LOCAL, local_path(uri)
    raise GptpipeError(f"unsupported store URI {uri!r}: use a local folder path")


def join(base: str, *parts: str) -> str:
    """Join key parts under base; a part may not climb out of it ('..') or be absolute."""
    out = base.rstrip("/")
    for part in parts:
        for piece in part.split("/"):
            if piece in ("", "."):
                continue
            if piece == ".." or piece.startswith("~"):
                raise GptpipeError(f"unsafe store key {part!r}: it must stay inside {base}")
            out = f"{out}/{piece}"
    return out


def put_bytes(uri: str, data: bytes) -> str:
    backend, where = _backend(uri)
    backend.put_bytes(where, data)
    return uri


def put_file(uri: str, source: str | Path) -> str:
    backend, where = _backend(uri)
    backend.put_file(where, Path(source))
    return uri


def get_bytes(uri: str) -> bytes:
    backend, where = _backend(uri)
    return backend.get_bytes(where)


def get_file(uri: str, dest: str | Path) -> Path:
    backend, where = _backend(uri)
    backend.get_file(where, Path(dest))
    return Path(dest)


def exists(uri: str) -> bool:
    backend, where = _backend(uri)
    return backend.exists(where)


def list_uris(prefix: str) -> list[str]:
    backend, where = _backend(prefix)
    return [str(p) for p in backend.list(where)]


def sha256(uri: str) -> str:
    backend, where = _backend(uri)
    return backend.sha256(where)


def size(uri: str) -> int:
    backend, where = _backend(uri)
    return backend.size(where)
