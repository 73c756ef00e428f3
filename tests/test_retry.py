"""The stages' retry rule (tasks.common.retry_unless_user_error) on Prefect's real task engine,
against the session's Prefect server: a transient failure is retried (a socket's read timeout
among them); bad input, and a stage that ran out of its time limit (Prefect's task timeout),
never is, in any stage: a time limit that a retry doubles is no limit."""

from __future__ import annotations

import time

import pytest

from storage.errors import GptpipeError
from tasks.common import IO_RETRIES, retry_unless_user_error


@pytest.fixture()
def on_server(prefect_server):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        yield


def attempts(body, **options) -> tuple[int, str | None]:
    """How often a stage with the stages' retry settings (no delay) ran ``body``, and the name of
    the exception it ended with (None: it succeeded)."""
    from prefect import flow, task

    calls: list[int] = []

    @task(name="retry-rule", **{**IO_RETRIES, "retry_delay_seconds": 0, **options})
    def stage():
        calls.append(1)
        body()

    @flow(name="retry-rule-test")
    def run() -> str | None:
        try:
            stage()
        except BaseException as exc:
            return type(exc).__name__
        return None

    ended = run()
    return len(calls), ended


def raises(exc: BaseException):
    def body():
        raise exc

    return body


def test_a_transient_failure_is_retried(on_server):
    assert attempts(raises(ConnectionResetError("peer went away"))) == (
        1 + IO_RETRIES["retries"],
        "ConnectionResetError",
    )


def test_bad_input_is_not_retried(on_server):
    assert attempts(raises(GptpipeError("bad input"))) == (1, "GptpipeError")


def test_a_sockets_read_timeout_is_transient_and_retried(on_server):
    """socket.timeout is TimeoutError: a store that did not answer in time may next time."""
    assert attempts(raises(TimeoutError("read timed out"))) == (
        1 + IO_RETRIES["retries"],
        "TimeoutError",
    )


def busy(seconds: float):
    """Work for ``seconds`` in small steps (Prefect stops a sync task between Python calls, not
    inside one long sleep)."""

    def body():
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.05)

    return body


def test_a_stage_past_its_time_limit_is_not_retried(on_server):
    start = time.monotonic()
    ran, ended = attempts(busy(30), timeout_seconds=1)
    assert (ran, ended) == (1, "TaskRunTimeoutError")  # Prefect's, a TimeoutError
    assert time.monotonic() - start < 25  # stopped at its limit, not run to the end nor again


def test_the_train_task_under_a_limit_keeps_the_stages_rule():
    from flows.pipeline import train_task
    from tasks.train import train

    assert train_task(None) is train
    limited = train_task(3)
    assert limited.timeout_seconds == 3 and limited.retries == train.retries == 1
    assert limited.retry_condition_fn is retry_unless_user_error is train.retry_condition_fn
