"""What every stage task shares: the retry rule, artifact references, the stage's MLflow run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import storage
from model.errors import GptpipeError
from storage.tracking import NullRun, StageRun, Tracker


def retry_unless_user_error(task, task_run, state) -> bool:
    """Prefect retry condition: retry transient failures, never bad input (it would fail again)."""
    try:
        state.result()
    except GptpipeError:
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


def describe(uri: str) -> dict[str, str | int]:
    """An artifact reference as stages record it: URI, sha256 and size."""
    return {"uri": uri, "sha256": storage.sha256(uri), "bytes": storage.size(uri)}


def tracker_for(tracking: dict | None) -> Tracker | None:
    if not tracking:
        return None
    return Tracker(tracking.get("uri"), tracking.get("experiment", "gptpipe"))


@contextmanager
def stage_run(tracking: dict | None, name: str) -> Iterator[StageRun | NullRun]:
    """The stage's nested MLflow run under the pipeline's run (a no-op without tracking).

    `tracking` is {"uri": tracking URI, "experiment": name, "parent_id": the pipeline's run id}.
    """
    tracker = tracker_for(tracking)
    if tracker is None:
        yield NullRun()
        return
    with tracker.stage(name, tracking["parent_id"]) as run:
        yield run
