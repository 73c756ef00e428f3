"""Is the tracking server there? One short /health request, before MLflow's patient retries."""

from __future__ import annotations

from storage.errors import GptpipeError
from storage.tracking.redact import redact

HEALTH_TIMEOUT_S = 10


def check_health(tracking_uri: str) -> None:
    """Raise a one-line GptpipeError when the server at tracking_uri does not answer /health.

    A server behind auth (401, 403) counts as there: the real calls carry the credentials.
    """
    import urllib.error  # here: a training process imports this package, never calls this
    import urllib.request

    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT_S):
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
