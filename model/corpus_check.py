"""Bad nights caught before training: a corpus's profile, and how tonight's differs from another.

A `CorpusProfile` is what the check needs to know of a corpus, measured in one streaming pass
(``CHUNK_BYTES`` at a time, so a corpus of hundreds of MB never sits in memory whole): its UTF-8
bytes and files, its characters and how often each occurs, its ASCII/C1 control characters and,
if it is not text, why not. ``sha256`` is the sha256 of the corpus's byte string (its files
concatenated in corpus order, as `model.corpus` reads them), so a profile is content-addressed:
`save_profile` keeps it at ``STORE/corpus-profiles/<sha256>.json``.

A corpus is text when every file decodes as UTF-8 on its own (the tokenize stage decodes them so),
holds no NUL byte (`model.data.decode_corpus` refuses one) and at most ``MAX_CONTROL_SHARE`` of its
characters are control characters other than whitespace (tab, newline, vertical tab, form feed,
carriage return). Once a corpus is found not to be text, its characters are no longer counted
(``chars`` and ``char_counts`` cover the part before the fault); its bytes and sha256 still are.

`compare(previous, tonight, limits)` gives one line per problem, each saying what changed, by how
much, and how to go ahead anyway. An empty or non-text corpus always fails; against a previous
corpus (the champion's), a corpus that shrank by more than ``max_corpus_shrink`` or whose
characters are more than ``max_new_char_share`` characters the previous corpus never had fails.
A corpus that grows, or gains a few new characters, passes.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import storage
from model.corpus import list_inputs
from model.data import looks_binary, not_utf8
from storage.errors import GptpipeError

CHUNK_BYTES = 4 << 20
# at most this share of a text's characters may be control characters other than whitespace
MAX_CONTROL_SHARE = 0.01
FORMAT = "gptpipe-corpus-profile-1"
PROFILES = "corpus-profiles"  # STORE/corpus-profiles/<sha256>.json
# how to go ahead with a corpus that changed more than the limits allow (the CLI, a deployment)
ACCEPT_HINT = "--accept-data-change (accept_data_change: true in a deployment)"
# how many of the new characters a problem line shows
SHOWN_NEW_CHARS = 12

_N_CODES = 0x110000
_WHITESPACE_CONTROLS = frozenset(range(9, 14))  # \t \n \v \f \r
_CONTROL_CODES = np.array(
    [c for c in (*range(0, 32), *range(127, 160)) if c not in _WHITESPACE_CONTROLS]
)


@dataclass(frozen=True)
class CorpusProfile:
    """What the data check knows of a corpus (see the module docstring)."""

    sha256: str
    bytes: int
    files: int
    chars: int
    char_counts: tuple[tuple[str, int], ...]  # (character, occurrences), sorted by character
    control_chars: int = 0  # control characters other than whitespace, NUL included
    not_text: str = ""  # why the corpus is not text ("": it is)

    @property
    def is_text(self) -> bool:
        return not self.not_text

    @property
    def charset(self) -> frozenset[str]:
        return frozenset(c for c, _ in self.char_counts)

    @property
    def distinct_chars(self) -> int:
        return len(self.char_counts)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "files": self.files,
            "chars": self.chars,
            "char_counts": dict(self.char_counts),
            "control_chars": self.control_chars,
            "not_text": self.not_text,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True, indent=1)

    @classmethod
    def from_dict(cls, data: dict) -> CorpusProfile:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a corpus profile (no format {FORMAT})")
        return cls(
            sha256=data["sha256"],
            bytes=int(data["bytes"]),
            files=int(data["files"]),
            chars=int(data["chars"]),
            char_counts=tuple(sorted((c, int(n)) for c, n in data["char_counts"].items())),
            control_chars=int(data.get("control_chars", 0)),
            not_text=data.get("not_text", ""),
        )


def _is_fraction(value: object) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and 0 <= value <= 1
    )


@dataclass(frozen=True)
class DataChangeLimits:
    """How much tonight's corpus may differ from the champion's before the night stops.

    max_corpus_shrink: the largest fraction by which tonight's corpus may be smaller (in bytes)
    than the champion's (0.5: half of it may go; 1: any shrinking passes).
    max_new_char_share: the largest share of tonight's characters that may be characters the
    champion's corpus never had (0: none may be new; 1: any share passes).

    A bad value is a one-line GptpipeError naming the setting, raised on construction.
    """

    max_corpus_shrink: float = 0.5
    max_new_char_share: float = 0.1

    def __post_init__(self) -> None:
        problems = limit_problems(self)
        if problems:
            raise GptpipeError(problems[0])


def limit_problems(limits: object) -> list[str]:
    """One line per limit that is not a fraction in [0, 1], naming the setting."""
    problems = []
    for name in ("max_corpus_shrink", "max_new_char_share"):
        value = getattr(limits, name)
        if not _is_fraction(value):
            problems.append(f"{name} must be a fraction between 0 and 1 (e.g. 0.5), got {value!r}")
    return problems


# ---------------------------------------------------------------------------------------------
# Profiling


def _input_files(source: str) -> list:
    """The corpus's files as `model.corpus.list_inputs` reads them; [] for an empty corpus (a
    file, folder or prefix whose files are all empty), which the check reports itself."""
    try:
        return list_inputs(source)
    except GptpipeError as exc:
        if str(exc).startswith(f"input {source} is empty;"):
            return []
        raise


def _chunks(uri: str, chunk_bytes: int) -> Iterator[bytes]:
    with storage.open_read(uri) as f:
        while chunk := f.read(chunk_bytes):
            yield chunk


@dataclass
class _Counter:
    """The running state of one profiling pass."""

    digest: Any = field(default_factory=hashlib.sha256)
    counts: np.ndarray = field(default_factory=lambda: np.zeros(_N_CODES, dtype=np.int64))
    bytes: int = 0
    not_text: str = ""

    def add_text(self, text: str) -> None:
        if text.isascii():
            codes = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        else:
            codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        found = np.bincount(codes)
        self.counts[: len(found)] += found


def profile_corpus(source: str, *, chunk_bytes: int = CHUNK_BYTES) -> CorpusProfile:
    """The profile of ``source``: a local file, folder or glob, or an s3:// object or prefix
    (an http(s) source is staged into the store first: `model.corpus.stage_download`)."""
    files = _input_files(source)
    state = _Counter()
    for file in files:
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        offset = 0
        for chunk in _chunks(file.uri, chunk_bytes):
            state.digest.update(chunk)
            state.bytes += len(chunk)
            if not state.not_text:
                state.not_text = _count(state, decoder, chunk, file.uri, offset)
            offset += len(chunk)
        if not state.not_text:
            state.not_text = _count(state, decoder, b"", file.uri, offset, final=True)
    counts = state.counts
    chars = int(counts.sum())
    control = int(counts[_CONTROL_CODES].sum())
    if not state.not_text and control > MAX_CONTROL_SHARE * chars:
        state.not_text = (
            f"{control:,} of its {chars:,} characters ({control / chars:.1%}) are control "
            f"characters (at most {MAX_CONTROL_SHARE:.0%} may be); pass a UTF-8 text file"
        )
    present = np.flatnonzero(counts)
    return CorpusProfile(
        sha256=state.digest.hexdigest(),
        bytes=state.bytes,
        files=len(files),
        chars=chars,
        char_counts=tuple((chr(c), int(counts[c])) for c in present),
        control_chars=control,
        not_text=state.not_text,
    )


def _count(
    state: _Counter, decoder, chunk: bytes, uri: str, offset: int, final: bool = False
) -> str:
    """Decode and count one chunk of a file (``offset``: where it starts in the file); why the
    corpus is not text, or ""."""
    pending = decoder.getstate()[0]
    nul = chunk.find(b"\x00")
    try:
        text = decoder.decode(chunk, final)
    except UnicodeDecodeError as exc:
        at = exc.start - len(pending)  # where the bad byte is in the chunk
        if 0 <= nul < at:  # the first fault is a NUL byte before it
            return looks_binary(uri, offset + nul)
        return not_utf8(uri, (pending + chunk)[exc.start], offset + at)
    if nul >= 0:
        return looks_binary(uri, offset + nul)
    state.add_text(text)
    return ""


# ---------------------------------------------------------------------------------------------
# Stored profiles


def profile_uri(store: str, sha256: str) -> str:
    """Where the profile of the corpus with this sha256 is kept in ``store``."""
    return storage.join(store, PROFILES, f"{sha256}.json")


def save_profile(store: str, profile: CorpusProfile) -> str:
    """Keep ``profile`` in the store (whole or not at all; kept once: it is content-addressed);
    its URI."""
    uri = profile_uri(store, profile.sha256)
    if not storage.exists(uri):
        storage.put_bytes(uri, profile.to_json().encode("utf-8"))
    return uri


def load_profile(uri: str) -> CorpusProfile:
    """A stored profile; a one-line GptpipeError if it is missing or is not one."""
    if not storage.exists(uri):
        raise GptpipeError(f"corpus profile {uri} not found")
    try:
        return CorpusProfile.from_dict(json.loads(storage.get_bytes(uri)))
    except (ValueError, KeyError, TypeError) as exc:
        raise GptpipeError(f"{uri} is not a readable corpus profile: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Comparing


def _at_least(share: float) -> str:
    """The smallest limit, in hundredths, that lets ``share`` pass."""
    return f"{math.ceil(share * 100 - 1e-9) / 100:.2f}"


def _shown_chars(chars: list[str]) -> str:
    shown = "".join(chars[:SHOWN_NEW_CHARS])
    more = f" and {len(chars) - SHOWN_NEW_CHARS} more" if len(chars) > SHOWN_NEW_CHARS else ""
    return f"{shown!r}{more}"


def compare(
    previous: CorpusProfile | None, tonight: CorpusProfile, limits: DataChangeLimits
) -> list[str]:
    """One line per problem of ``tonight``'s corpus, against ``previous`` (the champion's; None:
    there is none, and only an empty or non-text corpus fails). [] when it passes."""
    if tonight.bytes == 0:
        return ["tonight's corpus is empty (0 bytes): nothing to train on; fix the input"]
    if not tonight.is_text:
        return [f"tonight's corpus is not text: {tonight.not_text}"]
    if previous is None or previous.sha256 == tonight.sha256:
        return []
    problems = []
    shrink = 1 - tonight.bytes / previous.bytes if previous.bytes else 0.0
    if shrink > limits.max_corpus_shrink:
        problems.append(
            f"tonight's corpus shrank by {shrink:.1%} ({previous.bytes:,} -> {tonight.bytes:,} "
            f"bytes) from the one the champion was trained on (max_corpus_shrink "
            f"{limits.max_corpus_shrink}); to train on it anyway pass {ACCEPT_HINT} or set "
            f"max_corpus_shrink to {_at_least(shrink)} or more"
        )
    known = previous.charset
    new = [(c, n) for c, n in tonight.char_counts if c not in known]
    new_count = sum(n for _, n in new)
    share = new_count / tonight.chars if tonight.chars else 0.0
    if share > limits.max_new_char_share:
        problems.append(
            f"{share:.1%} of tonight's characters ({new_count:,} of {tonight.chars:,}) are "
            f"{len(new)} character(s) the champion's corpus never had "
            f"({_shown_chars([c for c, _ in new])}; max_new_char_share "
            f"{limits.max_new_char_share}); to train on it anyway pass {ACCEPT_HINT} or set "
            f"max_new_char_share to {_at_least(share)} or more"
        )
    return problems
