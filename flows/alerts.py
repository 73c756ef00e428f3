"""Alerts and limits: one message when a run fails, crashes or times out, one when it moves the
champion, and the run's time limits checked before any work.

A nightly run that fails at 02:00 tells nobody unless it says so itself. The flow a user starts
carries the hooks (`Alerter`): `gptpipe run`'s pipeline flow, or the nightly flow, whose
pipeline is a subflow without hooks of its own. So a failure is reported once, by the outermost
flow run, which finds the stage that failed among the task runs of itself and its subflows in the
Prefect API. The message names the run, the stage, the one-line error, and links to the Prefect
flow run and the MLflow run (the pipeline puts the latter on its flow run as labels).

A notification target is one of

- an http(s) webhook URL: the message is POSTed as JSON, ``{"text", "title", "alert"}``
  (``text`` is what Slack, Mattermost and most chat webhooks show);
- an Apprise URL (``json://``, ``slack://``, ``mailto://`` ...; Apprise is a Prefect dependency);
- ``block:NAME`` or ``block:TYPE/NAME``: a saved Prefect notification block (Slack, Teams, custom
  webhook ...) or webhook block, whose URL and secrets stay in Prefect's block store.

A target's URL may hold a token: it is never shown (errors name its scheme and host only), and
the message is scrubbed of the target's secrets, of ``user:password@`` in any URL and of the values
of secret-looking environment variables before it leaves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from storage.errors import GptpipeError, first_line
from storage.tracking import redact, redact_text

NOTIFY_ENV = "GPTPIPE_NOTIFY_URL"
BLOCK_PREFIX = "block:"
CONNECT_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 10.0
# Prefect 3 records task run states from events, a moment after they happen: a hook waits this
# long at most for the runs it reads to reach a final state
STATE_WAIT_S = 10.0
# the pipeline's labels on its flow run, read by the hooks (and shown in the Prefect UI)
RUN_ID_LABEL = "gptpipe.run_id"
MLFLOW_LABEL = "gptpipe.mlflow_run"
# Apprise schemes whose host part is a server to reach (in slack:// and most others it is a token)
_APPRISE_SERVERS = {"json", "jsons", "xml", "xmls", "form", "forms"}
_SECRET_ENV = re.compile(r"PASSWORD|SECRET|TOKEN|KEY|AUTH", re.I)
_MIN_SECRET = 6  # shorter pieces of a URL are not scrubbed from messages (they match words)
# what Prefect appends to a task's name for each of its runs: a count, 3 hex digits or a UUID
_RUN_SUFFIX = re.compile(r"-(\d+|[0-9a-f]{3}|[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12})$")

logger = logging.getLogger("prefect.gptpipe.alerts")


# ----------------------------------------------------------------------------- limits


def check_timeout(value: object, *, name: str) -> float | None:
    """A time limit in seconds: None (no limit) or a positive number, else a one-line error.

    Checked before any work: a negative limit would otherwise fail the run at its first stage.
    """
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise GptpipeError(f"{name} must be a number of seconds, got {value}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise GptpipeError(f"{name} must be a positive number of seconds, got {value}")
    return seconds


# ----------------------------------------------------------------------------- the message


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without ``user:password@`` in any URL and without any of ``secrets``."""
    text = redact_text(text)
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def environment_secrets() -> list[str]:
    """Values of environment variables named like secrets (passwords, tokens, keys)."""
    return [v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 8]


