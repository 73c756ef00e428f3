"""MLflow tracking for pipeline runs: one parent run, one nested run per stage, the registry.

One module per job; the names other modules use are re-exported here:

- redact: credentials out of URIs and text (`redact`, `redact_text`)
- params: values as MLflow takes them (`flatten_params`, `dumps`)
- naming: names in MLflow (`DEFAULT_EXPERIMENT`, `model_name_for`)
- health: the tracking server's /health check (`check_health`)
- runs: `Tracker` (one server and experiment), `StageRun` (logging into one run by id) and
  `end_status` (how a run that raised ends: FAILED, or KILLED when interrupted)
- protocol: rank 0's stdout line protocol (`LineRun`, `parse_line`, `LINE_MARK`)
- settings: MLflow's client retry/timeout settings (`mlflow_client_settings`)
- sender: `TrainingRun`, the background sender of a training's calls
- training: which run rank 0 logs into (`training_run`, `NullRun`)

Importing this package does not import MLflow: a training process that only prints its calls
(`LineRun`) never loads it.
"""

from storage.tracking.health import check_health
from storage.tracking.naming import DEFAULT_EXPERIMENT, model_name_for
from storage.tracking.params import dumps, flatten_params
from storage.tracking.protocol import LINE_CALLS, LINE_MARK, LineRun, parse_line
from storage.tracking.redact import redact, redact_text
from storage.tracking.runs import PARENT_TAG, StageRun, Tracker, end_status
from storage.tracking.sender import CLOSE_TIMEOUT_S, TrainingRun
from storage.tracking.settings import MLFLOW_CLIENT_DEFAULTS, mlflow_client_settings
from storage.tracking.training import RUN_ID_ENV, NullRun, training_run

__all__ = [
    "CLOSE_TIMEOUT_S",
    "DEFAULT_EXPERIMENT",
    "LINE_CALLS",
    "LINE_MARK",
    "MLFLOW_CLIENT_DEFAULTS",
    "PARENT_TAG",
    "RUN_ID_ENV",
    "LineRun",
    "NullRun",
    "StageRun",
    "Tracker",
    "TrainingRun",
    "check_health",
    "dumps",
    "end_status",
    "flatten_params",
    "mlflow_client_settings",
    "model_name_for",
    "parse_line",
    "redact",
    "redact_text",
    "training_run",
]
