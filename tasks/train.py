from __future__ import annotations

import json

from prefect import get_run_logger, task
from prefect.runtime import task_run

import storage
from model.config import config_from_dict
from model.launch import launch_training
from model.train import SUMMARY_NAME, TrainingData
from tasks.cache import cache_key, load_manifest, save_manifest, stage_dir
from tasks.common import log_split_inputs, retry_unless_user_error, stage_run, tracker_for
from tasks.results import Artifact, SplitResult, Tracking, TrainResult, Workspace, artifact_dicts


@task(name="train", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error)
def train(
    config: dict,
    splits: SplitResult,
    *,
    workspace: Workspace,
    tokenizer: Artifact,
    nproc: int = 1,
    resume: bool = False,
) -> TrainResult:
    """Train on nproc ranks (rank 0 logs to MLflow), then log the weights as an MLflow model.

    Keyed on the split data, the tokenizer, the config, nproc and the training code: the same
    inputs re-use a finished training. A retry of this task, or `--resume`, continues from the
    folder's last checkpoint instead of starting again.
    """
    logger = get_run_logger()
    key = cache_key(
        "train",
        train=splits.train.sha256,
        val=splits.val.sha256,
        tokenizer=tokenizer.sha256,
        config=config,
        nproc=nproc,
    )
    folder = stage_dir(workspace.store, "train", key)
    resume = resume or task_run.run_count > 1
    tracking = workspace.tracking
    with stage_run(tracking, "train") as run:
        # the model learns from train; the loss curve and the best checkpoint come from val
        log_split_inputs(run, splits, {"train": "training", "val": "evaluation"})
        manifest = None if workspace.refreshes("train") else load_manifest(folder)
        cached = manifest is not None
        if cached:
            summary = json.loads(storage.get_bytes(storage.join(folder, SUMMARY_NAME)))
            logger.info("train: re-using %s (cached: same data, config and code)", folder)
            reused = {"n_params": summary["n_params"], "world_size": summary["world_size"]}
            run.log_params({"cached": True, "cache_key": key, **reused})
        else:
            with run.system_metrics():
                summary = launch_training(
                    config_from_dict(config),
                    folder,
                    inputs=TrainingData(splits.train.uri, splits.val.uri, tokenizer.uri),
                    nproc=nproc,
                    resume=resume,
                    on_line=logger.info,
                    mlflow_run=(tracking.uri, run.run_id) if run.run_id else None,
                )
            run.log_params({"cached": False, "cache_key": key})
        checkpoint = Artifact.of(summary["checkpoint"])
        if not cached:
            manifest = {"checkpoint": checkpoint.to_dict(), "config": config, "nproc": nproc}
            save_manifest(folder, manifest)
        inputs = {"train": splits.train, "val": splits.val, "tokenizer": tokenizer}
        run.record_io(artifact_dicts(inputs), {"checkpoint": checkpoint.to_dict()})
        # a re-used training's model is already logged (the register stage finds its version)
        model_uri = (
            None if cached else _log_model(tracking, run.run_id, checkpoint.uri, summary["step"])
        )
        if model_uri:
            logger.info("logged the model to MLflow as %s", model_uri)
    return TrainResult(
        checkpoint=checkpoint,
        step=summary["step"],
        n_params=summary["n_params"],
        world_size=summary["world_size"],
        cached=cached,
        model_uri=model_uri,
        mlflow_run_id=run.run_id,
        summary=summary,
    )


def _log_model(
    tracking: Tracking | None, run_id: str | None, checkpoint_uri: str, step: int
) -> str | None:
    tracker = tracker_for(tracking)
    if tracker is None:
        return None
    from tasks.registry import log_checkpoint_model

    return log_checkpoint_model(tracker, run_id, checkpoint_uri, step=step)
