"""The local-folder backend: plain files, written to a temporary name and renamed into place."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from storage.errors import GptpipeError

_CHUNK = 1 << 20


def cache_dir() -> Path:
    """The user's cache folder for gptpipe: $GPTPIPE_CACHE_DIR, else $XDG_CACHE_HOME/gptpipe,
    else ~/.cache/gptpipe."""
    if os.environ.get("GPTPIPE_CACHE_DIR"):
        return Path(os.environ["GPTPIPE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gptpipe"


def _write_error(where: Path | str, exc: OSError) -> GptpipeError:
    """The one-line error for a failed write (a full disk, a read-only folder, ...)."""
    return GptpipeError(f"could not write {where}: {exc.strerror or exc}")


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new empty file beside ``path`` with a random hidden name: (its descriptor, its path).

    Why not tempfile.mkstemp: it creates the file with mode 0600, which os.replace keeps, so a
    stored file would be readable by its owner only while everything else the pipeline writes
    (checkpoints, MLflow's files) follows the umask. Creating it with 0666 lets the kernel apply
    the umask (and any default ACL) as for any new file; reading the umask ourselves would mean
    setting it for a moment, which races with other threads creating files.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # 64 random bits: in practice never
            continue


@contextmanager
def atomic_write(
    path: Path | str, on_error: Callable[[OSError], GptpipeError] | None = None
) -> Iterator[BinaryIO]:
    """``with atomic_write(path) as f:`` - the one way gptpipe writes a local file all or nothing.

    ``f`` is a new temporary file beside ``path`` (made with mode 0666 less the umask, see
    ``_create_temp``; the folder is created if needed), flushed, fsynced and renamed onto
    ``path`` only if the block completes, so a reader sees the old file or the new one, never a
    half-written one. An OSError while writing - in the block (a full disk under a Parquet
    writer), syncing or renaming - becomes ``on_error(exc)``, by default the one-line
    GptpipeError "could not write PATH: REASON"; any other exception from the block (say a
    GptpipeError for bad input) passes through unchanged. Either way the temporary file is
    removed and the old file, if any, is left as it was.
    """
    path = Path(path)
    fail = on_error or (lambda exc: _write_error(path, exc))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
    except OSError as exc:
        raise fail(exc) from None
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise fail(exc) from None
    finally:
        tmp.unlink(missing_ok=True)


class LocalBackend:
    def put_bytes(self, path: Path, data: bytes) -> None:
        with atomic_write(path) as f:
            f.write(data)

    def put_file(self, path: Path, source: Path) -> None:
        try:
            src = open(source, "rb")  # noqa: SIM115 - closed below; opened first to tell why
        except OSError as exc:
            raise GptpipeError(
                f"could not write {path}: cannot read {source}: {exc.strerror or exc}"
            ) from None
        with src, atomic_write(path) as f:
            shutil.copyfileobj(src, f, _CHUNK)

    def create_new(self, path: Path, data: bytes) -> bool:
        """Write ``data`` to ``path`` only if nothing is there: True if this call created it.

        The content goes to a temporary file of its own first, then os.link gives it its name,
        which fails if the name exists (as O_EXCL does): a reader never sees the file
        half-written, and of two processes creating the same name exactly one succeeds.
        """
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = _create_temp(path)
        except OSError as exc:
            raise _write_error(path, exc) from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            raise _write_error(path, exc) from None
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def delete(self, path: Path) -> None:
        """Remove the file if it is there."""
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise GptpipeError(f"could not delete {path}: {exc.strerror or exc}") from None

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
        return atomic_write(path)

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
