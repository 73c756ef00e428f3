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

    url, headers = _without_credentials(tracking_uri.rstrip("/") + "/health")
    try:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=HEALTH_TIMEOUT_S):
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


def _without_credentials(url: str) -> tuple[str, dict[str, str]]:
    """http://USER:PASSWORD@HOST/... as the URL without them and a basic-auth header: urllib
    takes `USER:PASSWORD@HOST` for a host name (MLflow's own requests send them as basic auth)."""
    import base64
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    if parts.username is None:
        return url, {}
    netloc = parts.netloc.rpartition("@")[2]
    user, password = unquote(parts.username), unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return parts._replace(netloc=netloc).geturl(), {"Authorization": f"Basic {token}"}
