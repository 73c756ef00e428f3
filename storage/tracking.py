"""MLflow tracking for pipeline runs: one parent run, one nested run per stage, the registry.

Everything goes through `MlflowClient` with explicit run ids, never MLflow's "active run": stages
run in Prefect tasks and training in other processes, where a thread-local active run would point
at the wrong run or at none. Only rank 0 of a training logs: through its launcher (the pipeline's
train stage reads rank 0's calls from its output), or itself when given a run id (multi-node).
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import queue
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from model.errors import GptpipeError, first_line

DEFAULT_EXPERIMENT = "gptpipe"
PARENT_TAG = "mlflow.parentRunId"
# MLflow caps a param value at 6000 characters; ours are short, but a long URI should not crash
_MAX_PARAM = 6000


# scheme:// then the authority's userinfo, up to its last "@" (the authority ends at / ? #)
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


def redact(uri: str) -> str:
    """A URI without user:password@ (a source URL may carry credentials; runs must not).

    Plain text work, not urlsplit: it never raises (a malformed port or IPv6 host still has its
    credentials removed) and leaves the rest of the URI as it was.
    """
    return _USERINFO.sub(r"\1", uri, count=1)


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = str(value)[:_MAX_PARAM]


def flatten_params(values: dict[str, Any]) -> dict[str, str]:
    """Nested dicts as dotted params: {"a": {"b": 1}} -> {"a.b": "1"}."""
    out: dict[str, str] = {}
    _flatten("", values, out)
    return out


def _check_health(tracking_uri: str) -> None:
    import urllib.error
    import urllib.request

    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=10):
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return  # a server behind auth answers; the real calls carry the credentials
        reason = f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise GptpipeError(
        f"cannot reach the MLflow tracking server at {redact(tracking_uri)} ({reason}): "
        "start it or fix --tracking-uri / MLFLOW_TRACKING_URI"
    )


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    # the registry lives on the tracking server too (MLflow may default it elsewhere)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


class Tracker:
    """An MLflow client bound to one tracking server and experiment."""

    def __init__(self, tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT):
        import mlflow

        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        self.experiment = experiment
        self.client = _client(self.tracking_uri)
        self._experiment_id: str | None = None

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            self._experiment_id = (
                found.experiment_id if found else self.client.create_experiment(self.experiment)
            )
        return self._experiment_id

    def check(self) -> None:
        """Fail early, with one line, when the tracking server cannot be used.

        A server is first asked for /health with a short timeout: MLflow's own client retries a
        dead server with backoff for minutes before it gives up.
        """
        if self.tracking_uri.startswith(("http://", "https://")):
            _check_health(self.tracking_uri)
        try:
            self.experiment_id  # noqa: B018 - a real round trip
        except Exception as exc:
            raise GptpipeError(
                f"cannot use the MLflow tracking server at {redact(self.tracking_uri)}: "
                f"{first_line(exc, limit=300)}"
            ) from None

    def start_run(self, name: str, parent_id: str | None = None, tags: dict | None = None) -> str:
        all_tags = dict(tags or {})
        if parent_id:
            all_tags[PARENT_TAG] = parent_id
        return self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id

    def run_url(self, run_id: str) -> str | None:
        """The run's page in the MLflow UI, when the tracking URI is a server."""
        if self.tracking_uri.startswith(("http://", "https://")):
            base = redact(self.tracking_uri).rstrip("/")
            return f"{base}/#/experiments/{self.experiment_id}/runs/{run_id}"
        return None

    def stage_handle(self, run_id: str) -> StageRun:
        """Log into an existing run."""
        return StageRun(self, run_id)

    @contextmanager
    def stage(self, name: str, parent_id: str) -> Iterator[StageRun]:
        """A nested run for one stage; FINISHED when the block ends, FAILED when it raises."""
        run = StageRun(self, self.start_run(name, parent_id))
        start = time.perf_counter()
        try:
            yield run
        except BaseException:
            run.log_metrics({"duration_s": time.perf_counter() - start})
            self.client.set_terminated(run.run_id, "FAILED")
            raise
        run.log_metrics({"duration_s": time.perf_counter() - start})
        self.client.set_terminated(run.run_id, "FINISHED")


