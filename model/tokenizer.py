"""Tokenizers: the lecture's character-level one and a byte-level BPE one.

Both share one small API so the rest of the pipeline does not care which is in use:

- ``kind`` ("char" | "bpe") and ``vocab_size``;
- ``encode(text) -> np.ndarray`` (1-D ``int64``) and ``decode(ids) -> str``, where ``ids`` is a
  sequence, a NumPy array or a torch tensor of ints;
- ``unknown_chars(text)``: the characters ``encode`` cannot represent (always ``[]`` for BPE);
- ``to_json()`` and the module function ``tokenizer_from_json`` to store and load them.

JSON formats (one line, ``ensure_ascii=False`` so characters stay readable):

- char: ``{"kind": "char", "vocab": ["\\n", " ", "!", ...]}`` - the vocabulary in id order,
  sorted; a vocabulary grown from a base (`CharTokenizer.extended`) adds ``"base_size": K``: its
  first K ids are the base's, in the base's order, and only the characters after them are sorted;
- bpe: ``{"kind": "bpe", "vocab_size": 512, "tokenizer": {...}}`` - ``tokenizer`` is the
  HuggingFace ``tokenizers`` JSON document, embedded as an object rather than as an escaped string
  so that it stays readable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from storage.errors import GptpipeError

KINDS = ("char", "bpe")
# 256 byte tokens plus at least one merge; anything smaller is not BPE.
MIN_BPE_VOCAB_SIZE = 257
# Target size of the text pieces handed to `encode_batch`: big enough to keep per-item overhead
# low, small enough that a 1 MB corpus spreads over all cores.
_BPE_CHUNK_CHARS = 1 << 14
# How many unknown characters an error message lists before it says "and N more".
_MAX_LISTED_CHARS = 20


def _ids_array(ids: Any) -> np.ndarray:
    """Turn a sequence / NumPy array / torch tensor of token ids into a 1-D int64 array."""
    if hasattr(ids, "detach"):  # a torch tensor; checked by duck type so torch stays optional here
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1:
        raise GptpipeError(f"token ids must be a 1-D sequence, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise GptpipeError(f"token ids must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_id_range(ids: np.ndarray, vocab_size: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)][0]
        raise GptpipeError(
            f"token id {int(bad)} is outside the vocabulary (0..{vocab_size - 1}); "
            "were these ids made with a different tokenizer?"
        )


def _codepoints(text: str) -> np.ndarray:
    # surrogatepass: a lone surrogate becomes an (unknown) code point instead of a codec crash.
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _format_chars(chars: Sequence[str]) -> str:
    shown = ", ".join(repr(c) for c in chars[:_MAX_LISTED_CHARS])
    if len(chars) > _MAX_LISTED_CHARS:
        shown += f" and {len(chars) - _MAX_LISTED_CHARS} more"
    return shown


class CharTokenizer:
    """The lecture's tokenizer: one id per character, vocabulary = sorted characters of the corpus.

    A vocabulary that grew from an older one (`extended`) keeps the older one's ids, its first
    ``base_size``, and has the new characters after them, sorted.

    Encoding and decoding are vectorised through NumPy: text is viewed as an array of UTF-32 code
    points and mapped through a lookup table, so there is no Python loop per character.
    """

    kind = "char"

    def __init__(self, vocab: Sequence[str], *, base_size: int = 0):
        vocab = list(vocab)
        if not vocab:
            raise GptpipeError("a character vocabulary cannot be empty")
        if any(not isinstance(c, str) or len(c) != 1 for c in vocab):
            raise GptpipeError("a character vocabulary must hold single characters only")
        if isinstance(base_size, bool) or not isinstance(base_size, int):
            raise GptpipeError(f"base_size must be an integer, got {base_size!r}")
        if not 0 <= base_size <= len(vocab):
            raise GptpipeError(f"base_size {base_size} is outside the vocabulary (0..{len(vocab)})")
        if len(set(vocab)) != len(vocab):
            raise GptpipeError("a character vocabulary must not hold a character twice")
        if vocab[base_size:] != sorted(vocab[base_size:]):
            raise GptpipeError(
                "a character vocabulary must be sorted (after the ids kept from a base, if any)"
            )
        self.vocab: list[str] = vocab
        self.base_size = base_size
        self.vocab_size = len(vocab)
        cps = _codepoints("".join(vocab)).astype(np.int64)
        # Lookup table code point -> id, -1 for "unknown". Its last slot is a sentinel: code points
        # beyond the table are clipped onto it, so they come out as -1 too.
        self._table = np.full(max(int(cps.max()) + 2, 128), -1, dtype=np.int32)
        self._table[cps] = np.arange(len(vocab), dtype=np.int32)
        self._ascii_table = self._table[:128]
        # id -> character as a fixed-width UTF-32 array: decode is a take + one bytes decode.
        self._itos = np.array(vocab, dtype="<U1")

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        """Vocabulary = the distinct characters of ``text``, sorted (as in the lecture)."""
        if not text:
            raise GptpipeError("cannot build a character vocabulary from empty text")
        if text.isascii():  # a histogram of bytes: ~20x faster than sorting code points
            counts = np.bincount(np.frombuffer(text.encode("ascii"), dtype=np.uint8), minlength=128)
            return cls([chr(c) for c in np.flatnonzero(counts)])
        cps = np.unique(_codepoints(text))
        return cls(list(cps.astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")))

    def extended(self, chars: Iterable[str]) -> CharTokenizer:
        """This vocabulary with the characters of ``chars`` it lacks appended, sorted by code
        point: every id of this one means the same character in the new one."""
        added = sorted(set(chars) - set(self.vocab))
        if not added:
            return self
        return CharTokenizer(self.vocab + added, base_size=self.vocab_size)

    def extends(self, base: CharTokenizer) -> bool:
        """Whether ``base``'s vocabulary is the start of this one (same ids, maybe more)."""
        return self.vocab[: base.vocab_size] == base.vocab

    def _lookup(self, cps: np.ndarray) -> np.ndarray:
        """Ids for code points, -1 where unknown."""
        if cps.size and cps.max() >= len(self._table):
            cps = np.minimum(cps, len(self._table) - 1)
        # An explicit intp index is ~3x faster than letting fancy indexing convert uint32 itself.
        return self._table.take(cps.astype(np.intp))

    def encode(self, text: str, *, what: str = "text") -> np.ndarray:
        """Ids of ``text`` (int32). ``what`` names the text in the error for unknown characters.

        ASCII text (most corpora) takes a fast path: one byte per character instead of four.
        """
        if text.isascii():
            ids = self._ascii_table.take(np.frombuffer(text.encode("ascii"), dtype=np.uint8))
        else:
            ids = self._lookup(_codepoints(text))
        if ids.size and ids.min() < 0:
            raise GptpipeError(
                f"{what} has characters the tokenizer does not know: "
                f"{_format_chars(self.unknown_chars(text))}"
            )
        return ids

    def encode_chunks(
        self, text: str, chunk_chars: int, *, what: str = "text"
    ) -> Iterator[np.ndarray]:
        """`encode` of ``text`` in pieces of ``chunk_chars`` characters, lazily: one id per
        character, so the pieces' ids add up to ``encode(text)``. For writers that compress one
        piece while the next is encoded; an unknown character stops it at its piece."""
        for start in range(0, len(text), chunk_chars):
            yield self.encode(text[start : start + chunk_chars], what=what)

    def decode(self, ids: Any) -> str:
        arr = _ids_array(ids)
        _check_id_range(arr, self.vocab_size)
        return self._itos[arr].tobytes().decode("utf-32-le", "surrogatepass")

    def unknown_chars(self, text: str) -> list[str]:
        """Distinct characters of ``text`` outside the vocabulary, in order of first appearance."""
        cps = _codepoints(text)
        unknown = cps[self._lookup(cps) < 0]
        if unknown.size == 0:
            return []
        values, first = np.unique(unknown, return_index=True)
        ordered = values[np.argsort(first)].astype("<u4")
        return list(ordered.tobytes().decode("utf-32-le", "surrogatepass"))

    def to_json(self) -> str:
        doc: dict[str, Any] = {"kind": self.kind, "vocab": self.vocab}
        if self.base_size:
            doc["base_size"] = self.base_size
        return json.dumps(doc, ensure_ascii=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and self.vocab == other.vocab

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


# Places where byte-level pre-tokenization always splits: after a newline that has a
# non-whitespace character on both sides ("x\nY" -> "x" | "\n" | "Y"). Cutting the text there gives
# exactly the pre-tokens of the whole text, so chunked encoding equals whole-text encoding.
# Python's \S is a subset of the Rust regex's non-whitespace, so every cut here is also a cut there.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


def _bpe_chunks(text: str, target: int = _BPE_CHUNK_CHARS) -> Iterator[str]:
    """Split ``text`` into pieces of about ``target`` chars at pre-token boundaries (see above)."""
    start, n = 0, len(text)
    while start < n:
        match = _SAFE_CUT.search(text, start + target) if start + target < n else None
        end = match.start() if match else n
        yield text[start:end]
        start = end


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) trained on the corpus itself with HuggingFace ``tokenizers``.

    Byte-level means every string is representable, so ``unknown_chars`` is always empty. No
    prefix space is added and the decoder does no clean-up, so ``decode(encode(t)) == t`` exactly.
    """

    kind = "bpe"

    def __init__(self, hf_tokenizer: Tokenizer):
        self._tok = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)

    @staticmethod
    def _new_hf_tokenizer() -> Tokenizer:
        tok = Tokenizer(models.BPE())
        # trim_offsets only affects offsets, never ids; add_prefix_space=False keeps text exact.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        return tok

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        """Learn merges on ``text`` until the vocabulary has ``vocab_size`` tokens (or merges run
        out on a small text, in which case ``vocab_size`` is smaller)."""
        _check_bpe_vocab_size(vocab_size)
        if not text:
            raise GptpipeError("cannot train a BPE tokenizer on empty text")
        tok = cls._new_hf_tokenizer()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=[],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        # Same chunking as encode: chunks cut at pre-token boundaries, so the word counts are
        # exactly those of the whole text.
        tok.train_from_iterator(_bpe_chunks(text), trainer=trainer, length=None)
        return cls(tok)

    def encode(self, text: str, *, what: str = "text") -> np.ndarray:
        """Ids of ``text`` (int64); identical to encoding it in one piece, but parallel in Rust."""
        del what  # byte-level: every text is encodable
        if not text:
            return np.zeros(0, dtype=np.int64)
        encodings = self._tok.encode_batch(list(_bpe_chunks(text)), add_special_tokens=False)
        return np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encodings])

    def decode(self, ids: Any) -> str:
        arr = _ids_array(ids)
        _check_id_range(arr, self.vocab_size)
        return self._tok.decode(arr.tolist(), skip_special_tokens=False)

    def unknown_chars(self, text: str) -> list[str]:
        return []

    def to_json(self) -> str:
        doc = {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "tokenizer": json.loads(self._tok.to_str()),
        }
        return json.dumps(doc, ensure_ascii=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BPETokenizer) and self._tok.to_str() == other._tok.to_str()

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def _check_bpe_vocab_size(vocab_size: Any) -> None:
    if vocab_size is None:
        raise GptpipeError(
            f"a bpe tokenizer needs a vocab_size (an integer >= {MIN_BPE_VOCAB_SIZE})"
        )
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int | np.integer):
        raise GptpipeError(f"vocab_size must be an integer, got {vocab_size!r}")
    if vocab_size < MIN_BPE_VOCAB_SIZE:
        raise GptpipeError(
            f"vocab_size for bpe must be >= {MIN_BPE_VOCAB_SIZE} (256 bytes + merges), "
            f"got {vocab_size}"
        )


def train_tokenizer(
    kind: str, text: str, vocab_size: int | None = None
) -> CharTokenizer | BPETokenizer:
    """Train a tokenizer of ``kind`` on ``text``. "char" ignores ``vocab_size``; "bpe" needs it."""
    if kind == "char":
        return CharTokenizer.train(text)
    if kind == "bpe":
        _check_bpe_vocab_size(vocab_size)
        return BPETokenizer.train(text, int(vocab_size))
    raise GptpipeError(f"unknown tokenizer kind {kind!r}; choose one of: {', '.join(KINDS)}")


def tokenizer_from_json(s: str) -> CharTokenizer | BPETokenizer:
    """Load a tokenizer written by ``to_json``."""
    try:
        doc = json.loads(s)
    except (TypeError, ValueError) as exc:
        raise GptpipeError(f"tokenizer JSON is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or "kind" not in doc:
        raise GptpipeError('tokenizer JSON must be an object with a "kind" field')
    kind = doc["kind"]
    if kind == "char":
        if not isinstance(doc.get("vocab"), list):
            raise GptpipeError('char tokenizer JSON needs a "vocab" list of characters')
        return CharTokenizer(doc["vocab"], base_size=doc.get("base_size", 0))
    if kind == "bpe":
        if not isinstance(doc.get("tokenizer"), dict):
            raise GptpipeError('bpe tokenizer JSON needs a "tokenizer" object')
        try:
            tok = BPETokenizer(Tokenizer.from_str(json.dumps(doc["tokenizer"])))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise GptpipeError(f"bpe tokenizer JSON cannot be loaded: {exc}") from None
        if doc.get("vocab_size", tok.vocab_size) != tok.vocab_size:
            raise GptpipeError(
                f"bpe tokenizer JSON says vocab_size {doc['vocab_size']} but its tokenizer has "
                f"{tok.vocab_size} tokens"
            )
        return tok
    raise GptpipeError(
        f"unknown tokenizer kind {kind!r} in JSON; expected one of: {', '.join(KINDS)}"
    )


def vocabulary_mismatch(
    base: CharTokenizer | BPETokenizer, new: CharTokenizer | BPETokenizer
) -> str | None:
    """Why a model whose tokens are ``base``'s cannot be trained on ``new``'s ids (a sentence
    naming the first difference), or None when every id of ``base`` means the same in ``new``:
    a char vocabulary that starts with base's, or the same BPE tokenizer."""
    if base.kind != new.kind:
        return f"it uses a {base.kind} tokenizer, tonight's is {new.kind}"
    if isinstance(base, CharTokenizer) and isinstance(new, CharTokenizer):
        if new.extends(base):
            return None
        n = min(base.vocab_size, new.vocab_size)
        at = next((i for i in range(n) if base.vocab[i] != new.vocab[i]), n)
        if at == n:  # new is shorter than base
            return (
                f"its vocabulary has {base.vocab_size} characters, tonight's only {new.vocab_size}"
            )
        return (
            f"its vocabulary is not the start of tonight's: id {at} is {base.vocab[at]!r} there "
            f"and {new.vocab[at]!r} tonight"
        )
    if base != new:
        return "it uses another BPE tokenizer than tonight's"
    return None
