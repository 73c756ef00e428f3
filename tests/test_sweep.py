"""Sweeps: the space file checked before any work, trials K at a time on a real task runner
(Dask), the Optuna study resumed after a kill, pruned and failed trials recorded, the best
trial registered, against the session's real Prefect server and the real CLI."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from model.config import TrainConfig
from storage.errors import GptpipeError
from tasks.space import parse_space
from tests.conftest import REPO, bash_blocks, prefect_api, run_cli, seed_preset, yaml_blocks

# a tiny model that learns something in 60 steps; evaluations every 20 steps feed the pruner
TINY = seed_preset(
    block_size=16,
    n_embd=32,
    n_head=4,
    batch_size=16,
    eval_interval=20,
    eval_iters=5,
    log_interval=20,
)


def write_space(folder: Path, space: dict) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(space), encoding="utf-8")
    return path


def sweep_args(corpus: Path, space: Path, store: Path | str) -> list[str]:
    return ["sweep", "--input", str(corpus), "--space", str(space), "--store", str(store), *TINY]


def summary_of(store: Path) -> dict:
    (path,) = store.glob("sweeps/*/summary.json")
    return json.loads(path.read_text())


def task_run_names(env: dict, flow_run_id: str) -> list[str]:
    runs = prefect_api(
        env,
        "task_runs/filter",
        {"task_runs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200},
    )
    return [r["name"].rsplit("-", 1)[0] for r in runs]


def mlflow_client(env: dict):
    from mlflow import MlflowClient

    return MlflowClient(env["MLFLOW_TRACKING_URI"])


def trial_runs(client, parent_id: str) -> dict[int, object]:
    """The sweep's nested trial runs, by trial number."""
    (experiment,) = [e for e in client.search_experiments() if e.name == "gptpipe"]
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    return {int(r.data.params["trial"]): r for r in runs if "trial" in r.data.params}


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"params": {"n_layr": [1, 2]}}, "unknown key 'n_layr'; known keys:"),
        ({"params": {"learning_rate": {"low": 1e-2, "high": 1e-4}}}, "low (0.01) must be less"),
        (
            {"sampler": "grid", "params": {"learning_rate": {"low": 1e-4, "high": 1e-2}}},
            "learning_rate is a range, and the grid sampler takes lists",
        ),
        ({"params": {"max_iters": [100, 200]}}, "max_iters is the trials' budget"),
        ({"params": {"tokenizer": ["char", "bpe"]}}, "tokenizes and splits once"),
        ({"params": {"learning_rate": [-1.0]}}, "learning_rate must be positive"),
        ({"params": {"n_layer": ["two"]}}, "n_layer='two' is not valid, expected an integer"),
        ({"params": {"n_layer": []}}, "the list is empty"),
        ({"params": {"dropout": {"low": 0.0, "high": 0.5, "log": True}}}, "needs low > 0"),
        ({"params": {"n_layer": [1]}, "sampler": "bayes"}, "sampler 'bayes': choose one of"),
        ({"params": {"n_layer": [1]}, "budget": {"steps": 5}}, "budget: give one of max_iters"),
        ({"params": {"n_layer": [1]}, "pruner": "hyperband"}, "pruner: expected median, none"),
        ({"params": {"n_layer": [1]}, "trials": 0}, "trials must be a whole number of at least 1"),
        ({"prams": {"n_layer": [1]}}, "unknown section 'prams'"),
    ],
)
def test_a_bad_space_is_one_error_naming_the_key(space, message):
    with pytest.raises(GptpipeError) as caught:
        parse_space(space, origin="--space sweep.yaml")
    assert message in str(caught.value) and str(caught.value).startswith("--space sweep.yaml")


def test_the_space_file_gives_the_grid_in_its_order_and_the_budget():
    space = parse_space(
        {
            "params": {"n_layer": [1, 2], "learning_rate": [1e-3, 3e-3]},
            "budget": {"tokens": 1000},
        }
    )
    assert space.sampler == "grid" and space.trials == 4
    assert space.grid_points()[:2] == [
        {"n_layer": 1, "learning_rate": 1e-3},
        {"n_layer": 1, "learning_rate": 3e-3},
    ]
    base = {**TrainConfig().to_dict(), "batch_size": 4, "block_size": 8, "n_head": 4}
    config = space.trial_config(base, {"n_layer": 2, "n_embd": 32})
    assert config["max_iters"] == 32 and config["n_layer"] == 2  # ceil(1000 / (4 * 8))
    ranged = parse_space({"params": {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}})
    assert ranged.sampler == "tpe" and ranged.trials == 10
    with pytest.raises(GptpipeError, match="n_embd .* must be divisible by n_head"):
        space.trial_config(
            {**base, "n_embd": 32}, {"n_head": 3}
        )  # a trial that fails, not the sweep


