from __future__ import annotations

from prefect import get_run_logger, task

import storage
from model.config import config_from_dict
from model.launch import launch_training
from tasks.common import describe, timed


@task(name="train")
def train(
    config: dict,
    train_uri: str,
    val_uri: str,
    tokenizer_uri: str,
    run_uri: str,
    nproc: int = 1,
    resume: bool = False,
) -> dict:
    """Train on nproc ranks; the ranks' output goes to this task's log."""
    logger = get_run_logger()
    out_uri = storage.join(run_uri, "train")
    with timed({}) as record:
        summary = launch_training(
            config_from_dict(config),
            train_uri,
            val_uri,
            tokenizer_uri,
            out_uri,
            nproc=nproc,
            resume=resume,
            on_line=logger.info,
        )
        record.update(summary, outputs={"checkpoint": describe(summary["checkpoint"])})
    return record
