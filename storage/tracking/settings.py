"""MLflow's client retry and timeout settings, applied in one place: `mlflow_client_settings`.

MLflow 3 gives a client no settings of its own: `MlflowClient` -> `RestStore._call_endpoint` ->
`mlflow.utils.rest_utils.call_endpoint` -> `http_request(max_retries=None, timeout=None, ...)`,
which reads `mlflow.environment_variables.MLFLOW_HTTP_REQUEST_MAX_RETRIES` / `_TIMEOUT` (each an
`os.environ` lookup) at every request; `MlflowHostCreds` carries no such fields, and the
artifact uploads (`HttpArtifactRepository`) read the same variables. So the process environment
is the only way, and the context manager below is the one place it is changed.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

# MLflow's client retries a dead server for minutes by default (7 retries with backoff, 120 s
# timeout). A training's tracking gives up on a call sooner: it keeps its metrics and sends
# failed ones again at the end. Settings in the environment win.
MLFLOW_CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}

_lock = threading.Lock()
# name -> [blocks open that asked for it, the value this module put there or None]
_held: dict[str, list] = {}


@contextmanager
def mlflow_client_settings(values: Mapping[str, str] = MLFLOW_CLIENT_DEFAULTS) -> Iterator[None]:
    """MLflow client settings (environment variable -> value) in effect inside the block.

    They go into os.environ, since MLflow reads them nowhere else (see this module's docstring),
    and only where unset: a value the user set wins and is never touched. The first block open
    for a variable sets it, the last one to close restores what was there before (its absence),
    unless someone changed it in between; so blocks may overlap in any order (two TrainingRuns
    closed first-opened-first), and the process's other MLflow calls (the registry uploading a
    checkpoint after the training) keep MLflow's own, more patient settings. The environment is
    the process's: calls made by other threads while a block is open use these settings too.
    """
    names = list(values)
    with _lock:
        for name in names:
            held = _held.setdefault(name, [0, None])
            if held[0] == 0 and name not in os.environ:
                os.environ[name] = held[1] = str(values[name])
            held[0] += 1
    try:
        yield
    finally:
        with _lock:
            for name in names:
                held = _held[name]
                held[0] -= 1
                if held[0] == 0:
                    if held[1] is not None and os.environ.get(name) == held[1]:
                        del os.environ[name]
                    del _held[name]
