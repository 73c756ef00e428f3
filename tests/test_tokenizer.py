"""Tokenizers: exact round trips on the whole corpus, the lecture's mapping, JSON, errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    tokenizer_from_json,
    train_tokenizer,
)
from storage.errors import GptpipeError

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def corpus() -> str:
    if not CORPUS.is_file():
        pytest.skip(f"Tiny Shakespeare corpus not found at {CORPUS}")
    return CORPUS.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def char_tok(corpus) -> CharTokenizer:
    return CharTokenizer.train(corpus)


@pytest.fixture(scope="module")
def bpe_tok(corpus) -> BPETokenizer:
    # Training on the full corpus takes well under a second with vocab 512.
    return BPETokenizer.train(corpus, 512)


# --- char ---------------------------------------------------------------------------------------


def test_char_vocab_is_sorted_corpus_chars(corpus, char_tok):
    assert len(corpus) == 1_115_394
    assert char_tok.kind == "char"
    assert char_tok.vocab == sorted(set(corpus))
    assert char_tok.vocab_size == 65


def test_char_matches_lecture_stoi(corpus, char_tok):
    chars = sorted(set(corpus))
    stoi = {ch: i for i, ch in enumerate(chars)}
    head = corpus[:1000]
    ids = char_tok.encode(head)
    assert ids.ndim == 1 and np.issubdtype(ids.dtype, np.integer)
    assert ids.tolist() == [stoi[c] for c in head]
    assert ids[:8].tolist() == [18, 47, 56, 57, 58, 1, 15, 47]  # "First Ci" as in the lecture


def test_char_round_trip_whole_corpus(corpus, char_tok):
    ids = char_tok.encode(corpus)
    assert len(ids) == len(corpus)
    assert char_tok.decode(ids) == corpus


def test_char_encode_chunks_add_up_to_encode(corpus, char_tok):
    chunks = list(char_tok.encode_chunks(corpus, 100_000))
    assert [len(c) for c in chunks] == [100_000] * 11 + [15_394]
    assert np.array_equal(np.concatenate(chunks), char_tok.encode(corpus))
    lazy = char_tok.encode_chunks("abc" * 10 + "€", 10, what="shard 3")
    assert len(next(lazy)) == 10  # encoded piece by piece: the bad piece fails when reached
    next(lazy), next(lazy)
    with pytest.raises(GptpipeError, match=r"^shard 3 has characters .*: '€'"):
        next(lazy)


def test_char_decode_accepts_lists_and_tensors(char_tok):
    ids = char_tok.encode("Hello there")
    assert char_tok.decode(ids.tolist()) == "Hello there"
    assert char_tok.decode(torch.from_numpy(ids)) == "Hello there"
    assert char_tok.decode([]) == ""
    assert char_tok.encode("").tolist() == []


def test_char_unknown_characters_are_named(char_tok):
    assert char_tok.unknown_chars("Hello") == []
    assert char_tok.unknown_chars("héllo €é") == ["é", "€"]
    with pytest.raises(GptpipeError, match=r"does not know: 'é', '€'"):
        char_tok.encode("héllo €")
    with pytest.raises(GptpipeError, match=r"^prompt has characters"):
        char_tok.encode("€", what="prompt")
    # Code points far beyond the vocabulary table (and lone surrogates) are unknown, not a crash.
    assert char_tok.unknown_chars("a😀\ud800") == ["😀", "\ud800"]


def test_char_decode_rejects_out_of_range_ids(char_tok):
    with pytest.raises(GptpipeError, match="outside the vocabulary"):
        char_tok.decode([0, 65])
    with pytest.raises(GptpipeError, match="outside the vocabulary"):
        char_tok.decode([-1])


# --- bpe ----------------------------------------------------------------------------------------


def test_bpe_round_trip_whole_corpus(corpus, bpe_tok):
    assert bpe_tok.kind == "bpe"
    assert bpe_tok.vocab_size == 512
    ids = bpe_tok.encode(corpus)
    assert ids.ndim == 1 and np.issubdtype(ids.dtype, np.integer)
    assert len(ids) < len(corpus) * 0.7  # merges actually compress
    assert ids.min() >= 0 and ids.max() < 512
    assert bpe_tok.decode(ids) == corpus


def test_bpe_chunked_encode_equals_whole_text_encode(corpus, bpe_tok):
    """Chunks are cut at pre-token boundaries, so encode_batch over them changes nothing."""
    whole = bpe_tok._tok.encode(corpus, add_special_tokens=False).ids
    assert bpe_tok.encode(corpus).tolist() == whole


@pytest.mark.parametrize(
    "text",
    ["", " leading space", "trailing space \n", "  \n\n  two\r\nlines\t", "héllo €😀", "\x00\x7f"],
)
def test_bpe_round_trips_awkward_text(bpe_tok, text):
    assert bpe_tok.unknown_chars(text) == []
    assert bpe_tok.decode(bpe_tok.encode(text)) == text


def test_bpe_vocab_size_is_checked(corpus):
    with pytest.raises(GptpipeError, match="needs a vocab_size"):
        train_tokenizer("bpe", corpus[:1000])
    with pytest.raises(GptpipeError, match=">= 257"):
        train_tokenizer("bpe", corpus[:1000], 256)
    with pytest.raises(GptpipeError, match="integer"):
        train_tokenizer("bpe", corpus[:1000], "512")


# --- common -------------------------------------------------------------------------------------


def test_train_tokenizer_kinds(corpus):
    assert train_tokenizer("char", corpus[:5000], vocab_size=999).kind == "char"
    assert train_tokenizer("bpe", corpus[:5000], 300).kind == "bpe"
    with pytest.raises(GptpipeError, match="choose one of: char, bpe"):
        train_tokenizer("word", corpus[:100])
    with pytest.raises(GptpipeError, match="empty"):
        train_tokenizer("char", "")


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_json_round_trip_gives_identical_encodings(corpus, char_tok, bpe_tok, kind):
    tok = char_tok if kind == "char" else bpe_tok
    text = tok.to_json()
    doc = json.loads(text)
    assert doc["kind"] == kind
    loaded = tokenizer_from_json(text)
    assert loaded == tok
    assert type(loaded) is type(tok) and loaded.vocab_size == tok.vocab_size
    assert loaded.to_json() == text  # stable
    sample = corpus[:200_000]
    np.testing.assert_array_equal(loaded.encode(sample), tok.encode(sample))


def test_char_json_is_readable(char_tok):
    assert json.loads(char_tok.to_json()) == {"kind": "char", "vocab": char_tok.vocab}


@pytest.mark.parametrize(
    "bad",
    [
        "not json",
        "[1, 2]",
        '{"vocab": ["a"]}',
        '{"kind": "word"}',
        '{"kind": "char"}',
        '{"kind": "char", "vocab": ["b", "a"]}',
        '{"kind": "char", "vocab": ["ab"]}',
        '{"kind": "bpe"}',
        '{"kind": "bpe", "tokenizer": {"model": 3}}',
    ],
)
def test_bad_json_is_a_gptpipe_error(bad):
    with pytest.raises(GptpipeError):
        tokenizer_from_json(bad)
