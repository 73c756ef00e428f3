"""What every stage task shares: the retry rule and stage records."""

from __future__ import annotations

import time
from contextlib import contextmanager

import storage
from model.errors import GptpipeError


def retry_unless_user_error(task, task_run, state) -> bool:
    """Prefect retry condition: retry transient failures, never bad input (it would fail again)."""
    try:
        state.result()
    except GptpipeError:
        return False
    except Exception:
        return True
    return False


def describe(uri: str) -> dict[str, str | int]:
    """An artifact reference as stages record it: URI, sha256 and size."""
    return {"uri": uri, "sha256": storage.sha256(uri), "bytes": storage.size(uri)}


@contextmanager
def timed(record: dict):
    """Put the block's wall time, in seconds, into record['seconds']."""
    start = time.perf_counter()
    try:
        yield record
    finally:
        record["seconds"] = round(time.perf_counter() - start, 3)
