"""Faults caused for real: the MLflow server goes away in the middle of a training."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from mlflow.tracking import MlflowClient

from bench.common import train_cli
from model.launch import RUN_ID_ENV, Listeners
from storage.tracking import Tracker
from tests.conftest import launch_on
from tests.fixtures_s3 import FaultyProxy

CONFIG = {
    "block_size": 16,
    "n_embd": 32,
    "n_head": 4,
    "n_layer": 2,
    "dropout": 0.0,
    "batch_size": 8,
    "max_iters": 400,
    "eval_interval": 100,
    "eval_iters": 2,
    "log_interval": 50,
    "checkpoint_interval": 0,
    "device": "cpu",
}


@pytest.mark.slow
def test_training_goes_on_while_mlflow_is_away(mlflow_server, char_dataset, tmp_path):
    tracker = Tracker(mlflow_server, "faults")
    run_id = tracker.start_run("train")
    out = tmp_path / "out"
    with FaultyProxy(mlflow_server) as proxy:
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            RUN_ID_ENV: run_id,
            "MLFLOW_TRACKING_URI": proxy.url,
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
        }
        proc = subprocess.Popen(
            [
                *train_cli(char_dataset, str(out)),
                "--config-json",
                json.dumps(CONFIG),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for line in proc.stdout:
            if line.startswith("step 0:"):
                proxy.inject("drop", times=float("inf"))  # the server goes away
            if line.startswith("step 200:"):
                proxy.inject("drop", times=0)  # and comes back
        stderr = proc.stderr.read()
        assert proc.wait(timeout=120) == 0, stderr[-3000:]
        assert proxy.failed, "the outage must have hit some requests"

    assert "warning: MLflow" in stderr and "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [h["step"] for h in summary["history"]] == [0, 100, 200, 300, 400]

    # what failed during the outage was sent again once the server was back
    history = MlflowClient(mlflow_server).get_metric_history(run_id, "val_loss")
    assert sorted({m.step for m in history}) == [0, 100, 200, 300, 400]
    assert "sent at the end of training" in stderr


@pytest.mark.slow
def test_forwarded_tracking_goes_on_while_mlflow_is_away(
    mlflow_server, char_dataset, tmp_path, monkeypatch, capfd
):
    """The pipeline's way: rank 0 prints its calls, the launching process sends them (from a
    thread), so an outage never holds up the training's output or the training itself.

    With the launcher's own MLflow client settings (storage.tracking.MLFLOW_CLIENT_DEFAULTS):
    a call fails only once its retries are spent, about 15 s into an outage, so the server
    stays away until one metric batch has failed (the test takes about that much longer)."""
    from storage.tracking import MLFLOW_CLIENT_DEFAULTS

    for name in MLFLOW_CLIENT_DEFAULTS:
        monkeypatch.delenv(name, raising=False)  # the defaults are what is tested
    tracker = Tracker(mlflow_server, "faults")
    run_id = tracker.start_run("train")
    lines: list[str] = []
    stderr: list[str] = []

    def metrics_failed() -> bool:
        stderr.append(capfd.readouterr().err)
        return "warning: MLflow log_metrics failed" in "".join(stderr)

    with FaultyProxy(mlflow_server) as proxy:

        def on_line(line: str) -> None:
            lines.append(line)
            if line.startswith("step 100:"):
                proxy.inject("drop", times=float("inf"))  # the server goes away
            if line.startswith("done:"):
                _wait_for(metrics_failed, timeout=90)
                proxy.inject("drop", times=0)  # and comes back

        start = time.monotonic()
        summary = launch_on(
            char_dataset,
            tmp_path / "out",
            CONFIG,
            listeners=Listeners(on_line=on_line, mlflow_run=(proxy.url, run_id)),
        )
        seconds = time.monotonic() - start
        assert proxy.failed, "the outage must have hit some requests"
    assert [h["step"] for h in summary["history"]] == [0, 100, 200, 300, 400]
    assert not [line for line in lines if line.startswith("gptpipe.mlflow ")]  # all taken
    stderr.append(capfd.readouterr().err)
    assert "sent at the end of training" in "".join(stderr)
    assert seconds < 120, "a call gave up later than the launcher's settings say"

    history = MlflowClient(mlflow_server).get_metric_history(run_id, "val_loss")
    assert sorted({m.step for m in history}) == [0, 100, 200, 300, 400]


def _wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(0.2)


@pytest.mark.slow
def test_store_away_at_the_end_keeps_the_checkpoint_and_resume_finishes(
    s3_env, char_dataset, tmp_path
):
    """Checkpoint uploads fail while S3 is away: a clear error, the local copy kept, and
    `--resume` continues from it once the store is back."""
    out = f"s3://{s3_env.bucket}/train-out"
    config = {**CONFIG, "max_iters": 200, "checkpoint_interval": 100}
    with FaultyProxy(s3_env.endpoint) as proxy:
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL": proxy.url,
            "GPTPIPE_CACHE_DIR": str(tmp_path),
            "PYTHONUNBUFFERED": "1",
        }
        cmd = [
            *train_cli(char_dataset, out),
            "--config-json",
            json.dumps(config),
        ]
        proxy.inject("drop", times=float("inf"), match=lambda request: "ckpt.pt" in request)
        away = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert away.returncode == 2, away.stdout + away.stderr
        errors = [line for line in away.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "--resume" in errors[0] and str(tmp_path) in errors[0]
        assert "Traceback" not in away.stderr
        assert not _exists(s3_env, "train-out/ckpt.pt"), "no partial object under the final key"

        proxy.inject("drop", times=0)  # the store is back
        back = subprocess.run(
            [*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300
        )
        assert back.returncode == 0, back.stdout + back.stderr
        assert "resumed from step 200" in back.stdout
    assert _exists(s3_env, "train-out/ckpt.pt") and _exists(s3_env, "train-out/summary.json")


def _exists(s3_env, key: str) -> bool:
    import boto3

    listing = boto3.client("s3", endpoint_url=s3_env.endpoint).list_objects_v2(
        Bucket=s3_env.bucket, Prefix=key
    )
    return any(o["Key"] == key for o in listing.get("Contents", []))


@pytest.fixture()
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs: room for the data, none for a checkpoint (needs root to mount)."""
    mount = tmp_path / "tiny-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()}): needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_full_disk_is_a_clear_error_and_leaves_no_half_file(
    tiny_disk, small_corpus, cli_env, tmp_path
):
    from tests.conftest import run_cli

    result = run_cli(
        [
            "run",
            "--input",
            str(small_corpus),
            "--preset",
            "seed",
            "--store",
            str(tiny_disk),
            "--set",
            "max_iters=20",
            "--set",
            "eval_interval=10",
            "--set",
            "eval_iters=2",
        ],
        cli_env,
        tmp_path,
    )
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "could not write the checkpoint" in errors[0] and "MB free on that disk" in errors[0]
    assert "Traceback" not in result.stdout + result.stderr
    leftovers = [p for p in tiny_disk.rglob("*") if p.is_file()]
    assert not [p for p in leftovers if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert not [p for p in leftovers if p.name == "ckpt.pt"]
    # what was written completely is whole: the token data reads back
    from model.dataset import open_dataset

    tokens = [p for p in leftovers if p.name == "dataset.json"]
    assert tokens and len(open_dataset(str(tokens[0])).ids()) == 60_000