@dataclass(frozen=True)
class Alert:
    """One message: what happened to which run, at which stage, and where to look."""

    title: str
    flow: str
    flow_run: str
    flow_run_id: str
    event: str  # failed, crashed, timed out, new champion
    run_id: str | None = None  # gptpipe's run id: the store's runs/ folder
    stage: str | None = None
    error: str | None = None
    model: str | None = None  # the champion message: which version, and why
    prefect_url: str | None = None
    mlflow_run: str | None = None  # the MLflow run's page, or "run ID at TRACKING_URI"

    def text(self) -> str:
        lines = [self.title]
        if self.error:
            lines.append(f"error: {self.error}")
        if self.model:
            lines.append(f"model: {self.model}")
        lines.append(f"flow run: {self.flow} / {self.flow_run} ({self.flow_run_id})")
        if self.prefect_url:
            lines.append(f"prefect: {self.prefect_url}")
        if self.mlflow_run:
            lines.append(f"mlflow: {self.mlflow_run}")
        return "\n".join(lines)

    def payload(self) -> dict[str, Any]:
        """The JSON a webhook receives."""
        return {"title": self.title, "text": self.text(), "alert": dataclasses.asdict(self)}

    def scrubbed(self, secrets: Iterable[str]) -> Alert:
        secrets = list(secrets)
        values = {
            f.name: scrub(v, secrets)
            for f in dataclasses.fields(self)
            if isinstance(v := getattr(self, f.name), str)
        }
        return dataclasses.replace(self, **values)


# ----------------------------------------------------------------------------- targets


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Silence a library's logger for the block (Apprise logs the URLs it cannot parse)."""
    log = logging.getLogger(name)
    level, log.level = log.level, logging.CRITICAL + 1
    try:
        yield
    finally:
        log.level = level


