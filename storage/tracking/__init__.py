"""MLflow tracking for pipeline runs: one parent run, one nested run per stage, the registry.

One module per job; the names other modules use are re-exported here:

- redact: credentials out of URIs and text (`redact`, `redact_text`)
- params: values as MLflow takes them (`flatten_params`, `dumps`)
- naming: names in MLflow (`DEFAULT_EXPERIMENT`, `model_name_for`)
- health: the tracking server's /health check (`check_health`)
- runs: `Tracker` (one server and experiment), `StageRun` (logging into one run by id),
  `NullRun` (logging nothing) and `end_status` (how a run that raised ends: FAILED, or KILLED
  when interrupted)
- settings: MLflow's client retry/timeout settings (`mlflow_client_settings`)

How a training's rank 0 logs (its line protocol, the launcher's background sender) is
`model.launch`'s: protocol, sender, rank.

Importing this package does not import MLflow: a training process never loads it.
"""

from storage.tracking.health import check_health
from storage.tracking.naming import DEFAULT_EXPERIMENT, model_name_for
from storage.tracking.params import dumps, flatten_params
from storage.tracking.redact import redact, redact_text
from storage.tracking.runs import PARENT_TAG, NullRun, StageRun, Tracker, end_status
from storage.tracking.settings import MLFLOW_CLIENT_DEFAULTS, mlflow_client_settings

__all__ = [
    "DEFAULT_EXPERIMENT",
    "MLFLOW_CLIENT_DEFAULTS",
    "PARENT_TAG",
    "NullRun",
    "StageRun",
    "Tracker",
    "check_health",
    "dumps",
    "end_status",
    "flatten_params",
    "mlflow_client_settings",
    "model_name_for",
    "redact",
    "redact_text",
]
