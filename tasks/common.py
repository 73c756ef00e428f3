"""What every stage task shares: the retry rule, artifact references, the stage's MLflow run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from storage.errors import GptpipeError
from storage.tracking import NullRun, StageRun, Tracker
from tasks.cache import Claim, claim
from tasks.results import SplitResult, Tracking, Workspace


def retry_unless_user_error(task, task_run, state) -> bool:
    """Prefect retry condition of every stage: retry transient failures (a dropped connection, a
    socket's read timeout); never bad input (it would fail again) nor a stage that ran out of its
    time limit (Prefect's task or flow timeout: a limit that a retry doubles is no limit). A
    training the sweep's pruner stopped does not fail at all (tasks.train: a Completed state
    named Pruned)."""
    from prefect.flow_engine import FlowRunTimeoutError
    from prefect.task_engine import TaskRunTimeoutError

    try:
        state.result()
    except (GptpipeError, TaskRunTimeoutError, FlowRunTimeoutError):
        return False
    except Exception:
        return True
    return False


# how the stages that read and write the store retry: twice, with backoff, unless the input is bad
IO_RETRIES = {
    "retries": 2,
    "retry_delay_seconds": [2, 10],
    "retry_condition_fn": retry_unless_user_error,
}


def tracker_for(tracking: Tracking | None) -> Tracker | None:
    if tracking is None:
        return None
    return Tracker(tracking.uri, tracking.experiment)


@contextmanager
def stage_run(tracking: Tracking | None, name: str) -> Iterator[StageRun | NullRun]:
    """The stage's nested MLflow run under the pipeline's run (a no-op without tracking)."""
    tracker = tracker_for(tracking)
    if tracker is None:
        yield NullRun()
        return
    with tracker.stage(name, tracking.parent_id) as run:
        yield run


def log_split_inputs(run: StageRun | NullRun, splits: SplitResult, contexts: dict[str, str]):
    """The splits named in `contexts` as the run's MLflow dataset inputs, e.g.
    {"train": "training", "val": "evaluation"}: lineage from a run back to the data it read."""
    for name, context in contexts.items():
        split = getattr(splits, name)
        run.log_dataset(split.uri, name, split.sha256, context=context)


def run_owner(workspace: Workspace) -> str:
    """This run as others waiting on its leases see it: ``workspace.owner``, else the Prefect
    flow run's name."""
    if workspace.owner:
        return workspace.owner
    from prefect.runtime import flow_run

    return f"Prefect flow run {flow_run.name or flow_run.id or '(none)'}"


@contextmanager
def claim_stage(workspace: Workspace, stage: str, key: str, log) -> Iterator[Claim]:
    """`tasks.cache.claim` for a stage of this workspace: its cached result, or its lease."""
    refresh = workspace.refreshes(stage)
    owner = run_owner(workspace)
    with claim(workspace.store, stage, key, refresh=refresh, owner=owner, log=log) as found:
        yield found