def _check_reachable(url: str, shown: str) -> None:
    """The URL's host resolves and accepts a connection on its port: a one-line error if not."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise GptpipeError(f"notification URL {shown}: its port is not a number") from None
    if not parts.hostname:
        raise GptpipeError(f"notification URL {shown} has no host")
    port = port or (443 if parts.scheme.endswith("s") else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise GptpipeError(f"cannot reach the notification URL {shown}: {reason}") from None


def _has_digit(text: str) -> bool:
    return any(c.isdigit() for c in text)


@dataclass(frozen=True)
class NotifyTarget:
    """Where alerts go. ``spec`` may hold a token: show `shown`, never ``spec``."""

    spec: str = field(repr=False)

    @property
    def kind(self) -> str:
        """block, webhook (http or https) or apprise."""
        if self.spec.startswith(BLOCK_PREFIX):
            return "block"
        scheme = self.spec.partition("://")[0].lower()
        return "webhook" if scheme in ("http", "https") else "apprise"

    @property
    def shown(self) -> str:
        """The target as errors and logs name it: a block's name, else a URL's scheme and host."""
        if self.kind == "block":
            return self.spec
        scheme, sep, _ = self.spec.partition("://")
        if not sep:
            return "(not a URL)"
        if self.kind == "apprise" and scheme.lower() not in _APPRISE_SERVERS:
            return f"{scheme}://…"
        try:
            parts = urlsplit(self.spec)
            host = parts.hostname or ""
            port = f":{parts.port}" if parts.port else ""
        except ValueError:
            return f"{scheme}://…"
        return f"{scheme}://{host}{port}/…"

    def secrets(self) -> list[str]:
        """The pieces of the URL that may be a credential: never in a message."""
        if self.kind == "block":
            return []
        pieces = [self.spec]
        with contextlib.suppress(ValueError):
            parts = urlsplit(self.spec)
            pieces += [parts.username or "", parts.password or ""]
            pieces += [value for _, value in parse_qsl(parts.query)]
            # /services/T00/B00/XXXX..., /api/webhooks/ID/TOKEN: long or digit-bearing segments
            # (words such as /hooks/nightly are left alone: they would blank the message's words)
            pieces += [p for p in parts.path.split("/") if len(p) >= 16 or _has_digit(p)]
            if self.kind == "apprise" and parts.scheme.lower() not in _APPRISE_SERVERS:
                pieces.append(parts.netloc)  # slack://TOKEN/..., tgram://BOT_TOKEN/...
        return [p for p in pieces if len(p) >= _MIN_SECRET]

    def check(self) -> None:
        """Fail now, before any work, when alerts could not be sent: a one-line GptpipeError."""
        if self.kind == "block":
            url = getattr(self._block(), "url", None)
            url = url.get_secret_value() if hasattr(url, "get_secret_value") else url
            if isinstance(url, str) and url.startswith(("http://", "https://")):
                _check_reachable(url, self.spec)
            return
        if self.kind == "webhook":
            _check_reachable(self.spec, self.shown)
            return
        self._apprise()
        if self.spec.partition("://")[0].lower() in _APPRISE_SERVERS:
            _check_reachable(self.spec, self.shown)

    def send(self, alert: Alert) -> None:
        """Deliver one message; raises when it could not be delivered."""
        if self.kind == "webhook":
            import httpx

            response = httpx.post(self.spec, json=alert.payload(), timeout=SEND_TIMEOUT_S)
            response.raise_for_status()
        elif self.kind == "apprise":
            with _quiet("apprise"):
                delivered = self._apprise().notify(title=alert.title, body=alert.text())
            if not delivered:
                raise RuntimeError(f"Apprise could not deliver to {self.shown}")
        else:
            from prefect.blocks.abstract import NotificationBlock

            block = self._block()
            if isinstance(block, NotificationBlock):
                with block.raise_on_failure():
                    block.notify(body=alert.text(), subject=alert.title)
            else:
                block.call(alert.payload()).raise_for_status()

    def _apprise(self):
        try:
            import apprise
        except ImportError:
            raise GptpipeError(
                f"notification URL {self.shown}: Apprise URLs need the apprise package (pip "
                "install apprise); an http(s) webhook URL or block:NAME works without it"
            ) from None
        notifier = apprise.Apprise()
        with _quiet("apprise"):
            added = notifier.add(self.spec)
        if not added:
            raise GptpipeError(
                f"notification URL {self.shown} is not one Apprise knows: give an http(s) "
                "webhook URL, an Apprise URL (json://, slack://, mailto:// ...) or block:NAME"
            )
        return notifier

    def _block(self):
        """The saved Prefect block: a notification block or a webhook block."""
        from prefect.blocks.abstract import NotificationBlock
        from prefect.blocks.core import Block
        from prefect.blocks.webhook import Webhook

        name = self.spec.removeprefix(BLOCK_PREFIX).strip()
        ref = name if "/" in name else _block_slug(name)
        try:
            block = Block.load(ref)
        except Exception as exc:  # ValueError for a missing block, httpx errors without an API
            raise GptpipeError(
                f"--notify {self.spec}: cannot load the Prefect block {ref!r}: {first_line(exc)}"
            ) from None
        if not isinstance(block, (NotificationBlock, Webhook)):
            raise GptpipeError(
                f"--notify {self.spec}: {ref!r} is a {type(block).__name__} block, not a "
                "notification or webhook block"
            )
        return block


def _block_slug(name: str) -> str:
    """``TYPE/NAME`` of the one saved block named ``name``, for ``block:NAME``."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            documents = client.read_block_documents(include_secrets=False)
    except Exception as exc:
        raise GptpipeError(
            f"--notify block:{name}: cannot read Prefect's blocks: {first_line(exc)}"
        ) from None
    refs = sorted(
        f"{d.block_type.slug}/{d.name}" for d in documents if d.name == name and d.block_type
    )
    if len(refs) != 1:
        found = f"several: {', '.join(refs)}; give block:TYPE/NAME" if refs else "none"
        raise GptpipeError(f"--notify block:{name}: Prefect blocks of that name: {found}")
    return refs[0]


def notify_target(spec: str | None) -> NotifyTarget | None:
    """The target ``spec`` names, else $GPTPIPE_NOTIFY_URL's; None when neither is set."""
    spec = (spec if spec is not None else os.environ.get(NOTIFY_ENV, "")).strip()
    return NotifyTarget(spec) if spec else None


# ----------------------------------------------------------------------------- what failed


