"""A vocabulary that stays put: a char tokenizer grown from a base keeps every id of the base and
appends the characters it lacks (sorted); the tokenize stage does so with a base tokenizer, keys
on it only when given, and re-uses a BPE base as it is. Real text (Tiny Shakespeare's start)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import storage
from model.tokenizer import (
    CharTokenizer,
    tokenizer_from_json,
    train_tokenizer,
    vocabulary_mismatch,
)
from storage.errors import GptpipeError

NEW_LINE = "\nGRUMIO: Café au lait? Ça va, naïve Zoë — ½ of it, Ω!\n"


@pytest.fixture(scope="module")
def nights(corpus_path) -> tuple[str, str]:
    """Night 1: a short start of the corpus (some characters missing); night 2: more of it,
    and a line with characters the corpus never has."""
    text = corpus_path.read_text(encoding="utf-8")
    return text[:3_000], text[:40_000] + NEW_LINE


def test_a_grown_vocabulary_keeps_the_base_ids_and_appends_new_chars_sorted(nights):
    one, two = nights
    base = CharTokenizer.train(one)
    grown = base.extended(two)
    assert grown.vocab[: base.vocab_size] == base.vocab
    added = grown.vocab[base.vocab_size :]
    assert added == sorted(set(two) - set(one)) and added  # new ones, by code point
    assert {"é", "Ω", "½", "—"} <= set(added)
    assert base.encode(one).tolist() == grown.encode(one).tolist()  # old ids mean the same
    assert grown.decode(grown.encode(two)) == two
    assert grown.extends(base) and not CharTokenizer.train(two).extends(base)
    assert base.extended(two) == grown  # deterministic
    assert base.extended(one) == base  # nothing new: the same vocabulary


def test_a_base_char_the_text_lacks_keeps_its_id(nights):
    one, _ = nights
    base = CharTokenizer.train(one + "#")
    grown = base.extended(one.replace("#", "") + "~")
    assert grown.vocab == base.vocab + ["~"]


def test_a_grown_vocabulary_round_trips_through_json(nights):
    one, two = nights
    base = CharTokenizer.train(one)
    grown = base.extended(two)
    doc = json.loads(grown.to_json())
    assert doc["base_size"] == base.vocab_size  # the ids kept; only the rest is sorted
    again = tokenizer_from_json(grown.to_json())
    assert again == grown and again.base_size == base.vocab_size
    twice = again.extended("\u263a")  # grown again: night 2's ids all kept
    assert twice.base_size == grown.vocab_size and twice.vocab[:-1] == grown.vocab
    assert "base_size" not in json.loads(base.to_json())  # a fresh vocabulary's JSON as before
    tok = CharTokenizer(["b", "a", "\n", "é"], base_size=2)
    assert tok.encode("abé\n").tolist() == [1, 0, 3, 2]


@pytest.mark.parametrize(
    "vocab, base_size, message",
    [
        (["b", "a"], 0, "must be sorted"),
        (["b", "a", "z", "c"], 2, "must be sorted"),  # the appended part is sorted
        (["a", "b", "a"], 2, "twice"),
        (["a"], 2, "outside the vocabulary"),
    ],
)
def test_a_bad_grown_vocabulary_is_refused(vocab, base_size, message):
    with pytest.raises(GptpipeError, match=message):
        CharTokenizer(vocab, base_size=base_size)


def test_vocabulary_mismatch_names_the_first_difference(nights):
    one, two = nights
    base = CharTokenizer.train(one)
    assert vocabulary_mismatch(base, base.extended(two)) is None
    fresh = CharTokenizer.train(two)  # sorted again: ids move
    problem = vocabulary_mismatch(base, fresh)
    assert problem is not None and "not the start of tonight's: id " in problem
    assert "only" in vocabulary_mismatch(base.extended("Ω"), base)
    bpe = train_tokenizer("bpe", two, 300)
    assert "char tokenizer, tonight's is bpe" in vocabulary_mismatch(base, bpe)
    assert vocabulary_mismatch(bpe, bpe) is None


# --- the tokenize stage -----------------------------------------------------------------------


@pytest.fixture()
def on_server(prefect_server):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        yield


def run_tokenize(source: Path, store: Path, **options):
    from prefect import flow

    from tasks.results import Workspace
    from tasks.tokenize import tokenize

    @flow(name="vocab-growth-test")
    def stage():
        return tokenize(str(source), Workspace(str(store)), **options)

    return stage()


def stage_tokenizer(result):
    return tokenizer_from_json(storage.get_bytes(result.tokenizer.uri).decode())


def test_the_stage_keeps_the_base_vocabulary(on_server, nights, tmp_path):
    from model.dataset import open_dataset
    from tasks.cache import cache_key

    one, two = nights
    (tmp_path / "one.txt").write_text(one, encoding="utf-8")
    (tmp_path / "two.txt").write_text(two, encoding="utf-8")
    store = tmp_path / "store"
    night1 = run_tokenize(tmp_path / "one.txt", store)
    base = stage_tokenizer(night1)
    assert base.vocab == sorted(set(one))

    # a small shard size: the vocabulary is merged from several shards' characters
    grown = run_tokenize(
        tmp_path / "two.txt", store, shard_bytes=8_000, base_tokenizer=night1.tokenizer
    )
    tok = stage_tokenizer(grown)
    assert tok.vocab == base.extended(two).vocab
    assert grown.metadata["base_vocab_size"] == base.vocab_size
    assert grown.metadata["base_tokenizer_sha256"] == night1.tokenizer.sha256
    ids = open_dataset(grown.tokens.uri)
    assert tok.decode(ids.ids()) == two

    # without a base: a fresh, sorted vocabulary, keyed as before this option existed
    fresh = run_tokenize(tmp_path / "two.txt", store, shard_bytes=8_000)
    assert stage_tokenizer(fresh).vocab == sorted(set(two))
    source_id = fresh.metadata["source_id"]
    key = cache_key(
        "tokenize", source_id=source_id, shard_bytes=8_000, tokenizer="char", vocab_size=None
    )
    assert fresh.tokens.uri.startswith(str(store / "datasets" / f"tokenize-{key}"))
    assert f"tokenize-{key}" not in grown.tokens.uri  # the base is part of its key

    # the base as a URI: the same key, re-used
    again = run_tokenize(
        tmp_path / "two.txt", store, shard_bytes=8_000, base_tokenizer=night1.tokenizer.uri
    )
    assert again.cached and again.tokens == grown.tokens


def test_a_bpe_base_is_used_as_it_is_and_kinds_must_match(on_server, nights, tmp_path):
    one, two = nights
    (tmp_path / "one.txt").write_text(one, encoding="utf-8")
    (tmp_path / "two.txt").write_text(two, encoding="utf-8")
    store = tmp_path / "store"
    night1 = run_tokenize(tmp_path / "one.txt", store, tokenizer="bpe", vocab_size=300)
    night2 = run_tokenize(
        tmp_path / "two.txt",
        store,
        tokenizer="bpe",
        vocab_size=300,
        base_tokenizer=night1.tokenizer,
    )
    assert storage.get_bytes(night2.tokenizer.uri) == storage.get_bytes(night1.tokenizer.uri)
    tok = stage_tokenizer(night2)
    from model.dataset import open_dataset

    ids = open_dataset(night2.tokens.uri)
    assert tok.decode(ids.ids()) == two  # it encodes the new characters (bytes)

    with pytest.raises(GptpipeError, match="is bpe and this run's tokenizer is char"):
        run_tokenize(tmp_path / "two.txt", store, base_tokenizer=night1.tokenizer)
    with pytest.raises(GptpipeError, match="no such file"):
        run_tokenize(tmp_path / "two.txt", store, base_tokenizer=str(tmp_path / "nope.json"))
