"""Sharded token datasets: a JSON manifest over Parquet token files, and a loader that reads lazily.

Manifest format (``gptpipe-dataset-1``)::

    {"format": "gptpipe-dataset-1", "tokenizer": "char", "vocab_size": 65, "n_tokens": N,
     "shards": [{"uri": ..., "sha256": ..., "bytes": ..., "n_tokens": ...}, ...], ...}

The dataset's token sequence is its shards' ids concatenated in list order; training windows may
cross shard boundaries, exactly as in one file. A single Parquet token file is a dataset of one
shard, so ``open_dataset`` takes either.

``TokenDataset`` keeps the whole sequence in memory when it fits ``max_resident_bytes`` (the fast
path: one int64 tensor, as the lecture's ``data``); otherwise it streams: each batch reads only
the row groups its windows touch, through a byte-bounded LRU cache, so a corpus larger than RAM
trains. On S3 a row group read is a ranged GET.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

import storage
from model.data import column_ids, open_token_file, windows_at, write_tokens
from model.tokenizer import BPETokenizer, CharTokenizer
from storage.errors import GptpipeError

FORMAT = "gptpipe-dataset-1"
# Row groups of sharded token files: 64Ki tokens (128 KiB of uint16) keeps a streamed window's
# read small.
SHARD_ROW_GROUP_SIZE = 1 << 16
# The char tokenizer encodes a shard in chunks of whole row groups (see write_shard_tokens).
ENCODE_CHUNK_CHARS = 16 * SHARD_ROW_GROUP_SIZE
DEFAULT_MAX_RESIDENT_BYTES = 2 << 30
MAX_RESIDENT_ENV = "GPTPIPE_MAX_RESIDENT_BYTES"


def write_shard_tokens(
    tok: CharTokenizer | BPETokenizer,
    text: str,
    where: Any,
    metadata: dict[str, str | int],
    what: str = "text",
) -> int:
    """Encode ``text`` into a shard's token file (``metadata`` added to the tokenizer's); returns
    the number of tokens. The char tokenizer gives one id per character, so the count is known
    up front and the text is encoded in chunks, each compressed while the next is encoded."""
    if isinstance(tok, CharTokenizer):
        n_tokens, ids = len(text), tok.encode_chunks(text, ENCODE_CHUNK_CHARS, what=what)
    else:
        ids = tok.encode(text, what=what)
        n_tokens = len(ids)
    metadata = {
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "n_tokens": n_tokens,
        **metadata,
    }
    write_tokens(ids, where, metadata, row_group_size=SHARD_ROW_GROUP_SIZE)
    return n_tokens


def make_manifest(shards: list[dict], **metadata: Any) -> dict:
    """A dataset manifest: ``metadata`` (tokenizer, vocab_size, ...) plus the shards in order."""
    return {
        "format": FORMAT,
        **metadata,
        "n_tokens": sum(int(s["n_tokens"]) for s in shards),
        "shards": shards,
    }


def write_manifest(uri: str, manifest: dict) -> str:
    return storage.put_bytes(uri, json.dumps(manifest, indent=1).encode("utf-8"))


def read_manifest(uri: str) -> dict:
    """A dataset manifest, or a one-shard manifest for a single Parquet token file."""
    if uri.endswith(".parquet"):
        with storage.open_read(uri) as f:
            pf, metadata = open_token_file(f)
            n_tokens = pf.metadata.num_rows
        metadata = {k: v for k, v in metadata.items() if k != "n_tokens"}
        return make_manifest([{"uri": uri, "n_tokens": n_tokens}], **metadata)
    try:
        manifest = json.loads(storage.get_bytes(uri))
    except (ValueError, UnicodeDecodeError) as exc:
        raise GptpipeError(f"{uri} is not a dataset manifest (not JSON: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GptpipeError(f"{uri} is not a dataset manifest (no format {FORMAT})")
    return manifest


def max_resident_bytes() -> int:
    value = os.environ.get(MAX_RESIDENT_ENV)
    if not value:
        return DEFAULT_MAX_RESIDENT_BYTES
    try:
        return int(value)
    except ValueError:
        raise GptpipeError(f"{MAX_RESIDENT_ENV} must be a number of bytes, got {value!r}") from None


class TokenDataset:
    """Random access to a dataset's windows (see the module docstring).

    A streaming dataset keeps its shard files open (each open costs a footer read, on S3 a
    request); ``close()``, or leaving a ``with`` block, closes them. A resident dataset closes
    them as soon as its ids are in memory. Either stays usable after close(): a streaming one
    opens the files it then needs again.
    """

    def __init__(self, manifest: dict, max_bytes: int | None = None):
        self.manifest = manifest
        self.max_bytes = max_resident_bytes() if max_bytes is None else max_bytes
        # shard index -> (the open file, the pyarrow ParquetFile reading it); a ParquetFile does
        # not close a file object it was given, so the file is kept to close it
        self._files: dict[int, tuple[Any, Any]] = {}
        try:
            self._load(manifest)
        except BaseException:
            self.close()
            raise

    def _load(self, manifest: dict) -> None:
        """Index the row groups of every shard, and read them all if they fit in memory."""
        self._groups: list[tuple[int, int]] = []  # global row group -> (shard, group in shard)
        sizes = []
        for s, shard in enumerate(manifest["shards"]):
            meta = self._file(s).metadata
            if meta.num_rows != int(shard["n_tokens"]):
                raise GptpipeError(
                    f"{shard['uri']} has {meta.num_rows} tokens but its dataset manifest says "
                    f"{shard['n_tokens']}; was the shard rewritten? run with --refresh tokenize"
                )
            for g in range(meta.num_row_groups):
                self._groups.append((s, g))
                sizes.append(meta.row_group(g).num_rows)
        # group_starts[k] is the position of global row group k's first token in the sequence
        self.group_starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.n_tokens = int(self.group_starts[-1])
        self.row_groups_read = 0
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._resident: torch.Tensor | None = None
        if self.n_tokens * 8 <= self.max_bytes:  # int64 in memory
            whole = np.concatenate([self._read_shard(s) for s in range(len(manifest["shards"]))])
            self._resident = torch.from_numpy(whole.astype(np.int64))
            self.close()  # every id is in memory: the files are not needed any more
        self.streaming = self._resident is None

    def __len__(self) -> int:
        return self.n_tokens

    def __enter__(self) -> TokenDataset:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the shard files this dataset holds open (see the class docstring)."""
        while self._files:
            _, (f, _pf) = self._files.popitem()
            f.close()

    def _file(self, s: int):
        """Shard s's ParquetFile, opened on first use."""
        if s not in self._files:
            f = storage.open_read(self.manifest["shards"][s]["uri"])
            try:
                pf = open_token_file(f)[0]
            except BaseException:
                f.close()
                raise
            self._files[s] = (f, pf)
        return self._files[s][1]

    def _read_shard(self, s: int) -> np.ndarray:
        """All of shard s in one read (the resident path)."""
        uri = self.manifest["shards"][s]["uri"]
        pf = self._file(s)
        try:
            column = pf.read(columns=["ids"]).column("ids")
        except OSError as exc:
            raise GptpipeError(f"cannot read {uri}: {exc}") from None
        self.row_groups_read += pf.metadata.num_row_groups
        return column_ids(column, uri)

    def _read_group(self, k: int) -> np.ndarray:
        s, g = self._groups[k]
        uri = self.manifest["shards"][s]["uri"]
        try:
            column = self._file(s).read_row_group(g, columns=["ids"]).column("ids")
        except OSError as exc:
            raise GptpipeError(f"cannot read {uri} (row group {g}): {exc}") from None
        self.row_groups_read += 1
        return column_ids(column, uri)

    def _group(self, k: int) -> np.ndarray:
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        ids = self._read_group(k)
        self._cache[k] = ids
        self._cached_bytes += ids.nbytes
        while self._cached_bytes > self.max_bytes and len(self._cache) > 1:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= evicted.nbytes
        return ids

    def windows(self, ix: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of the windows starting at ``ix``: two int64 (B, T) tensors."""
        if self._resident is not None:
            return windows_at(self._resident, ix, block_size)
        starts = ix.numpy().astype(np.int64)  # (B,)
        first = np.searchsorted(self.group_starts, starts, side="right") - 1  # (B,)
        last = np.searchsorted(self.group_starts, starts + block_size, side="right") - 1  # (B,)
        # the groups each window spans, first..last; sorted and unique, so a window's groups sit
        # side by side in `buffer`
        needed = np.unique(
            np.concatenate([np.arange(a, b + 1) for a, b in zip(first, last, strict=True)])
        )
        parts = [self._group(int(k)) for k in needed]
        buffer = np.concatenate(parts)  # (sum of the needed groups' lengths,)
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])])[:-1]
        local = offsets[np.searchsorted(needed, first)] + starts - self.group_starts[first]
        rows = buffer[local[:, None] + np.arange(block_size + 1)].astype(np.int64)  # (B, T+1)
        windows = torch.from_numpy(rows)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def ids(self) -> np.ndarray:
        """The whole token sequence (for small datasets and tests)."""
        if self._resident is not None:
            return self._resident.numpy()
        return np.concatenate([self._read_group(k) for k in range(len(self._groups))])


def open_dataset(uri: str, max_bytes: int | None = None) -> TokenDataset:
    """A dataset manifest (``.json``) or a single token file (``.parquet``) from the store."""
    return TokenDataset(read_manifest(uri), max_bytes)