def label_flow_run(*, run_id: str, mlflow_run: str | None) -> None:
    """Put the run's id and its MLflow run on this flow run (Prefect labels): the alert hooks of
    an enclosing flow read them, and the Prefect UI shows them."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    labels = {RUN_ID_LABEL: run_id, **({MLFLOW_LABEL: mlflow_run} if mlflow_run else {})}
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run_labels(UUID(flow_run.id), labels)
    except Exception as exc:  # labels are for the alert's links: never worth failing the run
        logger.warning("could not label the flow run: %s", first_line(exc))


def _final(run) -> bool:
    return run.state is not None and run.state.is_final()


def _bad(run) -> bool:
    return run.state is not None and (run.state.is_failed() or run.state.is_crashed())


def _started(run):
    return run.start_time or run.expected_start_time or run.created


@dataclass(frozen=True)
class Failure:
    """Where a flow run failed: its flow runs from the outermost down to the one that failed
    (subflows), and the task run that failed in the last one, if a task failed."""

    flow_runs: tuple[Any, ...]
    task_run: Any | None

    @property
    def stage(self) -> str:
        """The failed task's name (its run's name less Prefect's suffix), else the flow's."""
        if self.task_run is not None:
            return _RUN_SUFFIX.sub("", self.task_run.name)
        return self.flow_runs[-1].name

    @property
    def timed_out(self) -> bool:
        runs = [*self.flow_runs, *([self.task_run] if self.task_run is not None else [])]
        return any(r.state is not None and r.state.name == "TimedOut" for r in runs)

    def label(self, key: str) -> str | None:
        """A label of the innermost flow run that has it (the pipeline's)."""
        for run in reversed(self.flow_runs):
            if run.labels.get(key):
                return str(run.labels[key])
        return None


def find_failure(client, flow_run_id) -> Failure:
    """The flow run, its failed subflow runs and the task run that failed, read from the API.

    Waits (`STATE_WAIT_S` at most) while a task run or subflow run is not final yet: its state
    reaches the API a moment after it changed.
    """
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )

    deadline = time.monotonic() + STATE_WAIT_S
    while True:
        chain = [client.read_flow_run(flow_run_id)]
        task_run, pending = None, False
        while True:
            current = chain[-1]
            subflows = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[current.id])
                )
            )
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[current.id]))
            )
            placeholders = {s.parent_task_run_id for s in subflows}
            tasks = [t for t in tasks if t.id not in placeholders]
            pending = pending or not all(_final(r) for r in [*subflows, *tasks])
            failed_subflows = sorted(filter(_bad, subflows), key=_started)
            if failed_subflows:
                chain.append(failed_subflows[0])
                continue
            failed_tasks = sorted(filter(_bad, tasks), key=_started)
            task_run = failed_tasks[0] if failed_tasks else None
            break
        if not pending or time.monotonic() > deadline:
            return Failure(flow_runs=tuple(chain), task_run=task_run)
        time.sleep(0.25)


def describe(exc: BaseException) -> str:
    """An exception as one line: a GptpipeError's message, else its type and first line."""
    if isinstance(exc, GptpipeError):
        return first_line(exc, 500)
    return f"{type(exc).__name__}: {first_line(exc, 500)}"


def _exception(state) -> BaseException | None:
    with contextlib.suppress(Exception):
        data = state.result(raise_on_failure=False)
        if isinstance(data, BaseException):
            return data
    return None


def _error_line(state, failure: Failure) -> str:
    """The one-line error: a timeout as Prefect words it, else the exception that ended the run."""
    for run in [failure.task_run, *reversed(failure.flow_runs)]:
        if run is not None and run.state is not None and run.state.name == "TimedOut":
            return first_line(Exception(run.state.message or "timed out"), 500)
    exc = _exception(state)
    if exc is not None:
        return describe(exc)
    for run in [failure.task_run, failure.flow_runs[-1]]:
        if run is not None and run.state is not None and run.state.message:
            return first_line(Exception(run.state.message), 500)
    return state.name


def _prefect_url(flow_run_id) -> str | None:
    from prefect.utilities.urls import url_for

    with contextlib.suppress(Exception):
        return url_for("flow-run", obj_id=flow_run_id)
    return None


def mlflow_link(run_url: str | None, run_id: str | None, tracking_uri: str | None) -> str | None:
    """The MLflow run's page when the tracking URI is a server, else where to find it."""
    if run_url:
        return redact(run_url)
    if run_id:
        return f"run {run_id} at {redact(tracking_uri or '')}"
    return None