class StageRun:
    """Logging into one run by id."""

    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker = tracker
        self.client = tracker.client
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten_params(params)
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0, synchronous: bool = True):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        return self.client.log_batch(self.run_id, metrics=items, synchronous=synchronous)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_artifact_bytes(self, data: bytes, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_bytes(data)
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(self.run_id, str(path), None if parent == "." else parent)

    def record_io(self, inputs: dict[str, dict], outputs: dict[str, dict]) -> None:
        """Each input and output as params: <in|out>.<name>.uri / .sha256 / .bytes."""
        params: dict[str, Any] = {}
        for direction, refs in (("input", inputs), ("output", outputs)):
            for name, ref in refs.items():
                for key, value in ref.items():
                    params[f"{direction}.{name}.{key}"] = redact(value) if key == "uri" else value
        self.log_params(params)

    def log_dataset(self, uri: str, name: str, digest: str, context: str) -> None:
        """Register a dataset as the run's MLflow input, for lineage in the UI."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        dataset = MetaDataset(_dataset_source(redact(uri)), name=name, digest=digest[:36])
        entity = DatasetInput(
            dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]
        )
        self.client.log_inputs(self.run_id, datasets=[entity])


def _dataset_source(uri: str):
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.sources import LocalArtifactDatasetSource, S3ArtifactDatasetSource

    if uri.startswith(("http://", "https://")):
        return HTTPDatasetSource(uri)
    if uri.startswith("s3://"):
        return S3ArtifactDatasetSource(uri)
    return LocalArtifactDatasetSource(os.path.abspath(uri))


def model_name_for(source: str, tokenizer: str) -> str:
    """A registered-model name per dataset: gptpipe-<corpus file stem>-<tokenizer kind>."""
    stem = Path(urlsplit(source).path).stem or "corpus"
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-").lower() or "corpus"
    return f"gptpipe-{stem}-{tokenizer}"


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str)


# ----------------------------------------------------------------------------- inside training

RUN_ID_ENV = "GPTPIPE_MLFLOW_RUN_ID"
# Set by a launcher that logs for rank 0: rank 0 prints its calls, LINE_MARK + JSON, one a line.
TRACK_STDOUT_ENV = "GPTPIPE_TRACK_STDOUT"
LINE_MARK = "gptpipe.mlflow "
# The calls a LineRun prints, and the JSON types of their arguments after the name: a line
# whose arguments differ is no call of ours (float: any JSON number; bool is no number)
LINE_CALLS: dict[str, tuple[type, ...]] = {
    "log_params": (dict,),
    "log_text": (str, str),
    "log_dict": (dict, str),
    "log_artifact_bytes": (str, str),  # the bytes in base64, the artifact's path
    "log_metrics": (dict, int, int),  # {name: number}, step, epoch ms
}

# MLflow's client retries a dead server for minutes by default (7 retries with backoff, 120 s
# timeout). A training's tracking gives up on a call sooner: it keeps its metrics and sends
# failed ones again at the end. Settings in the environment win.
MLFLOW_CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
# How long closing a TrainingRun (the end of a training) waits on MLflow at most
CLOSE_TIMEOUT_S = 60.0


def _fits(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def parse_line(line: str) -> tuple[str, list] | None:
    """The call a `LineRun` printed as line, as (name, arguments); None if it is no such call."""
    if not line.startswith(LINE_MARK):
        return None
    try:
        call = json.loads(line[len(LINE_MARK) :])
    except ValueError:
        return None
    if not isinstance(call, list) or not call or not isinstance(call[0], str):
        return None
    name, args = call[0], call[1:]
    kinds = LINE_CALLS.get(name)
    if kinds is None or len(args) != len(kinds):
        return None
    if not all(_fits(arg, kind) for arg, kind in zip(args, kinds, strict=True)):
        return None
    if name == "log_metrics" and not all(_fits(v, float) for v in args[0].values()):
        return None
    if name == "log_artifact_bytes":
        try:
            args[0] = base64.b64decode(args[0], validate=True)
        except ValueError:  # binascii.Error is one
            return None
    return name, args


class _ClientDefaults:
    """MLFLOW_CLIENT_DEFAULTS in os.environ while a TrainingRun of this process is open.

    MLflow reads these settings from the environment at each request; a client cannot be given
    its own. They are set (where unset) when the first run opens and taken out when the last one
    closes, so the process's other MLflow calls (the registry uploading a checkpoint after the
    training) keep MLflow's own, more patient settings. Calls made by other threads while a
    training is tracked give up as soon as the training's.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = 0
        self._added: list[str] = []

    def enter(self) -> None:
        with self._lock:
            if self._open == 0:
                self._added = [k for k in MLFLOW_CLIENT_DEFAULTS if k not in os.environ]
                os.environ.update({k: MLFLOW_CLIENT_DEFAULTS[k] for k in self._added})
            self._open += 1

    def leave(self) -> None:
        with self._lock:
            self._open -= 1
            if self._open == 0:
                for key in self._added:
                    if os.environ.get(key) == MLFLOW_CLIENT_DEFAULTS[key]:
                        del os.environ[key]
                self._added = []