def test_parallel_trials_on_gpus_get_disjoint_sets(monkeypatch):
    """K trials of nproc GPUs each: their own CUDA_VISIBLE_DEVICES (the GPU count replaced,
    as this machine has none); too many is one error; none on a CPU."""
    import torch

    from flows.sweep import gpu_slots, visible_gpus

    assert gpu_slots(2, 2, ["0", "1", "2", "3"]) == ["0,1", "2,3"]
    assert gpu_slots(3, 1, []) == [None, None, None]
    with pytest.raises(GptpipeError, match="need 6 GPUs, and 4 are visible"):
        gpu_slots(3, 2, ["0", "1", "2", "3"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,7")
    assert visible_gpus("auto") == ["4", "7"] and visible_gpus("cpu") == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpus("cuda") == ["0", "1"]


def test_a_bad_space_file_fails_before_any_work(small_corpus, cli_env, tmp_path):
    space = write_space(tmp_path, {"params": {"learning_rate": {"low": 1, "high": 0.1}}})
    store = tmp_path / "store"
    result = run_cli(sweep_args(small_corpus, space, store), cli_env, tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: --space {space}: params: learning_rate: low (1.0) must be less than high (0.1)"
    ]
    assert "Traceback" not in result.stdout + result.stderr
    assert not store.exists()


@pytest.mark.slow
def test_a_grid_of_four_on_two_dask_workers(small_corpus, cli_env, tmp_path):
    """1 tokenize, 1 split, 4 trainings on 2 parallel workers; 4 nested trial runs under one
    parent; the best trial's model registered as champion; the ranked table in Prefect."""
    space = write_space(
        tmp_path,
        {
            "budget": {"max_iters": 60},
            "pruner": "none",
            "params": {"n_layer": [1, 2], "learning_rate": [1e-3, 3e-3]},
        },
    )
    store = tmp_path / "store"
    args = [*sweep_args(small_corpus, space, store), "--parallel", "2", "--task-runner", "dask"]
    result = run_cli(args, cli_env, tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = summary_of(store)
    names = task_run_names(cli_env, summary["prefect_flow_run_id"])
    # the tokenize stage (tasks/tokenize.py) plans its shards once, then maps over them
    stages = ("plan-shards", "split", "trial", "train", "evaluate", "register")
    counts = {name: names.count(name) for name in stages}
    assert counts == dict(zip(stages, (1, 1, 4, 4, 4, 1), strict=True)), names
    trials = summary["trials"]
    assert [t["state"] for t in trials] == ["complete"] * 4
    losses = [t["val_loss"] for t in trials]
    assert losses == sorted(losses) and summary["best"]["val_loss"] == losses[0]
    assert sorted(json.dumps(t["params"], sort_keys=True) for t in trials) == sorted(
        json.dumps({"learning_rate": lr, "n_layer": n}, sort_keys=True)
        for n in (1, 2)
        for lr in (1e-3, 3e-3)
    )
    # two trainings ran at a time: each with half of the cores
    assert all(t["trained"]["threads_per_rank"] == max(1, os.cpu_count() // 2) for t in trials)

    client = mlflow_client(cli_env)
    runs = trial_runs(client, summary["mlflow"]["run_id"])
    assert sorted(runs) == [0, 1, 2, 3]
    for number, run in runs.items():
        trial = next(t for t in trials if t["number"] == number)
        assert run.info.status == "FINISHED" and run.data.tags["gptpipe.trial_state"] == "complete"
        assert {"n_layer", "learning_rate"} <= set(run.data.params)
        curve = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in curve] == [0, 20, 40, 60, 60], curve  # evaluations, then final
        assert run.data.metrics["val_loss"] == pytest.approx(trial["val_loss"])
    model = summary["model"]
    assert model["champion"] and model["reason"] == "no champion yet"
    version = client.get_model_version_by_alias(model["name"], "champion")
    best_train_run = client.get_run(version.run_id)
    assert best_train_run.data.tags["mlflow.parentRunId"] == summary["best"]["mlflow_run_id"]
    parent = client.get_run(summary["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_loss"] == pytest.approx(losses[0])
    artifacts = prefect_api(
        cli_env, "artifacts/filter", {"artifacts": {"key": {"any_": ["gptpipe-sweep"]}}}
    )
    table = next(a for a in artifacts if a["flow_run_id"] == summary["prefect_flow_run_id"])
    assert table["data"].count("| complete |") == 4
    assert f"Best: trial {summary['best']['number']}" in table["data"]

    # the same sweep again: its study is finished, nothing trains, the champion is re-used
    again = run_cli(args, cli_env, tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = summary_of(store)
    assert rerun["sweep"] == summary["sweep"] and len(rerun["trials"]) == 4
    assert task_run_names(cli_env, rerun["prefect_flow_run_id"]).count("trial") == 0
    assert rerun["model"]["version"] == model["version"] and rerun["model"]["reused"]

    # another sweep that has one of these configs: that trial's training is re-used
    overlap = write_space(
        tmp_path,
        {
            "budget": {"max_iters": 60},
            "pruner": "none",
            "params": {"n_layer": [2], "learning_rate": [3e-3, 2e-3]},
        },
    )
    other = [*sweep_args(small_corpus, overlap, store), "--parallel", "2", "--name", "other"]
    result = run_cli(other, cli_env, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    swept = json.loads((store / "sweeps" / "other" / "summary.json").read_text())
    reused = {t["params"]["learning_rate"]: t["trained"]["cached"] for t in swept["trials"]}
    assert reused == {3e-3: True, 2e-3: False}


@pytest.mark.slow
def test_pruned_and_failed_trials_are_recorded_and_the_sweep_goes_on(
    small_corpus, cli_env, tmp_path
):
    """Trials in the file's order: a good one; one whose config does not fit (failed); one
    whose val loss at step 20 is worse than the good one's (pruned); one more that fails."""
    space = write_space(
        tmp_path,
        {
            "budget": {"max_iters": 60},
            "pruner": {"median": {"startup_trials": 1, "warmup_steps": 1}},
            "params": {"learning_rate": [3e-3, 1e-5], "n_head": [4, 3]},
        },
    )
    store = tmp_path / "store"
    database = f"sqlite:///{tmp_path / 'optuna.db'}"  # the study in a database, not the store
    args = [*sweep_args(small_corpus, space, store), "--study-storage", database]
    result = run_cli(args, cli_env, tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = summary_of(store)
    assert summary["study_storage"] == database and not list(store.glob("sweeps/*/*.journal"))
    states = {t["number"]: t["state"] for t in summary["trials"]}
    assert states == {0: "complete", 1: "failed", 2: "pruned", 3: "failed"}, summary["trials"]
    failed = next(t for t in summary["trials"] if t["number"] == 1)
    assert "n_embd (32) must be divisible by n_head (3)" in failed["error"]
    pruned = next(t for t in summary["trials"] if t["number"] == 2)
    assert pruned["stopped_at"] == 20 and pruned["val_loss"] is None
    assert summary["best"]["number"] == 0

    runs = trial_runs(mlflow_client(cli_env), summary["mlflow"]["run_id"])
    assert {n: r.info.status for n, r in runs.items()} == {
        0: "FINISHED",
        1: "FAILED",
        2: "KILLED",
        3: "FAILED",
    }
    assert runs[2].data.tags["gptpipe.trial_state"] == "pruned"
    assert "must be divisible" in runs[1].data.tags["gptpipe.trial_error"]
    import optuna

    study = optuna.load_study(study_name=summary["sweep"], storage=database)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "PRUNED", "FAIL"]
    assert sorted(study.trials[2].intermediate_values) == [0, 20]
    assert "pruned" in result.stdout and "(at step 20)" in result.stdout

    # Prefect: the pruned trial's train task ended in a clean state that says so, and nothing
    # about it was logged at ERROR (stopped on purpose, not failed)
    task_runs = prefect_api(
        cli_env,
        "task_runs/filter",
        {"task_runs": {"flow_run_id": {"any_": [summary["prefect_flow_run_id"]]}}, "limit": 200},
    )
    (trial,) = [r for r in task_runs if r["name"] == "trial-2"]
    (pruned_train,) = [
        r
        for r in task_runs
        if r["name"].startswith("train-")
        and trial["id"] in {p["id"] for p in r["task_inputs"].get("__parents__", [])}
    ]
    state = pruned_train["state"]
    assert (state["type"], state["name"]) == ("COMPLETED", "Pruned"), state
    assert re.fullmatch(r"pruned at step 20 \(val loss \d+\.\d{4}\)", state["message"]), state
    for run in (pruned_train, trial):
        logs = prefect_api(
            cli_env, "logs/filter", {"logs": {"task_run_id": {"any_": [run["id"]]}}, "limit": 200}
        )
        assert any("Finished in state" in log["message"] for log in logs), logs  # logs arrived
        errors = [log["message"] for log in logs if log["level"] >= logging.ERROR]
        assert errors == [], f"{run['name']} logged at ERROR: {errors}"


def test_a_study_storage_that_cannot_be_used_is_one_line(s3_env, small_corpus, cli_env, tmp_path):
    """A database that cannot be opened (its password never shown), and an s3:// store with no
    database for the study: one line each, before any work."""
    space = write_space(tmp_path, {"params": {"n_layer": [1, 2]}})
    local = tmp_path / "store"
    cases = [
        (
            sweep_args(small_corpus, space, local)
            + ["--study-storage", "postgresql://u:s3cr3t@127.0.0.1:1/optuna"],
            "--study-storage postgresql://127.0.0.1:1/optuna: its database driver is not "
            "installed (No module named 'psycopg",
        ),
        (
            sweep_args(small_corpus, space, f"s3://{s3_env.bucket}/store"),
            "pass --study-storage with a database URL the trials can reach",
        ),
    ]
    for args, message in cases:
        result = run_cli(args, cli_env, tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        (line,) = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
        assert message in line, line
        assert "s3cr3t" not in result.stderr + result.stdout and "Traceback" not in result.stderr
    assert not local.exists()


@pytest.mark.slow
def test_a_sweep_whose_every_trial_fails_is_an_error(small_corpus, cli_env, tmp_path):
    space = write_space(tmp_path, {"params": {"n_head": [3, 5]}, "budget": {"max_iters": 5}})
    store = tmp_path / "store"
    result = run_cli(sweep_args(small_corpus, space, store), cli_env, tmp_path, timeout=600)
    assert result.returncode == 2
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    assert line.startswith("error: every trial of sweep sweep-") and "must be divisible" in line
    assert "Traceback" not in result.stderr


def _finished_trials(journal: Path, name: str) -> list:
    import optuna

    if not journal.exists():
        return []
    try:
        storage = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(journal))
        )
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # the study is not created yet
        return []
    return [t for t in study.trials if t.state.name == "COMPLETE"]


@pytest.mark.slow
def test_a_killed_sweep_resumes_with_its_finished_trials_kept(small_corpus, cli_env, tmp_path):
    space = write_space(
        tmp_path,
        {
            "budget": {"max_iters": 300},
            "pruner": "none",
            "params": {"learning_rate": [1e-3, 2e-3, 3e-3]},
        },
    )
    store = tmp_path / "store"
    args = [*sweep_args(small_corpus, space, store), "--name", "resumable"]
    gptpipe = Path(sys.executable).with_name("gptpipe")
    journal = store / "sweeps" / "resumable" / "study.journal"
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        [str(gptpipe), *args],
        env=cli_env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the kill takes its trainings too
    )
    deadline = time.monotonic() + 300
    while not _finished_trials(journal, "resumable"):
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no trial finished in 300 s"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    (kept,) = _finished_trials(journal, "resumable")
    assert first.returncode == -signal.SIGKILL

    result = run_cli(args, cli_env, tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = summary_of(store)
    assert [t["state"] for t in summary["trials"]] == ["complete"] * 3
    assert sorted(t["number"] for t in summary["trials"]) == [0, 1, 2]  # no trial asked twice
    finished = _finished_trials(journal, "resumable")
    again = next(t for t in finished if t.number == kept.number)
    assert again.datetime_complete == kept.datetime_complete and again.value == kept.value
    # the resumed flow ran only the trials that had not finished
    trained = task_run_names(cli_env, summary["prefect_flow_run_id"]).count("trial")
    assert trained == 2
    # one parent run for the sweep, before and after the kill
    client = mlflow_client(cli_env)
    (experiment,) = [e for e in client.search_experiments() if e.name == "gptpipe"]
    parents = client.search_runs(
        [experiment.experiment_id],
        "tags.`gptpipe.sweep` = 'resumable' and attributes.run_name = 'resumable'",
    )
    assert [p.info.run_id for p in parents] == [summary["mlflow"]["run_id"]]
    assert sorted(trial_runs(client, summary["mlflow"]["run_id"])) == [0, 1, 2]


@pytest.mark.slow
def test_the_sweeps_page_runs_as_written(corpus_path, cli_env, tmp_path):
    """docs/sweeps.md's example: its sweep.yaml, then its command, from a project root (here a
    folder with the venv and ../shared beside it), trials two at a time on the thread pool."""
    page = REPO / "docs" / "sweeps.md"
    root = tmp_path / "project"
    root.mkdir()
    (root / ".venv").symlink_to(Path(sys.prefix))
    (tmp_path / "shared").symlink_to(corpus_path.parents[1])
    (root / "sweep.yaml").write_text(yaml_blocks(page)[0], encoding="utf-8")
    command = bash_blocks(page)[0]
    result = subprocess.run(
        ["bash", "-c", command], env=cli_env, cwd=root, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = summary_of(root / "gptpipe-store")
    assert [t["state"] for t in summary["trials"]] == ["complete"] * 4
    assert summary["parallel"] == 2 and summary["space"]["budget"] == {"max_iters": 300}
    assert f"best: trial {summary['best']['number']}" in result.stdout
    assert summary["model"]["champion"]
