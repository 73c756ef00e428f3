"""One trial of a sweep: train and evaluate one config, reporting evaluations to the study's
pruner, and record the outcome (complete, pruned or failed) on the trial's MLflow run.

A trial is a task of its own, so the sweep flow runs K of them at a time on its task runner
(threads here, Dask or Ray workers); inside it the usual train and evaluate stages run, their
MLflow runs nested under the trial's run. A failure is an outcome, not an exception: the sweep
goes on with the other trials.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from prefect import get_run_logger, task

from storage.errors import first_line
from storage.tracking import Tracker
from tasks.common import tracker_for
from tasks.evaluate import evaluate
from tasks.results import Artifact, Pruned, SplitResult, Workspace
from tasks.study import StudyRef, TrialRef
from tasks.train import Placement, train

COMPLETE, PRUNED, FAILED = "complete", "pruned", "failed"
# the trial's MLflow run ends so: a pruned trial was stopped on purpose
MLFLOW_STATUS = {COMPLETE: "FINISHED", PRUNED: "KILLED", FAILED: "FAILED"}
STATE_TAG = "gptpipe.trial_state"


@dataclass(frozen=True)
class TrialSpec:
    """What a trial trains: its number and id in the study, its values, the whole config."""

    number: int
    trial_id: int
    params: dict[str, Any]
    config: dict[str, Any]
    mlflow_run_id: str | None = None
    gpus: str | None = None  # CUDA_VISIBLE_DEVICES of its training: its slot's GPUs


@dataclass(frozen=True)
class Evaluation:
    """How every trial's final model is measured: the same val batches for all, so that their
    losses compare (the base config's eval_iters, batch_size and seed)."""

    eval_iters: int
    batch_size: int
    seed: int


@dataclass(frozen=True)
class TrialOutcome:
    number: int
    state: str
    params: dict[str, Any]
    val_loss: float | None = None
    train_loss: float | None = None
    error: str | None = None
    stopped_at: int | None = None  # the step a pruned trial was stopped at
    trained: dict[str, Any] | None = field(default=None, repr=False)  # TrainResult.to_dict
    evaluated: dict[str, Any] | None = field(default=None, repr=False)
    mlflow_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@task(name="trial", task_run_name="trial-{spec.number}")
def run_trial(
    spec: TrialSpec,
    splits: SplitResult,
    *,
    workspace: Workspace,
    tokenizer: Artifact,
    study: StudyRef,
    evaluation: Evaluation,
    nproc: int = 1,
) -> TrialOutcome:
    """Train and evaluate one trial; its outcome, recorded on its MLflow run."""
    logger = get_run_logger()
    tracking = workspace.tracking
    # the trial's stages log under its MLflow run
    if tracking is not None:
        workspace = replace(workspace, tracking=replace(tracking, parent_id=spec.mlflow_run_id))
    outcome: dict[str, Any] = {"number": spec.number, "params": spec.params}
    try:
        # a training the pruner stopped is a Completed state named Pruned whose result says where
        trained = train(
            spec.config,
            splits,
            workspace=workspace,
            tokenizer=tokenizer,
            placement=Placement(nproc=nproc, gpus=spec.gpus),
            pruning=TrialRef(study, spec.number, spec.trial_id),
            return_state=True,
        ).result()
        if isinstance(trained, Pruned):
            logger.info("trial %d %s", spec.number, trained.message)
            result = TrialOutcome(**outcome, state=PRUNED, stopped_at=trained.step)
        else:
            evaluated = evaluate(
                trained.checkpoint,
                splits,
                workspace=workspace,
                **asdict(evaluation),
            )
            result = TrialOutcome(
                **outcome,
                state=COMPLETE,
                val_loss=evaluated.val_loss,
                train_loss=evaluated.train_loss,
                trained=trained.to_dict(history=False),
                evaluated=evaluated.to_dict(),
            )
    except Exception as exc:  # this trial failed; the sweep goes on with the others
        logger.warning("trial %d failed: %s", spec.number, first_line(exc, limit=300))
        result = TrialOutcome(**outcome, state=FAILED, error=first_line(exc, limit=300))
    result = replace(result, mlflow_run_id=spec.mlflow_run_id)
    record_outcome(tracker_for(tracking), result, study=study)
    return result


def record_outcome(tracker: Tracker | None, outcome: TrialOutcome, *, study: StudyRef) -> None:
    """The trial's MLflow run: its val loss curve (the evaluations it reported), its final
    losses, its state as a tag and as the run's status."""
    if tracker is None or outcome.mlflow_run_id is None:
        return
    run = tracker.stage_handle(outcome.mlflow_run_id)
    trial = study.open().trials[outcome.number]
    for step, value in sorted(trial.intermediate_values.items()):
        run.log_metrics({"val_loss": value}, step)
    if outcome.state == COMPLETE:
        final_step = outcome.trained["step"] if outcome.trained else 0
        run.log_metrics(
            {"val_loss": outcome.val_loss, "train_loss": outcome.train_loss}, final_step
        )
    tags = {STATE_TAG: outcome.state}
    if outcome.error:
        tags["gptpipe.trial_error"] = outcome.error
    if outcome.stopped_at is not None:
        tags["gptpipe.pruned_at_step"] = outcome.stopped_at
    run.set_tags(tags)
    tracker.client.set_terminated(outcome.mlflow_run_id, MLFLOW_STATUS[outcome.state])