_client_defaults = _ClientDefaults()


class NullRun:
    """What ranks other than 0, and code run without tracking, log into: every call does nothing."""

    run_id = None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class TrainingRun:
    """The train stage's run as seen from rank 0: training never waits on MLflow or dies of it.

    Used by the launcher, for the calls rank 0 prints (`LineRun`, `log_line`), or by rank 0
    itself when given a run id (multi-node). Every call is queued and carried out, in order, by
    one thread of this class, which also connects to MLflow on first use. Metrics waiting
    together go out as one request. If the server is away, a call fails with a warning on
    stderr and training goes on; failed metric batches are sent again at the end of training
    (the server may be back by then), and every evaluation is kept in the checkpoint and
    summary.json all the same. While the run is open, MLflow's client gives up on a call after
    MLFLOW_CLIENT_DEFAULTS, and `close()` waits on MLflow CLOSE_TIMEOUT_S at most.

    (MLflow's own asynchronous logging would do for metrics, but its thread polls its queue once
    a second and is joined at exit: up to a second added to every training process's exit.)
    """

    _MAX_METRICS = 1000  # MLflow takes at most 1000 metrics a batch

    def __init__(self, tracking_uri: str | None, run_id: str):
        self.run_id = run_id
        self._tracking_uri = tracking_uri
        self._run: StageRun | None = None  # connected in the thread, on first use
        # ("metrics", (values, step, ms)), (a StageRun method's name, its args), ("resend",) (the
        # failed metrics again) or None (stop)
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self._failed: list[list] = []  # metric batches (lists of mlflow Metric) that failed
        self._give_up = threading.Event()  # set by close() when MLflow took too long
        self._closed = False
        _client_defaults.enter()
        self._sender = threading.Thread(target=self._send_loop, name="mlflow", daemon=True)
        self._sender.start()
        atexit.register(self._stop_sender, timeout=30)  # a run that ends without close()

    def log_params(self, params: dict[str, Any]) -> None:
        self._pending.put(("log_params", (params,)))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._pending.put(("log_text", (text, artifact_file)))

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self._pending.put(("log_dict", (data, artifact_file)))

    def log_artifact_bytes(self, data: bytes, artifact_file: str) -> None:
        self._pending.put(("log_artifact_bytes", (data, artifact_file)))

    def log_metrics(self, metrics: dict[str, float], step: int = 0, ms: int | None = None):
        """Queue metrics of a step; ms: when they were measured (default: now), in epoch ms."""
        values = {key: float(value) for key, value in metrics.items()}
        self._pending.put(("metrics", (values, step, int(time.time() * 1e3) if ms is None else ms)))

    def log_line(self, line: str) -> bool:
        """Queue the call a `LineRun` printed as ``line``; False if the line is not one, or not a
        well-formed one (then it is the caller's to show: a training never dies of its
        tracking)."""
        call = parse_line(line)
        if call is None:
            return False
        name, args = call
        getattr(self, name)(*args)  # only queues the call
        return True

    def _stage_run(self) -> StageRun:
        if self._run is None:
            self._run = StageRun(Tracker(self._tracking_uri), self.run_id)
        return self._run

    @staticmethod
    def _safely(what: str, call, *args) -> bool:
        try:
            call(*args)
            return True
        except Exception as exc:
            print(f"warning: MLflow {what} failed, training goes on: {first_line(exc, limit=200)}",
                  file=sys.stderr, flush=True)  # fmt: skip
            return False

    def _send_loop(self) -> None:
        """Carry out the queued calls until None; ("resend",) sends the failed metrics again."""
        while True:
            items = [self._pending.get()]
            while not self._pending.empty():
                items.append(self._pending.get())
            metrics: list = []  # metric items in a row go out together
            for item in items:
                if self._give_up.is_set():
                    return
                if item is not None and item[0] == "metrics":
                    metrics.append(item[1])
                    continue
                self._send_metrics(metrics)
                metrics = []
                if item is None:
                    return
                name, *args = item
                if name == "resend":
                    self._resend_failed()
                else:
                    self._safely(name, self._call, name, *args)
            self._send_metrics(metrics)

    def _call(self, name: str, args: tuple) -> None:
        getattr(self._stage_run(), name)(*args)

    def _send_metrics(self, items: list) -> None:
        if not items:
            return
        from mlflow.entities import Metric

        metrics = [Metric(key, value, ms, step) for values, step, ms in items
                   for key, value in values.items()]  # fmt: skip
        for i in range(0, len(metrics), self._MAX_METRICS):
            batch = metrics[i : i + self._MAX_METRICS]
            if not self._safely("log_metrics", self._log_batch, batch):
                self._failed.append(batch)

    def _log_batch(self, batch: list) -> None:
        self._stage_run().client.log_batch(self.run_id, metrics=batch)

    def _resend_failed(self) -> None:
        failed, self._failed = self._failed, []
        if not failed:
            return
        resent = sum(self._safely("log_metrics", self._log_batch, batch) for batch in failed)
        message = (
            f"warning: {len(failed)} metric batch(es) failed while MLflow was away; "
            f"{resent} of them sent at the end of training"
        )
        print(message, file=sys.stderr, flush=True)

    def _stop_sender(self, timeout: float | None = None) -> None:
        if self._sender.is_alive():
            self._pending.put(None)
            self._sender.join(timeout)

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Carry out the calls still waiting, then send again, once, the metrics that failed.

        Waits on MLflow `timeout` seconds at most: a server that is away could otherwise hold
        the end of a training for minutes. What is not sent by then is given up, with a warning.
        """
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._stop_sender)
        self._pending.put(("resend",))
        self._stop_sender(timeout)
        _client_defaults.leave()
        if self._sender.is_alive():
            self._give_up.set()  # the call under way is MLflow's; the rest are dropped
            print(f"warning: MLflow did not take the last tracking calls within {timeout:.0f} s; "
                  "they are given up (every evaluation is in summary.json)", file=sys.stderr,
                  flush=True)  # fmt: skip


class LineRun:
    """Rank 0's run when its launcher logs for it ($GPTPIPE_TRACK_STDOUT): each call is printed as
    one line, LINE_MARK + JSON, which the launcher reads anyway and hands to its own
    `TrainingRun.log_line`. So the training process never imports MLflow (about 1.5 s of CPU
    at start-up on these machines) nor waits on it."""

    run_id = None

    def _print(self, *call: Any) -> None:
        print(LINE_MARK + json.dumps(call, default=str), flush=True)

    def log_params(self, params: dict[str, Any]) -> None:
        self._print("log_params", params)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._print("log_text", text, artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self._print("log_dict", data, artifact_file)

    def log_artifact_bytes(self, data: bytes, artifact_file: str) -> None:
        self._print("log_artifact_bytes", base64.b64encode(data).decode("ascii"), artifact_file)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        values = {key: float(value) for key, value in metrics.items()}
        self._print("log_metrics", values, step, int(time.time() * 1e3))

    def close(self) -> None:
        pass


def training_run(is_main: bool) -> TrainingRun | LineRun | NullRun:
    """Rank 0's run: printed for the launcher ($GPTPIPE_TRACK_STDOUT), or its own connection to
    the run named in $GPTPIPE_MLFLOW_RUN_ID; other ranks, and runs with neither, log nothing."""
    if not is_main:
        return NullRun()
    if os.environ.get(TRACK_STDOUT_ENV):
        return LineRun()
    run_id = os.environ.get(RUN_ID_ENV)
    if not run_id:
        return NullRun()
    return TrainingRun(os.environ.get("MLFLOW_TRACKING_URI"), run_id)
