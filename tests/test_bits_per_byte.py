"""Bits per byte (model.bits): the definition, segments that are pieces of the val text, the
same bytes scored whatever the tokenizer, the rule for characters a tokenizer cannot encode, and
the paired comparison's arithmetic. Real tokenizers and real (tiny) GPTs, trained in-process."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from model import bits
from model.config import GPTConfig
from model.gpt import GPT
from model.tokenizer import train_tokenizer

VAL_EXTRA = "\nCAF\u00c9 au lait, 5 \u20ac the cup; na\u00efve \u00e9l\u00e8ve!\n"


@pytest.fixture(scope="module")
def texts(small_corpus) -> dict[str, str]:
    """Train text (ASCII Shakespeare), val text with a line of characters the old corpus never
    had, and the corpora: "old" without that line (a champion's), "new" with it (tonight's)."""
    text = small_corpus.read_text(encoding="utf-8")
    train, val = text[:40_000], text[40_000:43_000]
    new_val = val[:1500] + VAL_EXTRA + val[1500:]
    return {"train": train, "val": new_val, "old": train + val, "new": train + new_val}


def tiny_gpt(vocab_size: int, block_size: int = 16, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=vocab_size, block_size=block_size, n_embd=32, n_head=2, n_layer=1, dropout=0.0
    )
    return GPT(config)


def train_tiny(
    tokenizer, text: str, *, seed: int, steps: int, block_size: int = 16, start: GPT | None = None
) -> GPT:
    """A tiny GPT trained for ``steps`` AdamW steps on ``text`` (seeded: init and batches), from
    a copy of ``start`` if given."""
    ids = torch.from_numpy(np.asarray(tokenizer.encode(text), dtype=np.int64))
    if start is None:
        model = tiny_gpt(tokenizer.vocab_size, block_size, seed)
    else:
        model = copy.deepcopy(start).train()
        block_size = model.config.block_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ix = torch.randint(len(ids) - block_size, (16,), generator=generator)
        x = torch.stack([ids[i : i + block_size] for i in ix])
        y = torch.stack([ids[i + 1 : i + block_size + 1] for i in ix])
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def save_checkpoint(model: GPT, tokenizer, path: Path, step: int = 1) -> str:
    """A gptpipe checkpoint of an in-process model (what load_model and MLflow's model read)."""
    torch.save(
        {
            "format_version": 1,
            "model": model.state_dict(),
            "model_config": asdict(model.config),
            "config": {"block_size": model.config.block_size},
            "tokenizer": tokenizer.to_json(),
            "step": step,
        },
        path,
    )
    return str(path)


def segments_of(text: str, tokenizer, segment_tokens: int = 33, n: int = 10_000):
    ids = torch.from_numpy(np.asarray(tokenizer.encode(text), dtype=np.int64))
    return bits.eval_segments(ids, tokenizer, segment_tokens=segment_tokens, n_segments=n)


def uniform(model: GPT) -> GPT:
    """The model made to predict every token with equal probability (all logits 0)."""
    with torch.no_grad():
        model.lm_head.weight.zero_()
        if model.lm_head.bias is not None:
            model.lm_head.bias.zero_()
    return model


def test_bits_per_byte_is_summed_nats_over_bytes_over_ln2(texts):
    """A model that predicts uniformly over V tokens spends ln V nats per token: for the char
    tokenizer on ASCII text (one byte per token) that is log2 V bits per byte exactly; for BPE
    it is log2 V times the target's tokens over its bytes."""
    ascii_val = texts["val"].replace(VAL_EXTRA, "\n")
    char = train_tokenizer("char", texts["old"])
    segments = segments_of(ascii_val, char)
    assert len(segments) > 50
    n_bytes = np.array([s.n_bytes for s in segments])
    nats = bits.segment_nats(uniform(tiny_gpt(char.vocab_size)), char, segments)
    assert nats == pytest.approx(n_bytes * math.log(char.vocab_size), rel=1e-5)
    assert bits.bits_per_byte(nats, n_bytes) == pytest.approx(math.log2(char.vocab_size))

    bpe = train_tokenizer("bpe", texts["old"], 300)
    nats = bits.segment_nats(uniform(tiny_gpt(bpe.vocab_size, 64)), bpe, segments)
    tokens = np.array([len(bpe.encode(s.target)) for s in segments])
    assert tokens.sum() < n_bytes.sum() * 0.8  # BPE merges: fewer tokens than bytes
    assert nats == pytest.approx(tokens * math.log(bpe.vocab_size), rel=1e-5)
    expected = tokens.sum() * math.log2(bpe.vocab_size) / n_bytes.sum()
    assert bits.bits_per_byte(nats, n_bytes) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_segments_are_pieces_of_the_val_text(texts, kind):
    """Every segment is context + target, a true piece of the val text (a BPE window's cut
    characters dropped at its edges), the context ending before a space or newline; they do not
    overlap and run through the text in order."""
    val = texts["val"]
    tokenizer = train_tokenizer(kind, texts["new"], 300)
    segments = segments_of(val, tokenizer)
    assert len(segments) >= 40
    at = 0
    for s in segments:
        assert s.context and s.target
        found = val.find(s.context + s.target, at)
        assert found >= 0, (s, at)
        at = found + len(s.context) + len(s.target)
    cut_before_space = [s for s in segments if s.target[0].isspace()]
    assert len(cut_before_space) > 0.8 * len(segments)
    # deterministic: the same ids and settings give the same segments
    assert segments_of(val, tokenizer) == segments


def test_every_target_token_is_scored_once_whatever_the_block_size(texts):
    """A target longer than the block is scored in sliding windows: a model whose prediction
    depends on the current token only gives the same nats with a block of 4 as with 64."""
    char = train_tokenizer("char", texts["old"])
    segments = segments_of(texts["val"].replace(VAL_EXTRA, "\n"), char, segment_tokens=65)
    big, small = tiny_gpt(char.vocab_size, 64, seed=3), tiny_gpt(char.vocab_size, 4, seed=3)
    small.load_state_dict(
        {
            k: v[:4] if k == "position_embedding_table.weight" else v
            for k, v in big.state_dict().items()
        }
    )
    for model in (big, small):  # no attention, no MLP output, no positions: a bigram model
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith("blocks.") or name == "position_embedding_table.weight":
                    p.zero_()
    one_window = bits.segment_nats(big, char, segments)
    sliding = bits.segment_nats(small, char, segments)
    assert sliding == pytest.approx(one_window, rel=1e-5)
    # and the windows themselves: each scored position once, with context, in order
    for n, n_ctx, block in ((100, 10, 8), (9, 1, 8), (33, 8, 32), (200, 50, 17)):
        windows = list(bits._windows(n, n_ctx, block))
        scored = [p for start, end, j in windows for p in range(j, end)]
        assert scored == list(range(n_ctx, n))
        assert all(end - 1 - start <= block for start, end, _ in windows)
        assert all(j - start >= min(j, block - block // 2) for start, _, j in windows)


def test_a_tokenizer_without_some_characters_leaves_out_their_segments_for_both(texts):
    """The rule: both models are scored on the segments both can encode; a segment with a
    character one tokenizer cannot encode is left out for both, and its bytes' share is said."""
    val = texts["val"]
    tonight = train_tokenizer("char", texts["new"])
    champion = train_tokenizer("char", texts["old"])  # knows no \u00c9, \u20ac, ...
    segments = segments_of(val, tonight)
    n_bytes = np.array([s.n_bytes for s in segments])
    new = bits.segment_nats(tiny_gpt(tonight.vocab_size, seed=1), tonight, segments)
    old = bits.segment_nats(tiny_gpt(champion.vocab_size, seed=2), champion, segments)
    unknown = np.array([bool(champion.unknown_chars(s.context + s.target)) for s in segments])
    assert 0 < unknown.sum() <= 4  # the one line of new characters
    assert np.isnan(old).tolist() == unknown.tolist()
    assert not np.isnan(new).any()
    paired = bits.compare(new, old, n_bytes)
    assert paired.segments == len(segments) - unknown.sum()
    assert paired.left_out == pytest.approx(n_bytes[unknown].sum() / n_bytes.sum())
    assert paired.new_bpb == pytest.approx(
        bits.bits_per_byte(np.where(unknown, np.nan, new), n_bytes)
    )
    # a tokenizer that can encode (almost) nothing of the text: no comparison at all
    stranger = train_tokenizer("char", "xyz \n")
    none = bits.segment_nats(tiny_gpt(stranger.vocab_size), stranger, segments)
    assert np.isnan(none).all() and bits.compare(new, none, n_bytes) is None


def test_a_char_model_and_a_bpe_model_of_the_same_corpus_are_comparable(texts):
    """Trained on the same text, a char model and a BPE model score the same bytes of the same
    segments: their bits per byte pair up, nothing left out; the longer-trained wins clearly."""
    char = train_tokenizer("char", texts["new"])
    bpe = train_tokenizer("bpe", texts["new"], 300)
    segments = segments_of(texts["val"], char)
    n_bytes = np.array([s.n_bytes for s in segments])
    char_model = train_tiny(char, texts["train"], seed=1, steps=20)
    bpe_model = train_tiny(bpe, texts["train"], seed=1, steps=150, block_size=16)
    char_nats = bits.segment_nats(char_model, char, segments)
    bpe_nats = bits.segment_nats(bpe_model, bpe, segments)
    paired = bits.compare(bpe_nats, char_nats, n_bytes)
    assert paired.left_out == 0 and paired.segments == len(segments)
    assert paired.new_bpb < paired.old_bpb and paired.promotes()
    assert bits.compare(char_nats, bpe_nats, n_bytes).promotes() is False


def test_the_paired_standard_error_is_that_of_the_mean_difference():
    """Equal-length segments: the improvement is the mean per-segment difference in bits per
    byte and its standard error is the sample standard deviation over sqrt(n)."""
    rng = np.random.default_rng(0)
    n_bytes = np.full(400, 100)
    old = rng.normal(150, 10, 400)
    new = old - rng.normal(2, 3, 400)
    paired = bits.compare(new, old, n_bytes)
    d = (old - new) / 100 / math.log(2)
    assert paired.improvement == pytest.approx(d.mean())
    assert paired.stderr == pytest.approx(d.std(ddof=1) / math.sqrt(400))
    assert paired.old_bpb - paired.new_bpb == pytest.approx(paired.improvement)
    same = bits.compare(old, old, n_bytes)
    assert (same.improvement, same.stderr, same.promotes()) == (0, 0, False)
    # the margin: 2 standard errors, at least 2% of the champion's bits per byte; or as given
    assert paired.margin() == max(2 * paired.stderr, 0.02 * paired.old_bpb)
    assert paired.margin(0.5) == 0.5
    assert paired.promotes(0.0) and not paired.promotes(1.0)
