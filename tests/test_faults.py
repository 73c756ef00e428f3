"""Faults caused for real: the MLflow server goes away in the middle of a training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from storage.tracking import RUN_ID_ENV, Tracker
from tests.fixtures_s3 import FaultyProxy

CONFIG = {
    "block_size": 16, "n_embd": 32, "n_head": 4, "n_layer": 2, "dropout": 0.0,
    "batch_size": 8, "max_iters": 400, "eval_interval": 100, "eval_iters": 2,
    "log_interval": 50, "checkpoint_interval": 0, "device": "cpu",
}  # fmt: skip


@pytest.mark.slow
def test_training_goes_on_while_mlflow_is_away(mlflow_server, char_dataset, tmp_path):
    tracker = Tracker(mlflow_server, "faults")
    run_id = tracker.start_run("train")
    out = tmp_path / "out"
    with FaultyProxy(mlflow_server) as proxy:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", RUN_ID_ENV: run_id,
               "MLFLOW_TRACKING_URI": proxy.url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, "-m", "model.train", "--train", char_dataset["train.parquet"],
             "--val", char_dataset["val.parquet"], "--tokenizer", char_dataset["tokenizer.json"],
             "--out", str(out), "--config-json", json.dumps(CONFIG)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
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
