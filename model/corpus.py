"""Corpus inputs and their shards: what the tokenize stage maps its tasks over.

An input is one file (a path, an http(s) URL or an s3:// object) or many: a directory, a glob or
an ``s3://bucket/prefix/``. Many files are taken in sorted order and concatenated as they are, so
the corpus - and its token sequence - is one byte string whatever the shard layout.

A shard is a run of byte ranges of that string (``Piece``s). Shards end at file ends and, inside a
file larger than the target shard size, at a line boundary near each multiple of the target. Every
cut point is a *safe cut*: right after a newline that has a printable ASCII character on both
sides. Byte-level BPE pre-tokenization always splits there (see ``model.tokenizer._SAFE_CUT``), so
tokenizing shard by shard gives exactly the ids of tokenizing the whole text, for char and BPE
alike. A file end that is not a safe cut (say the file ends without a newline) does not end the
shard: the next file joins it.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import storage
from model.data import decode_corpus
from storage.errors import GptpipeError

DEFAULT_SHARD_BYTES = 32 << 20
# How far past a target offset we read, per request, looking for a safe cut.
_CUT_SEARCH_BYTES = 64 << 10
_SAFE_CUT = re.compile(rb"(?<=[\x21-\x7e]\n)(?=[\x21-\x7e])")
_GLOB_CHARS = re.compile(r"[*?[]")


def parse_byte_size(text: str) -> int:
    """'65536', '64K', '32M' or '1G' as a positive number of bytes (ValueError otherwise)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    number, unit = (text[:-1], text[-1].upper()) if text[-1:].upper() in units else (text, "")
    try:
        value = int(float(number) * units.get(unit, 1))
    except (ValueError, OverflowError):  # OverflowError: 'inf', '1e400' (int of infinity)
        raise ValueError(f"not a size: {text!r} (e.g. 65536, 64K, 32M)") from None
    if value < 1:
        raise ValueError(f"must be positive: {text!r}")
    return value


@dataclass(frozen=True)
class SourceFile:
    uri: str
    size: int


@dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of one input file."""

    uri: str
    start: int
    end: int


def list_inputs(source: str) -> list[SourceFile]:
    """The input files of ``source`` in corpus order (sorted), empty files left out."""
    if source.startswith(("http://", "https://")):
        raise ValueError("an http(s) input is staged into the store first (see stage_download)")
    if source.startswith("s3://"):
        uris = _s3_inputs(source)
    elif _GLOB_CHARS.search(source):
        uris = sorted(
            p for p in glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(p)
        )
        if not uris:
            raise GptpipeError(f"--input {source}: the pattern matches no files")
    else:
        uris = _local_inputs(source)
    files = [SourceFile(uri, storage.size(uri)) for uri in uris]
    files = [f for f in files if f.size > 0]
    if not files:
        raise GptpipeError(f"input {source} is empty; pass a non-empty UTF-8 text file")
    return files


def check_input(source: str) -> None:
    """A run's input, checked before any work: an http(s) URL answers with a body; a file,
    folder, glob or s3:// source has non-empty files. A one-line GptpipeError otherwise."""
    if source.startswith(("http://", "https://")):
        from model.data import probe_url

        probe_url(source)
    else:
        list_inputs(source)


def _local_inputs(source: str) -> list[str]:
    path = Path(source).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = sorted(
            str(p)
            for p in path.rglob("*")
            if p.is_file() and not _hidden(p.relative_to(path).as_posix())
        )
        if not files:
            raise GptpipeError(f"input directory {source} has no files; put text files in it")
        return files
    if not path.exists():
        raise GptpipeError(f"input file not found: {source}; pass --input PATH to a text file")
    raise GptpipeError(f"input {source} is not a regular file or directory")


def _hidden(relative: str) -> bool:
    """Dot files and folders are not corpus (as `ls` and globs treat them)."""
    return any(part.startswith(".") for part in relative.split("/"))


