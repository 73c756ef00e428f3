"""Corpus loading, token files, the train/val split and batches, as in the lecture.

Token files are Parquet with one column ``ids`` (``uint16`` when ``vocab_size <= 65536``, else
``uint32``), in row groups of ``ROW_GROUP_SIZE`` rows so readers can stream them, written with
``PARQUET_OPTIONS`` (byte-stream-split encoding, zstd; readable by pyarrow >= 17).

Token-file metadata format: the caller's ``metadata`` dict (``str`` keys, ``str`` or ``int``
values) is stored as ONE JSON object (sorted keys) under the Parquet schema metadata key
``gptpipe.metadata``, next to ``gptpipe.format`` = ``FORMAT``. JSON keeps ints as ints, so
``read_tokens`` gives back exactly the dict that was written. ``vocab_size`` is required (it picks
the column type); the pipeline also stores ``kind`` (tokenizer kind), ``n_tokens`` and
``source_sha256``. ``n_tokens``, when present, must equal the number of ids.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from storage.errors import GptpipeError
from storage.local import atomic_write

DOWNLOAD_TIMEOUT_S = 30
# checking an input URL before a run: an answer within this long, or a one-line error
PROBE_TIMEOUT_S = 10
ROW_GROUP_SIZE = 1 << 20  # ~1M tokens (2 MiB of uint16) per row group
FORMAT = "gptpipe-tokens-1"
# Byte-stream-split stores the ids' first bytes, then their second bytes, ... as separate streams
# (for a small vocabulary the high bytes are all zero) and zstd compresses those: files about 60%
# the size of Parquet's default dictionary encoding + zstd, written about 1.6x as fast (that
# encoder's dictionary and bit-packing pass was most of the write time; see bench/tokenize.py).
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "use_dictionary": False,
    "column_encoding": {"ids": "BYTE_STREAM_SPLIT"},
}
META_KEY = b"gptpipe.metadata"
FORMAT_KEY = b"gptpipe.format"

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

Where = str | os.PathLike | BinaryIO


# ---------------------------------------------------------------------------------------------
# Corpus


def load_text(source: str) -> bytes:
    """The raw bytes of ``source``: a local path, an s3:// object or an http(s) URL (whose
    ``user:password@``, if any, is sent as HTTP basic auth)."""
    if source.startswith(("http://", "https://")):
        return _download(source)
    if source.startswith("s3://"):
        # Read through the storage layer (endpoint and credentials from the AWS_* settings); a
        # missing object or bucket is a GptpipeError naming the URI.
        import storage

        return storage.get_bytes(source)
    if _URL_SCHEME.match(source):
        raise GptpipeError(
            f"unsupported input URL {source}; use an http(s) URL or pass --input PATH to a file"
        )
    path = Path(source).expanduser()
    if not path.exists():
        raise GptpipeError(f"input file not found: {source}; pass --input PATH to a text file")
    if path.is_dir():
        raise GptpipeError(f"input {source} is a directory; pass --input PATH to a text file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise GptpipeError(f"cannot read input {source}: {exc.strerror or exc}") from None


def _download(url: str) -> bytes:
    """GET ``url``. Errors name the URL without its user:password@ (they reach the terminal,
    Prefect's logs and its API), as ``redact`` shows it."""
    return _read_url(url, timeout=DOWNLOAD_TIMEOUT_S)


def probe_url(url: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Check that ``url`` answers with a non-empty body, reading its first byte only: an
    unreachable or empty input is then one line before a run starts, not a failed stage."""
    if not _read_url(url, timeout=timeout, limit=1):
        from storage.tracking import redact

        raise GptpipeError(f"input {redact(url)} is empty; pass a URL of a non-empty text file")


def _read_url(url: str, *, timeout: float, limit: int | None = None) -> bytes:
    """The body of ``url`` (its first ``limit`` bytes), or a one-line GptpipeError."""
    from storage.tracking import redact

    shown = redact(url)
    try:
        request = _request(url)
    except ValueError as exc:  # a port that is not a number, a broken IPv6 host
        raise GptpipeError(
            f"invalid input URL ({exc}); pass an http(s) URL or --input PATH to a local text file"
        ) from None
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read() if limit is None else response.read(limit)
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code} {exc.reason}"
    except urllib.error.URLError as exc:
        reason = str(exc.reason)
    except (TimeoutError, OSError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
    raise GptpipeError(
        f"cannot download {shown} ({reason}); when offline, pass --input PATH to a local text file"
    )


def _request(url: str) -> urllib.request.Request:
    """The request for ``url``; its user:password@, if any, as HTTP basic auth.

    urllib does not authenticate with credentials in a URL: it takes ``user:password@host`` for
    the host name. So the request goes to the URL without them, with an Authorization header
    built from them (percent-escapes decoded, as in ``http://me%40corp:p%3Ass@host/``). That
    header is "unredirected": urllib would otherwise copy it to wherever a redirect points,
    another host included.
    """
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    if parts.username is None and parts.password is None:
        return urllib.request.Request(url)
    bare = parts._replace(netloc=parts.netloc.rpartition("@")[2])
    request = urllib.request.Request(bare.geturl())
    userinfo = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    token = base64.b64encode(userinfo.encode("utf-8")).decode("ascii")
    request.add_unredirected_header("Authorization", f"Basic {token}")
    return request


def decode_corpus(raw: bytes, source: str, offset: int = 0) -> str:
    """Strict UTF-8 decode; rejects empty and binary input, naming the source and byte offset.

    ``offset`` is where ``raw`` starts in ``source`` (a shard may be a piece of a file).
    """
    if not raw:
        raise GptpipeError(f"input {source} is empty; pass a non-empty UTF-8 text file")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise GptpipeError(looks_binary(source, offset + nul))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GptpipeError(not_utf8(source, raw[exc.start], offset + exc.start)) from None


def looks_binary(source: str, at: int) -> str:
    """Why ``source`` is not text: a NUL byte at offset ``at`` (the tokenizer and the data
    check say it the same way)."""
    return f"input {source} looks binary (NUL byte at offset {at}); pass a UTF-8 text file"


def not_utf8(source: str, byte: int, at: int) -> str:
    """Why ``source`` is not text: ``byte`` at offset ``at`` does not decode as UTF-8."""
    return (
        f"input {source} is not UTF-8 text: invalid byte 0x{byte:02x} at offset {at}; "
        "convert it to UTF-8"
    )


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# ---------------------------------------------------------------------------------------------
# Token files


def _name(where: Any) -> str:
    if isinstance(where, str | os.PathLike):
        return os.fspath(where)
    return str(getattr(where, "name", f"<{type(where).__name__}>"))


def _check_metadata(metadata: dict[str, Any]) -> int:
    """Check caller metadata (bad metadata is a bug, hence ValueError); return vocab_size."""
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise ValueError(f"metadata keys must be str, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ValueError(f"metadata value for {key!r} must be str or int, got {value!r}")
    vocab_size = metadata.get("vocab_size")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise ValueError("metadata needs vocab_size, a positive int")
    if vocab_size > 1 << 32:
        raise ValueError(f"vocab_size {vocab_size} does not fit in uint32")
    return vocab_size


def write_tokens(
    ids: Any,
    where: Where,
    metadata: dict[str, str | int],
    *,
    row_group_size: int = ROW_GROUP_SIZE,
) -> None:
    """Write token ids as a Parquet token file (format in the module docstring).

    ``ids`` is a 1-D integer array, or an iterator of such arrays (chunks, e.g. a generator that
    encodes text piece by piece): each chunk is compressed and written in a background thread
    while the next one is produced. Chunks need ``n_tokens`` in the metadata, the total they
    must add up to (the schema holding it is written first).

    ``where`` is a path (written to a temporary file, then renamed, so a crash never leaves a
    half-written file under the final name) or a writable binary file-like object.
    """
    chunked = isinstance(ids, Iterator)
    if chunked and "n_tokens" not in metadata:
        raise ValueError("writing ids in chunks needs n_tokens in the metadata")
    vocab_size = _check_metadata(metadata)
    schema = pa.schema(
        [("ids", pa.uint16() if vocab_size <= 1 << 16 else pa.uint32())],
        metadata={
            FORMAT_KEY: FORMAT.encode(),
            META_KEY: json.dumps(metadata, sort_keys=True, ensure_ascii=False).encode(),
        },
    )
    chunks = ids if chunked else iter([ids])
    n_tokens = metadata.get("n_tokens")
    if not isinstance(where, str | os.PathLike):
        _write_chunks(chunks, where, schema, vocab_size, row_group_size, n_tokens)
        return
    with atomic_write(where) as f:
        _write_chunks(chunks, f, schema, vocab_size, row_group_size, n_tokens)


def _check_ids(ids: Any) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    return ids


def _write_chunks(
    chunks: Iterator[Any],
    where: Any,
    schema: pa.Schema,
    vocab_size: int,
    row_group_size: int,
    n_tokens: Any,
) -> None:
    """Check and convert each chunk here, compress and write it in a thread (Arrow's Parquet
    writer releases the GIL), so producing chunk i+1 overlaps writing chunk i. n_tokens: the
    total the metadata states (None: not stated)."""
    dtype = schema.field("ids").type.to_pandas_dtype()
    written = 0
    with (
        pq.ParquetWriter(where, schema, **PARQUET_OPTIONS) as writer,
        ThreadPoolExecutor(1, thread_name_prefix="parquet-write") as background,
    ):
        pending = None
        for chunk in chunks:
            chunk = _check_ids(chunk)
            low, high = (chunk.min(), chunk.max()) if chunk.size else (0, 0)
            if low < 0 or high >= vocab_size:
                raise ValueError(f"ids must be in [0, {vocab_size}), got {low}..{high}")
            table = pa.table({"ids": chunk.astype(dtype, copy=False)}, schema=schema)
            if pending is not None:
                pending.result()
            pending = background.submit(writer.write_table, table, row_group_size)
            written += len(chunk)
        if pending is not None:
            pending.result()
    if n_tokens is not None and n_tokens != written:
        raise ValueError(f"metadata n_tokens={n_tokens!r} but there are {written} ids")


def open_token_file(where: Where) -> tuple[pq.ParquetFile, dict[str, str | int]]:
    """Open a token file and check its format, without reading its ids (readers that stream row
    groups start here): (the ParquetFile, the metadata dict)."""
    name = _name(where)
    if isinstance(where, str | os.PathLike) and not Path(where).is_file():
        raise GptpipeError(f"token file not found: {name}")
    try:
        pf = pq.ParquetFile(where)
        schema_meta = pf.schema_arrow.metadata or {}
        if schema_meta.get(FORMAT_KEY) != FORMAT.encode():
            raise ValueError(f"no {FORMAT_KEY.decode()}={FORMAT} marker")
        metadata = json.loads(schema_meta[META_KEY])
        if "ids" not in pf.schema_arrow.names:
            raise ValueError("no 'ids' column")
        ids_type = pf.schema_arrow.field("ids").type
        if not pa.types.is_unsigned_integer(ids_type):
            raise ValueError(f"'ids' column has type {ids_type}")
        n_rows = pf.metadata.num_rows
        if metadata.get("n_tokens", n_rows) != n_rows:
            raise ValueError(f"metadata n_tokens={metadata['n_tokens']} but {n_rows} ids")
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        raise GptpipeError(f"{name} is not a readable Parquet token file: {exc}") from None
    return pf, metadata


def column_ids(column: pa.ChunkedArray | pa.Array, name: str) -> np.ndarray:
    """The ids of an Arrow ``ids`` column as a writable NumPy array (no nulls allowed)."""
    if column.null_count:
        raise GptpipeError(f"{name} is not a readable Parquet token file: 'ids' has nulls")
    ids = column.to_numpy()
    if not ids.flags.writeable:  # zero-copy views of Arrow buffers are read-only
        ids = ids.copy()
    return ids


def read_tokens(where: Where) -> tuple[np.ndarray, dict[str, str | int]]:
    """Read a token file: (ids in their stored dtype, uint16 or uint32; the metadata dict)."""
    pf, metadata = open_token_file(where)
    name = _name(where)
    try:
        column = pf.read(columns=["ids"]).column("ids")
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise GptpipeError(f"{name} is not a readable Parquet token file: {exc}") from None
    return column_ids(column, name), metadata


# ---------------------------------------------------------------------------------------------
# Split and batches


def split_tokens(ids: Any, val_fraction: float, block_size: int) -> tuple[Any, Any]:
    """Lecture split: the first ``int((1 - val_fraction) * len)`` ids train, the rest validate.

    Works on NumPy arrays and torch tensors alike and returns views (slices), not copies.
    """
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, float | int)
        or not 0 < val_fraction < 1
    ):
        raise GptpipeError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise GptpipeError(f"block_size must be a positive integer, got {block_size!r}")
    n = int((1 - val_fraction) * len(ids))
    train, val = ids[:n], ids[n:]
    for part, data in (("train", train), ("validation", val)):
        if len(data) < block_size + 1:
            raise GptpipeError(
                f"the {part} split has {len(data)} tokens but block_size={block_size} needs at "
                f"least {block_size + 1}; use a larger corpus, a smaller block_size or a "
                f"{'smaller' if part == 'train' else 'larger'} val_fraction"
            )
    return train, val


def windows_at(
    data: torch.Tensor, ix: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of the windows starting at ix: two contiguous int64 (B, T) tensors."""
    # One gather of block_size + 1 tokens per row gives both x and its shifted target y.
    windows = data[ix[:, None] + torch.arange(block_size + 1)].to(torch.int64)  # (B, T+1)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
