"""Warm starts: a training begins from another training's weights (rows of new characters fresh,
as a fresh model's are), on one rank or two gloo ranks alike, records what it began from, resumes
from its own checkpoint, and refuses a checkpoint it cannot start from with one line."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from bench.common import train_cli
from model.checkpoint import InitFrom, check_warm_start, load_checkpoint, load_init_checkpoint
from model.config import config_from_dict
from model.gpt import GPT
from model.tokenizer import CharTokenizer
from model.trainer import TrainingState, make_optimizer
from storage.errors import GptpipeError

BASE = {
    "block_size": 32,
    "n_embd": 32,
    "n_head": 4,
    "n_layer": 2,
    "dropout": 0.0,
    "batch_size": 8,
    "max_iters": 6,
    "eval_interval": 100,
    "eval_iters": 2,
    "log_interval": 3,
    "checkpoint_interval": 0,
    "learning_rate": 3e-3,
    "device": "cpu",
    "dtype": "float32",
}
NEW_TEXT = "\nGRUMIO: Café au lait? Ça va, naïve Zoë — ½ of it, Ω!\n"


def write_dataset(folder: Path, tok: CharTokenizer, text: str) -> dict[str, str]:
    """tokenizer.json, train.parquet and val.parquet of text (as conftest's char_dataset)."""
    from model.data import split_tokens, write_tokens

    folder.mkdir(parents=True)
    (folder / "tokenizer.json").write_text(tok.to_json(), encoding="utf-8")
    train_ids, val_ids = split_tokens(tok.encode(text), 0.1, 32)
    for name, part in (("train", train_ids), ("val", val_ids)):
        buffer = io.BytesIO()
        write_tokens(part, buffer, {"vocab_size": tok.vocab_size, "n_tokens": len(part)})
        (folder / f"{name}.parquet").write_bytes(buffer.getvalue())
    return {name: str(folder / name) for name in ("tokenizer.json", "train.parquet", "val.parquet")}


@pytest.fixture(scope="module")
def nights(small_corpus, tmp_path_factory) -> dict:
    """Night 1: the corpus's first 20,000 characters; night 2: all 60,000 of them and, every
    6,000, a line with characters night 1 never saw; its vocabulary keeps night 1's ids."""
    root = tmp_path_factory.mktemp("nights")
    text = small_corpus.read_text(encoding="utf-8")
    one = text[:20_000]
    two = "".join(text[i : i + 6_000] + NEW_TEXT for i in range(0, len(text), 6_000))
    tok1 = CharTokenizer.train(one)
    tok2 = tok1.extended(two)
    assert tok2.vocab_size > tok1.vocab_size
    return {
        "tok1": tok1,
        "tok2": tok2,
        "one": write_dataset(root / "one", tok1, one),
        "two": write_dataset(root / "two", tok2, two),
        "two_fresh": write_dataset(root / "two-fresh", CharTokenizer.train(two), two),
    }


def train(data: dict[str, str], out: Path, *extra: str, nproc: int = 1, ok: bool = True, **sets):
    result = subprocess.run(
        [*train_cli(data, str(out), nproc=nproc), "--config-json", json.dumps({**BASE, **sets})]
        + list(extra),
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )
    if not ok:
        return result
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    summary["ckpt"] = load_checkpoint(str(out / "ckpt.pt"))
    summary["log"] = result.stdout
    return summary


def init_args(ckpt: Path, label: str = "night 1") -> list[str]:
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    return ["--init-from", str(ckpt), "--init-sha256", sha, "--init-label", label]


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def night1(nights, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("night1")
    train(nights["one"], out, max_iters=30)
    return out / "ckpt.pt"


# --- in process: the rows, the checks ---------------------------------------------------------


def state_for(tok: CharTokenizer, seed: int) -> TrainingState:
    cfg = config_from_dict({**BASE, "seed": seed})
    torch.manual_seed(seed)
    model = GPT(cfg.model_config(tok.vocab_size))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return TrainingState(cfg, model, make_optimizer(model, cfg), scaler, tok.to_json(), "t.json")


def test_new_token_rows_start_as_a_fresh_models_and_the_rest_is_copied(nights):
    tok1, tok2 = nights["tok1"], nights["tok2"]
    old = state_for(tok1, seed=7)
    new = state_for(tok2, seed=1337)
    fresh = {k: v.clone() for k, v in new.model.state_dict().items()}
    init = InitFrom("ckpt.pt", "0" * 64, "night 1")
    n1 = check_warm_start(old.state_dict(), init, new.model.config, tok2.to_json())
    assert n1 == tok1.vocab_size
    assert new.warm_start(old.state_dict(), init, n1) == tok2.vocab_size - tok1.vocab_size
    mine, theirs = new.model.state_dict(), old.model.state_dict()
    rows = ("token_embedding_table.weight", "lm_head.weight", "lm_head.bias")
    for name, tensor in mine.items():
        if name in rows:
            assert torch.equal(tensor[:n1], theirs[name])
            assert torch.equal(tensor[n1:], fresh[name][n1:])  # GPT._init_weights' draw
        else:
            assert torch.equal(tensor, theirs[name]), name
    assert not torch.equal(
        mine["lm_head.weight"][n1:], torch.zeros_like(fresh["lm_head.weight"][n1:])
    )
    saved = new.state_dict()
    assert saved["init_from"] == init.to_dict() and saved["step"] == 0
    assert saved["optimizer"]["state"] == {}  # the optimizer starts fresh
    assert "init_from" not in old.state_dict()  # a cold start's checkpoint is as before


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_embd": 64}, "its model has n_embd=32 where this config has n_embd 64; set n_embd=32"),
        ({"n_layer": 3, "block_size": 16}, "n_layer=2 block_size=32 where this config has"),
        ({"n_head": 2}, "set n_head=4 to start from it"),
        ({"bias": False}, "bias=True"),
    ],
)
def test_another_shape_is_one_line_that_says_what_to_set(nights, change, message):
    ckpt = state_for(nights["tok1"], 1).state_dict()
    cfg = config_from_dict({**BASE, **change})
    with pytest.raises(GptpipeError, match=message.replace("(", r"\(")) as err:
        check_warm_start(ckpt, InitFrom("x", "0" * 64, "models:/m/1"), cfg.model_config(99), "{}")
    assert "\n" not in str(err.value) and "cannot start from models:/m/1" in str(err.value)


