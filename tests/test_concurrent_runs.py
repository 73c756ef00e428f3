"""Runs that overlap, for real: several `gptpipe run` processes started together on one store and
one (new) sqlite MLflow database, on a local folder and on moto's S3 server. One of them trains;
the others wait on its lease and re-use its result; one model version is registered. A lease
holder killed with SIGKILL is taken over, and the run that takes over resumes from the last
checkpoint and ends with the losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import storage
from tests.conftest import run_cli, seed_preset

pytestmark = pytest.mark.slow

# long enough (seconds of training) that runs started together overlap in every stage
SETTINGS = dict(
    max_iters=600,
    eval_interval=300,
    eval_iters=4,
    batch_size=8,
    log_interval=100,
    checkpoint_interval=100,
    dtype="float32",  # the same arithmetic in every run, whatever the machine's probe says
)
AWS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def gptpipe(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("gptpipe")), *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_args(corpus: Path, store: str, run_id: str) -> list[str]:
    args = ["run", "--input", str(corpus), "--store", store, "--run-id", run_id]
    return [*args, "--sample-tokens", "20", *seed_preset(**SETTINGS)]


def summary_of(store: str, run_id: str) -> dict:
    return json.loads(storage.get_bytes(storage.join(store, "runs", run_id, "summary.json")))


def same_result(summary: dict) -> dict:
    """What every run of the same data and settings must agree on."""
    return {
        "losses": (summary["train_loss"], summary["val_loss"]),
        "outputs": {k: v for k, v in summary["outputs"].items() if k != "samples"},
        "model": (summary["model"]["name"], summary["model"]["version"]),
        "n_params": summary["n_params"],
    }


def model_versions(tracking_uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    return [
        v
        for m in client.search_registered_models()
        for v in client.search_model_versions(f"name='{m.name}'")
    ]


def run_together(n: int, corpus: Path, store: str, env: dict, cwd: Path) -> list[tuple]:
    procs = [
        (f"together-{i}", gptpipe(run_args(corpus, store, f"together-{i}"), env, cwd))
        for i in range(n)
    ]
    results = []
    for run_id, proc in procs:
        out, _ = proc.communicate(timeout=600)
        results.append((run_id, proc.returncode, out))
    return results


def check_one_trained(results: list[tuple], store: str, tracking_uri: str) -> None:
    for run_id, code, out in results:
        assert code == 0, f"{run_id} exited {code}:\n{out[-3000:]}"
        assert "Traceback" not in out, out
    summaries = [summary_of(store, run_id) for run_id, _, _ in results]
    trained = [s["run_id"] for s in summaries if not s["cached"]["train"]]
    assert len(trained) == 1, [s["cached"] for s in summaries]  # one trained, the others re-used
    assert sum(not s["cached"]["tokenize"] for s in summaries) == 1
    first = same_result(summaries[0])
    assert all(same_result(s) == first for s in summaries[1:])
    assert len(model_versions(tracking_uri)) == 1
    waited = [out for _, _, out in results if "waiting for gptpipe run together-" in out]
    assert waited, "no run waited on another's lease: the runs did not overlap"
    assert all("its result will be re-used" in out for out in waited)


def test_two_runs_together_on_a_local_store_and_a_new_sqlite_database(
    cli_env, small_corpus, tmp_path
):
    """Also the first night: the sqlite database does not exist yet, and both runs create it."""
    tracking_uri = cli_env["MLFLOW_TRACKING_URI"]
    assert not Path(tracking_uri.removeprefix("sqlite:///")).exists()
    store = str(tmp_path / "store")
    results = run_together(2, small_corpus, store, cli_env, tmp_path)
    check_one_trained(results, store, tracking_uri)
    assert not [u for u in storage.list_uris(store) if u.endswith(".tmp")]


def test_three_runs_together_on_s3(cli_env, s3_env, small_corpus, tmp_path):
    env = {**cli_env, **{name: os.environ[name] for name in AWS}}
    store = storage.join(s3_env.uri, "team")
    results = run_together(3, small_corpus, store, env, tmp_path)
    check_one_trained(results, store, cli_env["MLFLOW_TRACKING_URI"])


def test_a_killed_lease_holder_is_taken_over_and_the_losses_are_an_uninterrupted_runs(
    cli_env, small_corpus, tmp_path
):
    store = str(tmp_path / "store")
    killed = gptpipe(run_args(small_corpus, store, "killed"), cli_env, tmp_path)
    seen = []
    for line in killed.stdout:  # until the training has written a checkpoint
        seen.append(line)
        if "checkpoint at step 200" in line:
            break
    else:
        pytest.fail("the run ended before its checkpoint at step 200:\n" + "".join(seen))
    killed.send_signal(signal.SIGKILL)  # the holder only: its training dies with it
    killed.wait(10)
    killed.stdout.close()
    time.sleep(1)

    taker = run_cli(run_args(small_corpus, store, "taker"), cli_env, tmp_path, timeout=600)
    out = taker.stdout + taker.stderr
    assert taker.returncode == 0, out[-3000:]
    assert "took over from gptpipe run killed" in out and "its process is gone" in out
    assert "resumed from step" in out  # from the killed run's checkpoint, not from scratch

    alone = str(tmp_path / "alone")
    uninterrupted = run_cli(run_args(small_corpus, alone, "alone"), cli_env, tmp_path, timeout=600)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    resumed, whole = summary_of(store, "taker"), summary_of(alone, "alone")
    assert not resumed["cached"]["train"]
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], abs=1e-4)
    assert resumed["val_loss"] == pytest.approx(whole["val_loss"], abs=1e-4)


def test_a_sweep_waits_for_the_one_holding_its_study_and_gives_up_in_one_line(
    cli_env, small_corpus, tmp_path
):
    """One process per study: a second sweep of the same name waits for the first (here a live
    holder in this process), saying for whom, and gives up after its bound with one line."""
    from storage.lease import Lease
    from tests.test_sweep import TINY, write_space

    store = tmp_path / "store"
    space = write_space(tmp_path, {"trials": 1, "params": {"learning_rate": [1e-3]}})
    holder = Lease(
        storage.join(str(store), "leases", "sweep-nightly-lr"),
        owner="the first sweep",
        what="sweep nightly-lr",
        heartbeat_s=0.5,
    ).acquire()
    try:
        args = ["sweep", "--input", str(small_corpus), "--space", str(space)]
        args += ["--store", str(store), "--name", "nightly-lr", *TINY]
        start = time.monotonic()
        done = run_cli(args, {**cli_env, "GPTPIPE_LEASE_WAIT_S": "5"}, tmp_path)
    finally:
        holder.release()
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-3000:]
    assert "waiting for the first sweep" in out
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sweep nightly-lr is still held by the first sweep" in errors[0]
    assert "Traceback" not in out
    assert not (store / "sweeps" / "nightly-lr").exists()  # the study was not touched
    assert time.monotonic() - start < 120
