"""URI helpers and dispatch to a backend by scheme (a plain path or `file://` is local, `s3://`
goes to storage.s3, imported on first use so that local-only runs do not pay for boto3)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

from storage.errors import GptpipeError
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
    if uri.startswith("s3://"):
        from storage.s3 import S3Backend

        return S3Backend(), uri
    raise GptpipeError(
        f"unsupported store URI {uri!r}: use a local folder path or s3://bucket/prefix"
    )


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


def create_new(uri: str, data: bytes) -> bool:
    """Write ``data`` to ``uri`` only if no object is there; True if this call created it.

    Atomic on both backends (a local hard link; S3's ``If-None-Match: *``): of several writers
    racing for one name, exactly one gets True. The building block of `storage.lease`.
    """
    backend, where = _backend(uri)
    return backend.create_new(where, data)


def delete(uri: str) -> None:
    """Remove an object if it is there."""
    backend, where = _backend(uri)
    backend.delete(where)


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


def content_id(uri: str) -> str:
    """An identity of an object's content that is cheap to get: ``sha256:<hex>`` for a local file
    (hashed), ``etag:<etag>:<size>`` on S3 (from a HEAD; a changed object gets a new ETag)."""
    backend, where = _backend(uri)
    return backend.content_id(where)


def open_read(uri: str) -> BinaryIO:
    """A binary, seekable, random-access file to read (close it, or use it in ``with``).

    Local: a plain file; s3: a pyarrow file whose reads are ranged GETs. Both suit
    ``pyarrow.parquet.read_table(open_read(uri))``.
    """
    backend, where = _backend(uri)
    return backend.open_read(where)


def open_write(uri: str) -> AbstractContextManager[BinaryIO]:
    """``with open_write(uri) as f:`` a binary, writable, seekable file; its content appears under
    ``uri`` only if the block completes (an exception leaves the old object or nothing)."""
    backend, where = _backend(uri)
    return backend.open_write(where)


def arrow_filesystem(uri: str) -> tuple[Any, str]:
    """``(pyarrow.fs.FileSystem, path)`` for pyarrow.dataset and friends."""
    backend, where = _backend(uri)
    return backend.arrow_filesystem(where)


def preflight(uri: str) -> None:
    """Fail early, with a GptpipeError saying what to fix, if the store cannot be used.

    Local: the folder can be created and written. s3: the bucket exists and accepts the
    credentials, answered within about 10 s even when the endpoint is unreachable.
    """
    backend, where = _backend(uri)
    backend.preflight(where)
