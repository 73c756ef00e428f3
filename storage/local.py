"""The local-folder backend: plain files, written to a temporary name and renamed into place."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from model.errors import GptpipeError

_CHUNK = 1 << 20


@contextmanager
def _open_atomic(path: Path) -> Iterator[BinaryIO]:
    """A temporary file beside ``path``, renamed onto it only if the block completes.

    Exceptions raised by the block pass through unchanged (after the temporary file is removed);
    the filesystem's own errors (creating, syncing, renaming) become GptpipeError.
    """

    def failed(exc: OSError) -> GptpipeError:
        return GptpipeError(f"could not write {path}: {exc.strerror or exc}")

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise failed(exc) from None
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as exc:
                raise failed(exc) from None
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise failed(exc) from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def _atomic_write(path: Path, write) -> None:
    """Write with `write(f)`; our own write errors (a full disk) become GptpipeError too."""
    try:
        with _open_atomic(path) as f:
            write(f)
    except OSError as exc:
        raise GptpipeError(f"could not write {path}: {exc.strerror or exc}") from None


class LocalBackend:
    def put_bytes(self, path: Path, data: bytes) -> None:
        _atomic_write(path, lambda f: f.write(data))

    def put_file(self, path: Path, source: Path) -> None:
        def copy(f):
            with open(source, "rb") as src:
                shutil.copyfileobj(src, f, _CHUNK)

        _atomic_write(path, copy)

    def get_bytes(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise GptpipeError(f"not found: {path}") from None
        except IsADirectoryError:
            raise GptpipeError(f"{path} is a directory, expected a file") from None

    def get_file(self, path: Path, dest: Path) -> None:
        if not path.is_file():
            self.get_bytes(path)  # raises the error that says why
        self.put_file(dest, path)

    def exists(self, path: Path) -> bool:
        return path.exists()

    def list(self, path: Path) -> list[Path]:
        if not path.is_dir():
            return []
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))

    def sha256(self, path: Path) -> str:
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
        except FileNotFoundError:
            raise GptpipeError(f"not found: {path}") from None
        return digest.hexdigest()

    def content_id(self, path: Path) -> str:
        return f"sha256:{self.sha256(path)}"

    def size(self, path: Path) -> int:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            raise GptpipeError(f"not found: {path}") from None

    def open_read(self, path: Path) -> BinaryIO:
        try:
            return open(path, "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            raise GptpipeError(f"not found: {path}") from None
        except IsADirectoryError:
            raise GptpipeError(f"{path} is a directory, expected a file") from None

    def open_write(self, path: Path) -> AbstractContextManager[BinaryIO]:
        """A temporary file beside ``path``, renamed onto it only if the block completes."""
        return _open_atomic(path)

    def arrow_filesystem(self, path: Path) -> tuple[Any, str]:
        from pyarrow import fs as pafs

        return pafs.LocalFileSystem(), str(path.absolute())

    def preflight(self, path: Path) -> None:
        """Check that the store folder can be created and written (a probe file, removed)."""
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=path, prefix=".preflight.", suffix=".tmp")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise GptpipeError(
                f"cannot write to the store folder {path}: {exc.strerror or exc}"
            ) from None
