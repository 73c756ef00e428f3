from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.runtime import task_run
from prefect.states import Completed, State

import storage
from model.checkpoint import InitFrom, check_warm_start, load_init_checkpoint
from model.config import config_from_dict
from model.launch import Listeners, TrainingStopped, launch_ray_training, launch_training
from model.tokenizer import tokenizer_from_json
from model.train import SUMMARY_NAME, TrainingData
from storage.errors import GptpipeError
from tasks.cache import Claim, cache_key
from tasks.common import (
    claim_stage,
    log_split_inputs,
    retry_unless_user_error,
    stage_run,
    tracker_for,
)
from tasks.results import (
    Artifact,
    Pruned,
    SplitResult,
    Tracking,
    TrainResult,
    Workspace,
    artifact_dicts,
)
from tasks.study import TrialRef


def _pruned_is_no_failure(fn):
    """The train task's function, ending in a Completed state named Pruned when the sweep's
    pruner stopped the training (see `train`), instead of raising `TrainingStopped`."""

    @functools.wraps(fn)
    def train_or_prune(*args, **kwargs) -> TrainResult | State:
        try:
            return fn(*args, **kwargs)
        except TrainingStopped as stop:  # its stage's MLflow run ended KILLED on the way out
            pruned = Pruned(step=stop.step, val_loss=stop.val_loss)
            return Completed(name="Pruned", message=pruned.message, data=pruned)

    return train_or_prune


@dataclass(frozen=True)
class Placement:
    """Where and how a training runs: nproc ranks, started by ``engine`` ("torchrun": ranks on
    this machine; "ray": Ray Train workers on the cluster at ``ray_address``, else a local one),
    on the GPUs ``gpus`` (CUDA_VISIBLE_DEVICES, e.g. "2,3"; None: all visible ones). Only nproc
    is part of the train stage's key: both engines, on any GPUs, end with the same weights."""

    nproc: int = 1
    engine: str = "torchrun"
    ray_address: str | None = None
    gpus: str | None = None


ONE_RANK = Placement()


@task(name="train", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error)
@_pruned_is_no_failure
def train(
    config: dict,
    splits: SplitResult,
    *,
    workspace: Workspace,
    tokenizer: Artifact,
    placement: Placement = ONE_RANK,
    resume: bool = False,
    pruning: TrialRef | None = None,
    init_from: InitFrom | None = None,
) -> TrainResult:
    """Train on placement.nproc ranks (rank 0 logs to MLflow), then log the weights as an MLflow
    model.

    Keyed on the split data, the tokenizer, the config, nproc and the training code: the same
    inputs re-use a finished training. A retry of this task, or `--resume`, continues from the
    folder's last checkpoint instead of starting again.

    placement.engine: "torchrun" (ranks on this machine) or "ray" (Ray Train workers on the
    cluster at placement.ray_address, else a local one). It is not part of the key: both run the
    same loop on the same batches of (seed, step, rank, world size) and end with the same weights
    (tests/test_ray_train.py), so either engine's finished training serves the other.

    pruning: the sweep trial this training is; its evaluations are reported to the study. When
    the pruner stops it, the task run ends in a Completed state named Pruned, "pruned at step N
    (val loss X)", whose result is a `Pruned` (not a TrainResult), and its MLflow run is KILLED:
    stopped on purpose, not failed (call it with return_state=True). placement.gpus: the GPUs
    the training may use (CUDA_VISIBLE_DEVICES, e.g. "2,3"): a sweep gives each of its parallel
    trials its own.

    init_from: a warm start (`tasks.warm_start.resolve_warm_start` resolves one): the training
    begins from that checkpoint's weights instead of a fresh init (rows of new tokens fresh), with
    a fresh optimizer, from step 0. Its sha256 is part of the key; a checkpoint of another shape,
    or whose vocabulary tonight's tokenizer does not keep, is refused before training starts.
    A resumed warm start continues from its own checkpoint.
    """
    logger = get_run_logger()
    job = _Job(config, splits, tokenizer, placement, init_from)
    key = job.key()
    job.check_engine()
    resume = resume or task_run.run_count > 1
    tracking = workspace.tracking
    with stage_run(tracking, "train") as run:
        # the model learns from train; the loss curve and the best checkpoint come from val
        log_split_inputs(run, splits, {"train": "training", "val": "evaluation"})
        with claim_stage(workspace, "train", key, logger.info) as found:
            cached = found.manifest is not None
            if cached:
                summary = _reuse(found.folder, key, run, logger)
            else:
                listeners = Listeners(
                    on_line=logger.info,
                    mlflow_run=(tracking.uri, run.run_id) if run.run_id else None,
                    on_eval=pruning.reporter() if pruning else None,
                )
                summary = _launch(job, found, run, listeners, resume=resume, logger=logger)
                run.log_params({"cached": False, "cache_key": key})
            checkpoint = Artifact.of(summary["checkpoint"])  # hashes it: once
            if not cached:
                found.save(job.manifest(checkpoint))
        model_uri = _record(job, run, tracking, checkpoint, summary, cached=cached, logger=logger)
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