def test_a_vocabulary_that_moved_ids_is_refused(nights):
    ckpt = state_for(nights["tok1"], 1).state_dict()
    fresh = CharTokenizer.train("".join(nights["tok2"].vocab))  # sorted again: ids moved
    cfg = config_from_dict(BASE)
    with pytest.raises(GptpipeError, match="not the start of tonight's: id .*vocab keep"):
        check_warm_start(
            ckpt, InitFrom("x", "0" * 64, "v1"), cfg.model_config(200), fresh.to_json()
        )


def test_a_checkpoint_that_changed_since_it_was_resolved_is_refused(night1, tmp_path):
    copy = tmp_path / "ckpt.pt"
    copy.write_bytes(night1.read_bytes())
    init = InitFrom(str(copy), "f" * 64, "models:/m/2")
    with pytest.raises(GptpipeError, match=r"\(models:/m/2\) changed: .*resolve it again"):
        load_init_checkpoint(init)
    with pytest.raises(GptpipeError, match="is gone"):
        load_init_checkpoint(InitFrom(str(tmp_path / "none.pt"), "f" * 64, "x"))


# --- real trainings: one rank, two gloo ranks, resume ------------------------------------------


@pytest.mark.slow
def test_two_gloo_ranks_warm_start_as_one_rank_does(nights, night1, tmp_path):
    args = init_args(night1)
    two = train(nights["two"], tmp_path / "two", *args, nproc=2, batch_size=4)
    one = train(nights["two"], tmp_path / "one", *args, nproc=1, batch_size=8)
    cold = train(nights["two"], tmp_path / "cold", nproc=1, batch_size=8)
    assert two["world_size"] == 2
    assert max_abs_diff(two["ckpt"]["model"], one["ckpt"]["model"]) < 1e-5
    assert max_abs_diff(cold["ckpt"]["model"], one["ckpt"]["model"]) > 1e-2
    added = nights["tok2"].vocab_size - nights["tok1"].vocab_size
    assert "warm start from night 1 (its step 30, sha256 " in one["log"]
    assert f"{added} new token row(s) initialised fresh" in two["log"]
    # it starts where night 1 got to, not from a fresh model's loss (about ln(vocab))
    assert one["history"][0]["val_loss"] < cold["history"][0]["val_loss"] - 0.3
    expected = {"uri": args[1], "sha256": args[3], "label": "night 1"}
    assert one["init_from"] == two["init_from"] == expected  # the summary
    assert one["ckpt"]["init_from"] == expected and "init_from" not in cold["ckpt"]
    assert one["ckpt"]["step"] == 6  # the configured steps, counted from 0
    assert "init_from" not in cold


