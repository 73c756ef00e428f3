"""Promotion that is not noise (issue 26, items 1 and 5): the champion moves only if tonight's
model wins by more than the paired comparison's margin, in bits per byte on tonight's val text,
whatever tokenizer the champion uses.

Tiny GPTs trained in-process; the register stage itself (`register_model.fn`) against a real
MLflow (sqlite) and a real local store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from model import bits
from model.data import write_tokens
from model.evaluate import checkpoint_bits
from model.tokenizer import train_tokenizer
from storage.errors import GptpipeError
from storage.tracking import Tracker
from tasks.evaluate import bpb_evaluation, save_scores, scores_uri
from tasks.register import register_model
from tasks.results import (
    Artifact,
    EvaluateResult,
    SplitResult,
    Tracking,
    TrainResult,
    Workspace,
)
from tests.test_bits_per_byte import VAL_EXTRA, save_checkpoint, train_tiny

STEPS = 60  # a tiny model's training
NOISE_STEPS = 10  # then a few more steps on another seed's batches: a model that differs by noise


@pytest.fixture(scope="module")
def corpora(small_corpus) -> dict[str, dict[str, str]]:
    """Night 1's corpus and night 2's: the same text grown, with a line of new characters."""
    text = small_corpus.read_text(encoding="utf-8")
    old = text[:44_000]
    val_start = 40_000
    new = old[:41_500] + VAL_EXTRA + old[41_500:] + text[44_000:46_000]
    return {
        "old": {"train": old[:val_start], "val": old[val_start:], "all": old},
        "new": {"train": new[:val_start], "val": new[val_start:], "all": new},
    }


def test_nearly_equal_models_do_not_flip_the_champion(corpora):
    """Nearly equal models (one training, then a few more steps on three seeds' batches): none
    wins over another under the default margin, in either direction; a model trained 4 times
    longer wins over each."""
    night = corpora["old"]
    tok = train_tokenizer("char", night["all"])
    ids = torch.from_numpy(np.asarray(tok.encode(night["val"]), dtype=np.int64))
    segments = bits.eval_segments(ids, tok, segment_tokens=17, n_segments=10_000)
    n_bytes = np.array([s.n_bytes for s in segments])
    base = train_tiny(tok, night["train"], seed=1, steps=STEPS)
    seeds = [
        bits.segment_nats(
            train_tiny(tok, night["train"], seed=s, steps=NOISE_STEPS, start=base), tok, segments
        )
        for s in (2, 3, 4)
    ]
    pairs = [bits.compare(new, old, n_bytes) for new in seeds for old in seeds if new is not old]
    assert all(p.improvement != 0 for p in pairs)  # they do differ
    assert [p for p in pairs if p.promotes()] == []
    longer = train_tiny(tok, night["train"], seed=5, steps=3 * STEPS, start=base)
    better = bits.segment_nats(longer, tok, segments)
    for old in seeds:
        paired = bits.compare(better, old, n_bytes)
        assert paired.promotes() and paired.improvement > 2 * paired.margin(), paired


def _night(tmp_path, name: str, corpus: dict[str, str], kind: str) -> dict:
    """A night's tokenizer and val split in the store, as the tokenize and split stages leave
    them (a tokenizer.json and a val token file)."""
    folder = tmp_path / "store" / "datasets" / f"{name}-{kind}"
    folder.mkdir(parents=True)
    tok = train_tokenizer(kind, corpus["all"], 300)
    (folder / "tokenizer.json").write_text(tok.to_json(), encoding="utf-8")
    ids = tok.encode(corpus["val"])
    with open(folder / "val.parquet", "wb") as f:
        write_tokens(ids, f, {"vocab_size": tok.vocab_size, "n_tokens": len(ids)})
    val = Artifact.of(str(folder / "val.parquet"))
    splits = SplitResult(train=val, val=val, metadata={}, cached=False)
    return {"tok": tok, "tokenizer": Artifact.of(str(folder / "tokenizer.json")), "splits": splits}


def _register(tmp_path, tracker, night, model, label, **options):
    """Tonight's model through the evaluate stage's bits-per-byte part and the register stage."""
    path = save_checkpoint(model, night["tok"], tmp_path / f"{label}.pt")
    checkpoint = Artifact.of(path)
    store = str(tmp_path / "store")
    measured = checkpoint_bits(path, night["splits"].val.uri, n_segments=512, batch_size=32)
    evaluation = bpb_evaluation(
        night["splits"].val.sha256,
        measured["tokenizer"],
        measured["segment_tokens"],
        measured["n_segments"],
    )
    scores = save_scores(
        scores_uri(store, evaluation, checkpoint.sha256),
        measured["nats"],
        measured["bytes"],
        evaluation=evaluation,
        checkpoint_sha256=checkpoint.sha256,
    )
    run_id = tracker.start_run(label)
    workspace = Workspace(
        store=store,
        tracking=Tracking(uri=tracker.tracking_uri, experiment="promotion"),
        owner=label,
    )
    return register_model.fn(
        workspace,
        "gptpipe-promotion-test",
        trained=TrainResult(checkpoint, 1, 0, 1, False, None, run_id, {}),
        evaluated=EvaluateResult(
            1.0,
            1.0,
            16,
            32,
            1337,
            run_id,
            val_bpb=measured["val_bpb"],
            bpb_segments=len(measured["bytes"]),
            bpb_bytes=int(measured["bytes"].sum()),
            bpb_evaluation=evaluation,
            bpb_scores_uri=scores,
        ),
        splits=night["splits"],
        tokenizer=night["tokenizer"],
        run_id=label,
        **options,
    )


def test_the_champion_moves_only_on_a_win_beyond_the_margin_whatever_its_tokenizer(
    corpora, tmp_path
):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "promotion")
    client = MlflowClient(tracker.tracking_uri)
    name = "gptpipe-promotion-test"
    one = _night(tmp_path, "one", corpora["old"], "char")
    base = train_tiny(one["tok"], corpora["old"]["train"], seed=1, steps=STEPS)
    first = _register(tmp_path, tracker, one, base, "a")
    assert (first.version, first.champion, first.reason) == ("1", True, "no champion yet")
    tags = client.get_model_version(name, "1").tags
    assert float(tags["val_bpb"]) == pytest.approx(first.val_bpb, abs=1e-6)
    assert "bpb_evaluation" in tags

    # a nearly equal model (a few more steps on another seed's batches): scored against the
    # champion's recorded per-segment scores, it does not win by the margin; it is the challenger
    noise = train_tiny(one["tok"], corpora["old"]["train"], seed=2, steps=NOISE_STEPS, start=base)
    again = _register(tmp_path, tracker, one, noise, "b")
    assert (again.version, again.champion, again.champion_version) == ("2", False, "1")
    assert "as recorded on the same val data" in again.reason
    assert abs(again.bpb_improvement) <= again.min_improvement and again.significant is False
    assert again.min_improvement == pytest.approx(
        max(2 * again.bpb_stderr, 0.02 * again.champion_val_bpb)
    )
    assert again.bpb_left_out == 0 and again.bpb_segments > 100
    assert "does not count" in again.reason
    tags = client.get_model_version(name, "2").tags
    assert tags["bpb_vs_champion"] == "v1" and tags["bpb_significant"] == "false"
    assert float(tags["bpb_improvement"]) == pytest.approx(again.bpb_improvement, abs=1e-6)
    assert float(tags["bpb_margin"]) == pytest.approx(again.min_improvement, abs=1e-6)
    assert float(tags["bpb_stderr"]) == pytest.approx(again.bpb_stderr, abs=1e-6)
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"

    # night 2: the corpus grew and brought characters v1's tokenizer cannot encode; a model
    # trained longer on it is compared all the same, on the text both encode, and wins
    two = _night(tmp_path, "two", corpora["new"], "char")
    assert two["tok"].vocab_size > one["tok"].vocab_size
    better = train_tiny(two["tok"], corpora["new"]["train"], seed=3, steps=4 * STEPS)
    won = _register(tmp_path, tracker, two, better, "c")
    assert won.champion and won.version == "3" and won.significant
    assert (
        0 < won.bpb_left_out < 0.1 and "left out" in won.reason and "as recorded" not in won.reason
    )
    assert won.bpb_improvement > won.min_improvement
    assert str(client.get_model_version_by_alias(name, "champion").version) == "3"

    # a BPE model of night 2 against the char champion: comparable; a margin set by hand
    bpe = _night(tmp_path, "two", corpora["new"], "bpe")
    model = train_tiny(bpe["tok"], corpora["new"]["train"], seed=1, steps=2 * STEPS)
    held = _register(tmp_path, tracker, bpe, model, "d", min_improvement=5.0)
    assert not held.champion and held.min_improvement == 5.0 and held.bpb_left_out == 0
    assert held.champion_version == "3" and held.bpb_segments > 100
    assert str(client.get_model_version_by_alias(name, "champion").version) == "3"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "4"

    with pytest.raises(GptpipeError, match="min_improvement must be a number of bits per byte"):
        _register(tmp_path, tracker, one, model, "e", min_improvement=-0.1)