@dataclass(frozen=True)
class _Job:
    """One training as the train task was asked for it: what decides its result (the stage's
    key: the data, tokenizer, config, ranks and warm start) and where it runs."""

    config: dict
    splits: SplitResult
    tokenizer: Artifact
    placement: Placement
    init_from: InitFrom | None

    def key(self) -> str:
        """The stage's cache key; not the engine: the same results either way (see `train`)."""
        warm = {"init_from": self.init_from.sha256} if self.init_from else {}  # none: as before
        return cache_key(
            "train",
            train=self.splits.train.sha256,
            val=self.splits.val.sha256,
            tokenizer=self.tokenizer.sha256,
            config=self.config,
            nproc=self.placement.nproc,
            **warm,
        )

    def check_engine(self) -> None:
        if self.init_from is not None and self.placement.engine == "ray":
            raise GptpipeError(
                "a warm start (init_from) trains with the torchrun engine only for now: "
                "use engine torchrun, or train without init_from"
            )

    def data(self) -> TrainingData:
        return TrainingData(
            self.splits.train.uri, self.splits.val.uri, self.tokenizer.uri, self.init_from
        )

    def inputs(self) -> dict[str, Artifact]:
        return {"train": self.splits.train, "val": self.splits.val, "tokenizer": self.tokenizer}

    def manifest(self, checkpoint: Artifact) -> dict:
        """The stage folder's manifest once the training is done."""
        return {
            "checkpoint": checkpoint.to_dict(),
            "config": self.config,
            "nproc": self.placement.nproc,
            **({"init_from": self.init_from.to_dict()} if self.init_from else {}),
        }


def _reuse(folder: str, key: str, run, logger) -> dict:
    """The summary of the finished training in ``folder`` (the stage's cache), recorded so."""
    summary = json.loads(storage.get_bytes(storage.join(folder, SUMMARY_NAME)))
    logger.info("train: re-using %s (cached: same data, config and code)", folder)
    reused = {"n_params": summary["n_params"], "world_size": summary["world_size"]}
    run.log_params({"cached": True, "cache_key": key, **reused})
    return summary


def _launch(job: _Job, found: Claim, run, listeners: Listeners, *, resume: bool, logger) -> dict:
    """Train into the claimed folder, from its last checkpoint when resuming or taking over from
    a run that died; the training's summary. A warm start is checked first (one line)."""
    if found.took_over is not None:
        logger.info("train: continuing from the last checkpoint in %s", found.folder)
    if job.init_from is not None:
        _check_init(job.init_from, job.config, job.tokenizer)
        logger.info("train: warm start from %s", job.init_from.label)
    with run.system_metrics():
        return _launcher(job.placement)(
            config_from_dict(job.config),
            found.folder,
            inputs=job.data(),
            resume=resume or found.took_over is not None,
            listeners=listeners,
        )


def _record(
    job: _Job,
    run,
    tracking: Tracking | None,
    checkpoint: Artifact,
    summary: dict,
    *,
    cached: bool,
    logger,
) -> str | None:
    """The stage run's warm start, inputs and checkpoint; the URI of the model logged to MLflow
    now (None for a re-used training, whose model is already logged: the register stage finds
    its version)."""
    init_from = job.init_from
    if init_from is not None:
        run.log_params({"init_from": init_from.label, "init_from_sha256": init_from.sha256})
        run.set_tags({"init_from": init_from.label})
    run.record_io(artifact_dicts(job.inputs()), {"checkpoint": checkpoint.to_dict()})
    model_uri = (
        None if cached else _log_model(tracking, run.run_id, checkpoint.uri, summary["step"])
    )
    if model_uri:
        logger.info("logged the model to MLflow as %s", model_uri)
    return model_uri


def _check_init(init: InitFrom, config: dict, tokenizer: Artifact) -> None:
    """Refuse a warm start that cannot work before its training starts (one line): the ranks
    check it again, but only after torchrun and the machine's probes have started."""
    cfg = config_from_dict(config)
    tokenizer_json = storage.get_bytes(tokenizer.uri).decode("utf-8")
    vocab_size = max(tokenizer_from_json(tokenizer_json).vocab_size, cfg.vocab_size or 0)
    check_warm_start(load_init_checkpoint(init), init, cfg.model_config(vocab_size), tokenizer_json)


def _launcher(placement: Placement):
    """launch_training, or its Ray counterpart, bound to where the training runs (the same
    remaining arguments, the same summary)."""
    env = {"extra_env": {"CUDA_VISIBLE_DEVICES": placement.gpus}} if placement.gpus else {}
    if placement.engine == "ray":
        return functools.partial(
            launch_ray_training, nproc=placement.nproc, address=placement.ray_address, **env
        )
    return functools.partial(launch_training, nproc=placement.nproc, **env)


def _log_model(
    tracking: Tracking | None, run_id: str | None, checkpoint_uri: str, step: int
) -> str | None:
    tracker = tracker_for(tracking)
    if tracker is None:
        return None
    from tasks.registry import log_checkpoint_model

    return log_checkpoint_model(tracker, run_id, checkpoint_uri, step=step)