@pytest.mark.slow
def test_a_resumed_warm_start_continues_its_own_checkpoint(nights, night1, tmp_path):
    args = init_args(night1)
    whole = train(nights["two"], tmp_path / "whole", *args)
    out = tmp_path / "stopped"
    train(nights["two"], out, *args, max_iters=3)  # stops at step 3, as if interrupted
    resumed = train(nights["two"], out, *args, "--resume")
    assert "resumed from step 3" in resumed["log"] and "warm start" not in resumed["log"]
    assert max_abs_diff(whole["ckpt"]["model"], resumed["ckpt"]["model"]) < 1e-6
    assert resumed["ckpt"]["init_from"] == whole["ckpt"]["init_from"]


@pytest.mark.slow
def test_a_bad_start_is_one_error_line(nights, night1, tmp_path):
    result = train(nights["two_fresh"], tmp_path / "fresh", *init_args(night1), ok=False)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot start from night 1: its vocabulary is not" in errors[0]
    result = train(nights["two"], tmp_path / "wide", *init_args(night1), ok=False, n_embd=64)
    assert result.returncode == 2 and "set n_embd=32 to start from it" in result.stderr


# --- the task layer: resolving init_from against a real MLflow registry, the train stage -------

MODEL = "warm-start-test"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A sqlite MLflow of its own (artifacts in a temporary folder), its store, no versions."""
    from storage.tracking import Tracker
    from tasks.results import Tracking, Workspace

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker(uri, "warm-start")
    tracker.client.create_experiment("warm-start", artifact_location=str(root / "artifacts"))
    run_id = tracker.start_run("pipeline")
    return {
        "tracker": tracker,
        "run_id": run_id,
        "workspace": Workspace(str(root / "store"), Tracking(uri, "warm-start", run_id)),
    }


def register_checkpoint(registry, ckpt: Path, alias: str | None = None) -> str:
    from tasks.registry import CHECKPOINT_TAG, log_model, register

    tracker = registry["tracker"]
    run_id = tracker.start_run("train")
    model_uri = log_model(tracker, run_id, ckpt, step=int(load_checkpoint(str(ckpt))["step"]))
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    version = register(tracker, MODEL, model_uri, tags={CHECKPOINT_TAG: sha})
    if alias:
        tracker.client.set_registered_model_alias(MODEL, alias, version)
    return version


@pytest.mark.slow
def test_resolve_warm_start(registry, nights, night1, tmp_path):
    import storage
    from tasks.warm_start import resolve_warm_start

    ws = registry["workspace"]
    said: list[str] = []

    def resolve(init_from, vocab="keep", **kw):
        return resolve_warm_start(
            ws, MODEL, init_from=init_from, vocab=vocab, log=said.append, **kw
        )

    # no champion yet: a cold start, said so, not an error
    for init_from, vocab in (("champion", "keep"), (None, "keep"), (None, "fresh")):
        cold = resolve(init_from, vocab)
        assert cold.init_from is None and cold.base_tokenizer is None, (init_from, vocab)
    assert any("has no champion yet: a cold start" in line for line in said)

    version = register_checkpoint(registry, night1, alias="champion")
    sha = hashlib.sha256(night1.read_bytes()).hexdigest()
    champion = resolve("champion")
    assert champion.init_from.label == f"models:/{MODEL}/{version}"
    assert champion.init_from.sha256 == sha
    assert champion.init_from.uri.startswith(ws.store)  # in the store, for every rank
    assert storage.get_bytes(champion.init_from.uri) == night1.read_bytes()
    base = storage.get_bytes(champion.base_tokenizer.uri).decode()
    assert json.loads(base)["vocab"] == nights["tok1"].vocab
    assert resolve(f"models:/{MODEL}/{version}") == champion  # the same, named by version
    assert resolve(f"models:/{MODEL}@champion").init_from == champion.init_from
    assert resolve("champion", "fresh").base_tokenizer is None
    kept = resolve(None)  # a cold start that keeps the champion's vocabulary
    assert kept.init_from is None and kept.base_tokenizer == champion.base_tokenizer
    assert resolve(None, tokenizer="bpe").base_tokenizer is None  # not a bpe run's base

    by_path = resolve(str(night1))
    assert by_path.init_from.uri == by_path.init_from.label == str(night1)
    assert by_path.init_from.sha256 == sha and by_path.base_tokenizer == champion.base_tokenizer

    bad = {
        f"models:/{MODEL}/99": f"model {MODEL} has no version 99",
        f"models:/{MODEL}@nightly": "has no version @nightly",
        "models:/nope": "not a model version",
        str(tmp_path / "missing.pt"): "no such checkpoint file",
    }
    for init_from, message in bad.items():
        with pytest.raises(GptpipeError, match=message) as err:
            resolve(init_from)
        assert "\n" not in str(err.value)
    with pytest.raises(GptpipeError, match="vocab must be one of keep, fresh"):
        resolve("champion", "grow")
    with pytest.raises(GptpipeError, match="char tokenizer and this run's is bpe"):
        resolve("champion", tokenizer="bpe")


@pytest.mark.slow
def test_the_train_stage_warm_starts_and_keys_on_it(
    registry, nights, night1, prefect_server, tmp_path
):
    """tokenize (the champion's vocabulary kept) -> split -> train from the champion, in a real
    Prefect flow: the stage records what it started from, and keys on it."""
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.cache import cache_key
    from tasks.split import split
    from tasks.tokenize import tokenize
    from tasks.train import train as train_stage
    from tasks.warm_start import resolve_warm_start

    tok2 = nights["tok2"]
    ws = registry["workspace"]
    if not registry["tracker"].client.search_model_versions(f"name = '{MODEL}'"):
        register_checkpoint(registry, night1, alias="champion")
    config = config_from_dict({**BASE, "max_iters": 4}).to_dict()

    @flow(name="warm-start-test")
    def night(source: str, init: str | None):
        warm = resolve_warm_start(ws, MODEL, init_from=init, vocab="keep", tokenizer="char")
        tokens = tokenize(source, ws, base_tokenizer=warm.base_tokenizer)
        splits = split(tokens.tokens, ws, val_fraction=0.1, block_size=32)
        result = train_stage(
            config, splits, workspace=ws, tokenizer=tokens.tokenizer, init_from=warm.init_from
        )
        return warm, tokens, splits, result

    source = tmp_path / "night2.txt"
    from model.dataset import open_dataset

    source.write_text(tok2.decode(open_dataset(nights["two"]["train.parquet"]).ids()), "utf-8")
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        warm, tokens, splits, result = night(str(source), "champion")
        _, _, _, cold = night(str(source), None)
    assert tokens.metadata["base_vocab_size"] == nights["tok1"].vocab_size
    assert result.to_dict()["init_from"] == warm.init_from.to_dict()
    assert result.summary["init_from"]["label"] == f"models:/{MODEL}/1"
    assert "init_from" not in cold.to_dict()
    key = cache_key(
        "train",
        train=splits.train.sha256,
        val=splits.val.sha256,
        tokenizer=tokens.tokenizer.sha256,
        config=config,
        nproc=1,
    )
    assert f"train-{key}" in cold.checkpoint.uri  # no init_from: the key as before
    assert f"train-{key}" not in result.checkpoint.uri
    run = registry["tracker"].client.get_run(result.mlflow_run_id)
    assert run.data.tags["init_from"] == f"models:/{MODEL}/1"
    assert run.data.params["init_from_sha256"] == warm.init_from.sha256
    assert load_checkpoint(result.checkpoint.uri)["init_from"]["sha256"] == warm.init_from.sha256
