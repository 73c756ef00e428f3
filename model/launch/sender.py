"""The train stage's sender: `TrainingRun` queues rank 0's tracking calls and one thread sends them.

Only rank 0 of a training logs: through its launcher (the pipeline's train stage reads rank 0's
calls from its output, `model.launch.protocol`), or itself when given a run id (multi-node).
Either way the training never waits on MLflow or dies of it.
"""

from __future__ import annotations

import atexit
import queue
import sys
import threading
import time
from contextlib import ExitStack
from typing import Any

from model.launch.protocol import parse_line
from storage.errors import first_line
from storage.tracking import StageRun, Tracker, mlflow_client_settings

# How long closing a TrainingRun (the end of a training) waits on MLflow at most
CLOSE_TIMEOUT_S = 60.0


class TrainingRun:
    """The train stage's run as seen from rank 0: training never waits on MLflow or dies of it.

    Used by the launcher, for the calls rank 0 prints (`LineRun`, `log_line`), or by rank 0
    itself when given a run id (multi-node). Every call is queued and carried out, in order, by
    one thread of this class, which also connects to MLflow on first use. Metrics waiting
    together go out as one request. If the server is away, a call fails with a warning on
    stderr and training goes on; failed metric batches are sent again at the end of training
    (the server may be back by then), and every evaluation is kept in the checkpoint and
    summary.json all the same. While the run is open, MLflow's client gives up on a call after
    MLFLOW_CLIENT_DEFAULTS (`mlflow_client_settings`), and `close()` waits on MLflow
    CLOSE_TIMEOUT_S at most.

    (MLflow's own asynchronous logging would do for metrics, but its thread polls its queue once
    a second and is joined at exit: up to a second added to every training process's exit.)
    """

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
        self._settings = ExitStack()  # MLflow's client settings, while the run is open
        self._settings.enter_context(mlflow_client_settings())
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
            print(
                f"warning: MLflow {what} failed, training goes on: {first_line(exc, limit=200)}",
                file=sys.stderr,
                flush=True,
            )
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

        metrics = [
            Metric(key, value, ms, step)
            for values, step, ms in items
            for key, value in values.items()
        ]
        # log_batch sends them in batches the server takes (1,000 metrics each)
        if not self._safely("log_metrics", self._log_batch, metrics):
            self._failed.append(metrics)

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
        self._settings.close()
        if self._sender.is_alive():
            self._give_up.set()  # the call under way is MLflow's; the rest are dropped
            print(
                f"warning: MLflow did not take the last tracking calls within {timeout:.0f} s; "
                "they are given up (every evaluation is in summary.json)",
                file=sys.stderr,
                flush=True,
            )