def _s3_inputs(source: str) -> list[str]:
    if not source.endswith("/") and storage.exists(source):
        return [source]
    prefix = source.rstrip("/") + "/"
    uris = [u for u in storage.list_uris(source) if not _hidden(u[len(prefix) :])]
    if not uris:
        raise GptpipeError(f"--input {source}: no such object, and no objects under that prefix")
    return uris


def stage_download(source: str, store: str) -> str:
    """Copy an http(s) input into the store (content-addressed) so every worker can range-read
    it; returns its store URI."""
    from model.data import load_text, sha256_bytes

    raw = load_text(source)
    uri = storage.join(store, "sources", f"{sha256_bytes(raw)}.txt")
    if not storage.exists(uri):
        storage.put_bytes(uri, raw)
    return uri


def read_range(uri: str, start: int, end: int) -> bytes:
    with storage.open_read(uri) as f:
        f.seek(start)
        return f.read(end - start)


def _next_safe_cut(file: SourceFile, at: int) -> int | None:
    """The first safe cut at or after byte ``at`` of ``file`` (None: there is none)."""
    pos = max(at - 1, 1)  # the cut's look-behind needs the byte before the newline
    while pos < file.size:
        end = min(pos + _CUT_SEARCH_BYTES, file.size)
        window = read_range(file.uri, pos - 1, min(end + 1, file.size))
        for match in _SAFE_CUT.finditer(window):
            cut = pos - 1 + match.start()
            if cut >= at:
                return cut
        pos = end
    return None


def _ends_safely(prev: SourceFile, nxt: SourceFile) -> bool:
    """Whether the boundary between two concatenated files is a safe cut."""
    if prev.size < 2:
        return False
    joined = read_range(prev.uri, prev.size - 2, prev.size) + read_range(nxt.uri, 0, 1)
    return _SAFE_CUT.search(joined) is not None


def plan_shards(
    files: list[SourceFile], shard_bytes: int = DEFAULT_SHARD_BYTES
) -> list[list[Piece]]:
    """Cut the concatenated files into shards (see the module docstring)."""
    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 1:
        raise GptpipeError(f"--shard-size must be a positive number of bytes, got {shard_bytes!r}")
    shards: list[list[Piece]] = []
    current: list[Piece] = []
    for i, file in enumerate(files):
        start = 0
        while file.size - start > shard_bytes:
            cut = _next_safe_cut(file, start + shard_bytes)
            if cut is None:
                break
            current.append(Piece(file.uri, start, cut))
            shards.append(current)
            current, start = [], cut
        current.append(Piece(file.uri, start, file.size))
        if i + 1 == len(files) or _ends_safely(file, files[i + 1]):
            shards.append(current)
            current = []
    return shards


def read_shard(pieces: list[Piece]) -> str:
    """The text of a shard; bad bytes are reported with the file and offset they are at."""
    parts = []
    for piece in pieces:
        raw = read_range(piece.uri, piece.start, piece.end)
        parts.append(decode_corpus(raw, piece.uri, offset=piece.start))
    return "".join(parts)


def shard_prefix(pieces: list[Piece], n_bytes: int) -> str:
    """About the first n_bytes of a shard, ending at a safe cut (all of it when it is shorter)."""
    if sum(p.end - p.start for p in pieces) <= n_bytes:
        return read_shard(pieces)
    taken, left = [], n_bytes
    for p in pieces:
        if left <= 0:
            break
        taken.append(Piece(p.uri, p.start, min(p.end, p.start + left)))
        left -= taken[-1].end - taken[-1].start
    last = taken[-1]
    tail = read_range(last.uri, last.start, last.end)
    cuts = [m.start() for m in _SAFE_CUT.finditer(tail)]
    if not cuts:
        return read_shard(taken[:-1]) if len(taken) > 1 else ""
    taken[-1] = Piece(last.uri, last.start, last.start + cuts[-1])
    return read_shard(taken)


def pieces_to_dicts(pieces: list[Piece]) -> list[dict]:
    return [asdict(p) for p in pieces]


def pieces_from_dicts(items: list[dict]) -> list[Piece]:
    return [Piece(**item) for item in items]
