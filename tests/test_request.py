"""The run request (flows/request.py): one typed spec, one check, settings named as written."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from flows.request import (
    COMMAND_LINE,
    DEPLOYMENT,
    FLAGS,
    RunRequest,
    SweepRequest,
)
from model.corpus import DEFAULT_SHARD_BYTES
from storage.errors import GptpipeError

TINY = ["max_iters=20", "eval_interval=10", "eval_iters=2"]


def request(**sections) -> RunRequest:
    sections.setdefault("training", {"preset": "seed", "overrides": TINY})
    return RunRequest.of(**sections)


def error_of(fn) -> str:
    with pytest.raises(GptpipeError) as caught:
        fn()
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "sections, flag, path",
    [
        ({"compute": {"nproc": 0}}, "--nproc", "compute.nproc"),
        ({"compute": {"workers": 0, "task_runner": "dask"}}, "--workers", "compute.workers"),
        ({"data": {"refresh": ["everything"]}}, "--refresh", "data.refresh"),
        ({"data": {"val_shards": -1}}, "--val-shards", "data.val_shards"),
        ({"data": {"shard_size": "12Q"}}, "--shard-size", "data.shard_size"),
        ({"alerts": {"timeout_seconds": -5}}, "--timeout", "alerts.timeout_seconds"),
        (
            {"alerts": {"train_timeout_seconds": "soon"}},
            "--train-timeout",
            "alerts.train_timeout_seconds",
        ),
        ({"sampling": {"sample_tokens": -1}}, "--sample-tokens", "sampling.sample_tokens"),
        ({"training": {"preset": "huge"}}, None, None),
        ({"training": {"overrides": ["max_iters"]}}, "--set", "training.overrides"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it_as_the_user_wrote_it(sections, flag, path):
    cli = error_of(lambda: request(**sections).check_settings(COMMAND_LINE))
    deployed = error_of(lambda: request(**sections).check_settings(DEPLOYMENT))
    if flag is None:  # a message that names no setting reads the same in both
        assert cli == deployed
        return
    assert flag in cli and path not in cli, cli
    assert path in deployed and flag not in deployed, deployed
    assert deployed == cli.replace(flag, path)


def test_a_value_of_the_wrong_type_or_an_unknown_field_is_one_line():
    wrong = error_of(lambda: RunRequest.of(DEPLOYMENT, compute={"nproc": [2]}))
    assert wrong.startswith("compute.nproc:"), wrong
    assert error_of(lambda: RunRequest.of(COMMAND_LINE, compute={"nproc": [2]})).startswith(
        "--nproc:"
    )
    unknown = error_of(lambda: RunRequest.of(DEPLOYMENT, compute={"nprocs": 2}))
    assert unknown.startswith("compute.nprocs: not a setting gptpipe knows"), unknown
    flat = error_of(lambda: RunRequest.of(DEPLOYMENT, nproc=2))  # an old, flat parameter
    assert flat.startswith("nproc: not a setting gptpipe knows"), flat


def test_every_setting_has_its_flag_and_every_flag_is_the_parsers():
    from flows.cli import build_parser

    fields = {
        f"{section}.{name}"
        for section, model in RunRequest.model_fields.items()
        if section != "run_id"
        for name in model.annotation.model_fields
    } | {"run_id"}
    search = {
        f"search.{name}" for name in SweepRequest.model_fields["search"].annotation.model_fields
    }
    assert fields | (search - {"search.space_file"}) == set(FLAGS)
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    options = {
        o for cmd in ("run", "sweep") for a in commands[cmd]._actions for o in a.option_strings
    }
    missing = {flag for flag in FLAGS.values() if flag not in options}
    assert not missing, f"flags of the request the command line lacks: {missing}"


def test_the_deployment_defaults_hold_when_a_section_is_left_out():
    """Prefect replaces a deployment's parameters section by section: a section left out (or
    replaced in part) falls back to the request's defaults, which are the nightly's own."""
    plain = RunRequest()
    assert plain.compute.nproc == "auto" and plain.compute.train_engine == "torchrun"
    assert (plain.alerts.timeout_seconds, plain.alerts.train_timeout_seconds) == (
        6 * 3600,
        5 * 3600,
    )


def test_settings_checks_touch_nothing_and_take_no_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    settled = request(data={"source": "corpus.txt", "shard_size": "1M"}).check_settings()
    assert time.monotonic() - start < 5
    assert settled.store == str(tmp_path / "gptpipe-store") and settled.shard_bytes == 2**20
    assert settled.nproc == 1 and settled.config.max_iters == 20
    assert list(tmp_path.iterdir()) == []  # no store, no database, no input read


def test_the_whole_check_reports_the_input_first_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "missing.txt"
    cli = error_of(lambda: request(data={"source": str(missing)}).check())
    assert cli == f"input file not found: {missing}; pass --input PATH to a text file"
    deployed = error_of(lambda: request(data={"source": str(missing)}).check(DEPLOYMENT))
    assert deployed.endswith("pass data.source PATH to a text file")
    assert list(tmp_path.iterdir()) == []


def test_val_shards_are_checked_against_the_planned_shards_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("First Citizen:\nspeak, speak.\n\n" * 400)  # 12,400 bytes
    two = {"source": str(corpus), "shard_size": 8192}  # two shards
    message = error_of(lambda: request(data={**two, "val_shards": 2}).check(DEPLOYMENT))
    assert message.startswith("data.val_shards 2: the dataset has 2 shard(s)"), message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]


def test_a_checked_request_is_a_plan_the_pipeline_takes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world\n" * 100)
    tracking = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "e"}
    checked = request(
        data={"source": str(corpus), "store": "out", "refresh": ["all"]},
        compute={"nproc": "1"},
        tracking=tracking,
        alerts={"timeout_seconds": None, "train_timeout_seconds": "60"},
        run_id="r1",
    ).check()
    plan = checked.plan
    assert (plan.store, plan.run_id, plan.nproc) == (str(tmp_path / "out"), "r1", 1)
    assert plan.refresh == ["split", "tokenize", "train"] and plan.train_timeout_seconds == 60
    assert plan.model_name == "gptpipe-corpus-char" and checked.timeout_seconds is None
    assert plan.config["max_iters"] == 20 and plan.shard_bytes == DEFAULT_SHARD_BYTES
    # a plan survives Prefect's round trip of parameters (JSON, then validation)
    assert type(plan).model_validate_json(plan.model_dump_json()) == plan


def test_a_sweep_request_checks_its_search_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = {"params": {"n_layer": [1, 2]}}
    bad = SweepRequest.of(
        DEPLOYMENT, search={"space": space, "parallel": 0}, training={"preset": "seed"}
    )
    assert error_of(lambda: bad.check_settings(DEPLOYMENT)) == (
        "search.parallel must be at least 1, got 0"
    )
    wrong_space = SweepRequest.of(
        search={"space": {"params": {"n_layr": [1]}}, "space_file": "s.yaml"}
    )
    assert error_of(wrong_space.check_settings).startswith("--space s.yaml")
    assert not list(Path(tmp_path).iterdir())


def test_what_a_warm_start_begins_from_is_checked_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world\n" * 100)
    tracking = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}

    def check(init_from: str, naming=COMMAND_LINE):
        return request(
            data={"source": str(corpus), "store": "out"},
            training={"preset": "seed", "init_from": init_from},
            tracking=tracking,
        ).check(naming)

    missing = error_of(lambda: check("nowhere/ckpt.pt"))
    assert missing.startswith("--init-from nowhere/ckpt.pt: no such checkpoint"), missing
    deployed = error_of(lambda: check("nowhere/ckpt.pt", DEPLOYMENT))
    assert deployed.startswith("training.init_from nowhere/ckpt.pt: no such checkpoint")
    assert "has no version 7" in error_of(lambda: check("models:/gptpipe-corpus-char/7"))
    assert "not a model version" in error_of(lambda: check("models:/just-a-name"))
    out = tmp_path / "out"  # the store: checked writable, nothing left in it
    assert not out.exists() or not list(out.iterdir())
    assert check("champion").plan.init_from == "champion"  # none yet: a cold start, said so
    bad = {"data": {"source": str(corpus)}, "training": {"init_from": "champion"}}
    ray = error_of(lambda: request(**bad, compute={"train_engine": "ray"}).check_settings())
    assert ray.startswith("--init-from trains with --train-engine torchrun only"), ray
    gate = error_of(lambda: request(tracking={"min_improvement": -1}).check_settings(DEPLOYMENT))
    assert gate.startswith("tracking.min_improvement must be"), gate