def failure_alert(flow, flow_run, state) -> Alert:
    """The message for a failed, crashed or timed-out flow run."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        failure = find_failure(client, flow_run.id)
    event = "timed out" if failure.timed_out or state.name == "TimedOut" else state.name.lower()
    run_id = failure.label(RUN_ID_LABEL) or flow_run.parameters.get("run_id")
    what = f"run {run_id}" if run_id else f"flow run {flow_run.name}"
    return Alert(
        title=f"gptpipe {what} {event} at stage {failure.stage}",
        flow=flow.name,
        flow_run=flow_run.name,
        flow_run_id=str(flow_run.id),
        event=event,
        run_id=run_id,
        stage=failure.stage,
        error=_error_line(state, failure),
        prefect_url=_prefect_url(flow_run.id),
        mlflow_run=failure.label(MLFLOW_LABEL),
    )


def champion_alert(flow, flow_run, summary: dict) -> Alert:
    """The message for a run whose model became the champion."""
    model, tracked = summary["model"], summary.get("mlflow", {})
    return Alert(
        title=f"gptpipe run {summary['run_id']}: {model['name']} version {model['version']} "
        "is the new champion",
        flow=flow.name,
        flow_run=flow_run.name,
        flow_run_id=str(flow_run.id),
        event="new champion",
        run_id=summary["run_id"],
        stage="register",
        model=f"{model['name']} version {model['version']}, val loss "
        f"{summary['val_loss']:.4f}: {model['reason']}",
        prefect_url=_prefect_url(flow_run.id),
        mlflow_run=mlflow_link(
            tracked.get("run_url"), tracked.get("run_id"), tracked.get("tracking_uri")
        ),
    )


# ----------------------------------------------------------------------------- the hooks


class Alerter:
    """Flow-state hooks that send at most one alert per flow run.

    With a target, alerts go there (`gptpipe run --notify`). Without one, each hook reads it when
    it runs: the flow run's ``alerts.notify`` parameter, else $GPTPIPE_NOTIFY_URL (the nightly
    flow's hooks, whose deployment sets either). A flow run that fails is reported by the failure or
    the crash hook, never both; a hook that cannot deliver logs one line and leaves the run's
    state as it was.
    """

    def __init__(self, target: NotifyTarget | None = None) -> None:
        self.target = target
        self._sent: set[str] = set()
        self._lock = threading.Lock()

    def hooks(self) -> dict[str, list]:
        """Keyword arguments of `flow` and `Flow.with_options`."""
        return {
            "on_failure": [self.on_failure],
            "on_crashed": [self.on_failure],
            "on_completion": [self.on_completion],
        }

    def on_failure(self, flow, flow_run, state) -> None:
        """Failed (a time limit included) or crashed: which run, which stage, why, and links."""
        target = self._target(flow_run)
        if target is not None and self._first(flow_run):
            self._deliver(target, lambda: failure_alert(flow, flow_run, state))

    def on_completion(self, flow, flow_run, state) -> None:
        """Completed: a message only when the run's model became the champion."""
        target = self._target(flow_run)
        if target is None:
            return
        summary = None
        with contextlib.suppress(Exception):
            summary = state.result(raise_on_failure=False)
        model = summary.get("model") if isinstance(summary, dict) else None
        if isinstance(model, dict) and model.get("champion") and self._first(flow_run):
            self._deliver(target, lambda: champion_alert(flow, flow_run, summary))

    def _target(self, flow_run) -> NotifyTarget | None:
        if self.target is not None:
            return self.target
        try:
            alerts = (flow_run.parameters or {}).get("alerts") or {}  # a run request's section
            return notify_target(alerts.get("notify") if isinstance(alerts, dict) else None)
        except Exception as exc:
            logger.warning("no alert sent: %s", first_line(exc))
            return None

    def _first(self, flow_run) -> bool:
        with self._lock:
            key = str(flow_run.id)
            if key in self._sent:
                return False
            self._sent.add(key)
            return True

    def _deliver(self, target: NotifyTarget, build) -> None:
        secrets = [*target.secrets(), *environment_secrets()]
        try:
            alert = build().scrubbed(secrets)
            target.send(alert)
        except Exception as exc:
            reason = scrub(describe(exc), secrets)
            logger.warning("could not send the alert to %s: %s", target.shown, reason)
            return
        logger.info("alert sent to %s: %s", target.shown, alert.title)
