from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import get_run_logger, task

import storage
from model.config import config_from_dict
from model.launch import launch_training
from storage.tracking import RUN_ID_ENV
from tasks.common import describe, stage_run, tracker_for


@task(name="train")
def train(
    config: dict,
    train_uri: str,
    val_uri: str,
    tokenizer_uri: str,
    run_uri: str,
    nproc: int = 1,
    resume: bool = False,
    tracking: dict | None = None,
) -> dict:
    """Train on nproc ranks (rank 0 logs to MLflow), then log the weights as an MLflow model."""
    logger = get_run_logger()
    out_uri = storage.join(run_uri, "train")
    with stage_run(tracking, "train") as run:
        extra_env = {}
        if run.run_id:
            extra_env = {RUN_ID_ENV: run.run_id, "MLFLOW_TRACKING_URI": tracking["uri"]}
        summary = launch_training(
            config_from_dict(config),
            train_uri,
            val_uri,
            tokenizer_uri,
            out_uri,
            nproc=nproc,
            resume=resume,
            on_line=logger.info,
            extra_env=extra_env,
        )
        checkpoint = describe(summary["checkpoint"])
        run.record_io(
            {
                "train": describe(train_uri),
                "val": describe(val_uri),
                "tokenizer": describe(tokenizer_uri),
            },
            {"checkpoint": checkpoint},
        )
        model_uri = None
        tracker = tracker_for(tracking)
        if tracker is not None:
            from storage.registry import log_model

            with tempfile.TemporaryDirectory() as tmp:
                local = storage.get_file(summary["checkpoint"], Path(tmp) / "ckpt.pt")
                model_uri = log_model(tracker, run.run_id, local)
            logger.info("logged the model to MLflow as %s", model_uri)
    return {**summary, "outputs": {"checkpoint": checkpoint}, "model_uri": model_uri,
            "mlflow_run_id": run.run_id}  # fmt: skip
