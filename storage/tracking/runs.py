"""Runs by id through `MlflowClient`: the Tracker (one server, one experiment), StageRun, NullRun.

Everything goes through `MlflowClient` with explicit run ids, never MLflow's "active run": stages
run in Prefect tasks and training in other processes, where a thread-local active run would point
at the wrong run or at none.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from storage.errors import GptpipeError, first_line
from storage.tracking.health import check_health
from storage.tracking.naming import DEFAULT_EXPERIMENT
from storage.tracking.new_database import create_from_template
from storage.tracking.params import flatten_params
from storage.tracking.redact import redact

PARENT_TAG = "mlflow.parentRunId"
# how often the train run samples system metrics (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides)
SYSTEM_METRICS_INTERVAL_S = 5.0


def end_status(exc: BaseException) -> str:
    """The MLflow status of a run ended by ``exc``: the exception's own ``mlflow_status`` if it
    has one (a training stopped on purpose: KILLED); KILLED for a run stopped from outside (an
    interrupt: KeyboardInterrupt, SystemExit, a termination signal, a cancellation, which are
    BaseExceptions but not Exceptions); FAILED for an error."""
    status = getattr(exc, "mlflow_status", None)
    if status:
        return status
    return "FAILED" if isinstance(exc, Exception) else "KILLED"


# how long a process waits for another that is creating the same sqlite database
SQLITE_CREATE_WAIT_S = 120


@contextmanager
def _sqlite_created_alone(tracking_uri: str | None) -> Iterator[Path | None]:
    """For a ``sqlite:///PATH`` URI: the block runs while no other process holds the lock file
    beside the database (``PATH.lock``, flock), and is given PATH. MLflow creates a new
    database's schema when its first client opens it (alembic's migrations), and two runs
    starting together on a database that does not exist yet would both migrate it: one of them
    dies. A tracking server needs nothing of this (it migrates once, when it starts)."""
    path = (tracking_uri or "").removeprefix("sqlite:///")
    if path == (tracking_uri or "") or not path or path.startswith(":memory:"):
        yield None
        return
    import fcntl

    lock_path = Path(path).with_name(Path(path).name + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(lock_path, "a")  # noqa: SIM115 - closed below, which also unlocks
    except OSError as exc:
        raise GptpipeError(
            f"cannot create the tracking database's lock file {lock_path}: {exc.strerror or exc}"
        ) from None
    with lock:
        deadline = time.monotonic() + SQLITE_CREATE_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise GptpipeError(
                        f"another process has held {lock_path} for {SQLITE_CREATE_WAIT_S} s "
                        "while opening the tracking database: is it stuck? (remove the lock "
                        "file if no gptpipe or mlflow process is running)"
                    ) from None
                time.sleep(0.1)
        yield Path(path)


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    # the registry lives on the tracking server too (MLflow may default it elsewhere)
    try:
        with _sqlite_created_alone(tracking_uri) as path:
            if path is not None and "?" not in path.name and not path.exists():
                create_from_template(path)  # MLflow's empty schema without its migrations
            return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    except Exception as exc:  # MLflow raises KeyError-chained errors for an unknown scheme
        scheme = (tracking_uri or "").partition("://")[0]
        raise GptpipeError(
            f"MLflow cannot use the tracking URI {redact(tracking_uri or '')!r} "
            f"({f'no {scheme}:// store' if '://' in (tracking_uri or '') else first_line(exc)}): "
            "use http(s)://HOST:PORT, sqlite:///PATH or a folder (--tracking-uri / "
            "MLFLOW_TRACKING_URI)"
        ) from None


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
            if found is None:
                try:
                    self._experiment_id = self.client.create_experiment(self.experiment)
                    return self._experiment_id
                except Exception:  # RESOURCE_ALREADY_EXISTS: another run created it meanwhile
                    found = self.client.get_experiment_by_name(self.experiment)
                    if found is None:
                        raise
            self._experiment_id = found.experiment_id
        return self._experiment_id

    def check(self) -> None:
        """Fail early, with one line, when the tracking server cannot be used.

        A server is first asked for /health with a short timeout: MLflow's own client retries a
        dead server with backoff for minutes before it gives up.
        """
        if self.tracking_uri.startswith(("http://", "https://")):
            check_health(self.tracking_uri)
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
        """A nested run for one stage; FINISHED when the block ends, FAILED when it raises, KILLED
        when it is interrupted or stopped on purpose (`end_status`)."""
        run = StageRun(self, self.start_run(name, parent_id))
        start = time.perf_counter()
        try:
            yield run
        except BaseException as exc:
            run.log_metrics({"duration_s": time.perf_counter() - start})
            self.client.set_terminated(run.run_id, end_status(exc))
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

        items = [Param(k, v) for k, v in flatten_params(params).items()]
        self.client.log_batch(self.run_id, params=items)  # log_batch sends in batches it can take

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
        """Register a dataset as the run's MLflow input (context: tokenize, training, evaluation).

        The run shows it under Inputs in the UI, and `search_runs` can filter on it; the source
        is the dataset's URI with any credentials taken out.
        """
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = MetaDataset(_dataset_source(redact(uri)), name=name, digest=digest[:36])
        entity = DatasetInput(
            Dataset(**dataset.to_dict()), tags=[InputTag("mlflow.data.context", context)]
        )
        self.client.log_inputs(self.run_id, datasets=[entity])

    @contextmanager
    def system_metrics(self, *, interval_s: float = SYSTEM_METRICS_INTERVAL_S) -> Iterator[None]:
        """MLflow's system metrics (system/cpu_utilization_percentage, memory, disk, network, and
        GPU where pynvml finds one) sampled every `interval_s` into this run while the block runs.

        The monitor is MLflow's own (what `log_system_metrics=True` starts); it reads the whole
        machine, so the stage process can watch a training that runs in torchrun's processes.
        """
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            self.run_id, sampling_interval=interval_s, tracking_uri=self.tracker.tracking_uri
        )
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()


class NullRun:
    """What code run without tracking logs into (a stage without MLflow, ranks other than 0):
    every call does nothing."""

    run_id = None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None

    def system_metrics(self, **kwargs) -> contextlib.nullcontext:
        return contextlib.nullcontext()


def _dataset_source(uri: str):
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.sources import LocalArtifactDatasetSource, S3ArtifactDatasetSource

    if uri.startswith(("http://", "https://")):
        return HTTPDatasetSource(uri)
    if uri.startswith("s3://"):
        return S3ArtifactDatasetSource(uri)
    return LocalArtifactDatasetSource(os.path.abspath(uri))
