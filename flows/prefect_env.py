"""Prefect's temporary server, started at the beginning of `gptpipe run` rather than at the flow.

With no Prefect API configured, Prefect starts a temporary local server when the first flow runs:
this process imports Prefect's server code (about 2 s on our 2-core machines) only to launch it,
then waits about 3 s for the server process to import the same and answer /health. Nothing else
happens meanwhile. `gptpipe run` launches that same server process (the command line and
environment of Prefect's `SubprocessASGIServer`) right after the command line is parsed, so that
it boots while this process checks the settings (importing torch), imports MLflow and checks the
store and the tracking server (a request whose settings are refused stops it again);
just before the flow starts it waits for /health and points Prefect at it (PREFECT_API_URL in
this process's environment, so that worker processes use it too).

Nothing changes when an API is configured (PREFECT_API_URL from the environment, a profile or
prefect.toml) or the temporary server is disabled: then nothing is started here. If the early
server does not come up, it is stopped and Prefect starts its own as before. It is stopped when
the process exits, after Prefect's log and event workers have flushed (they register their exit
handlers later, so theirs run first), like Prefect's own. Unlike Prefect's own, it runs in a
session of its own, so that a Ctrl-C or a SIGTERM to the command's process group does not stop it
while the interrupted flow still reports to it; if this process is killed, it ends too.
"""

from __future__ import annotations

import atexit
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request

from model.launch.lifeline import die_with_parent

# uvicorn's exit status when it cannot bind its port (Prefect retries another port on it)
_PORT_IN_USE = 3


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    """A free port in Prefect's range for its temporary server (8000-8999)."""
    for _ in range(50):
        port = random.randrange(8000, 9000)
        if _port_is_free(port):
            return port
    raise RuntimeError("no free port for Prefect's temporary server")


class TemporaryServer:
    """Prefect's temporary server process, launched ahead of the flow."""

    def __init__(self, settings) -> None:
        self._settings = settings
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.in_use = False
        self._launch()
        atexit.register(self.stop)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _launch(self) -> None:
        import prefect

        self.port = _free_port()
        # what prefect.server.api.server.SubprocessASGIServer runs
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(prefect.__module_path__.parent),
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ]
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **self._settings.to_environment_variables(exclude_unset=True),
        }
        # a session of its own: a terminal's Ctrl-C and `timeout`'s SIGTERM go to this command's
        # process group, and the server must outlive them so that the flow can record how it
        # ended; it is stopped at exit (`stop`), and dies with this process if that is killed
        self.process = subprocess.Popen(
            cmd, env=env, start_new_session=True, preexec_fn=die_with_parent()
        )

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def wait(self) -> bool:
        """Wait until the server answers /health; False if it does not come up in time."""
        deadline = time.monotonic() + self._settings.server.ephemeral.startup_timeout_seconds
        while time.monotonic() < deadline and self.process is not None:
            code = self.process.poll()
            if code == _PORT_IN_USE:  # another process took the port meanwhile
                self._launch()
                continue
            if code is not None:
                return False
            if self._healthy():
                return True
            time.sleep(0.05)
        return False

    def use(self) -> None:
        """Point Prefect (and child processes) at this server once it answers; if it does not,
        stop it and leave Prefect to start its own temporary server as usual."""
        if os.environ.get("PREFECT_API_URL"):  # set meanwhile: that one wins
            self.stop()
            return
        if not self.wait():
            self.stop()
            return
        from prefect.context import refresh_global_settings_context
        from prefect.logging import get_logger

        os.environ["PREFECT_API_URL"] = self.api_url
        if self._settings.ui_url is None:
            # the temporary server serves no UI: no "View at" link to a page that is not there
            os.environ["PREFECT_UI_URL"] = ""
        refresh_global_settings_context()
        self.in_use = True
        get_logger().info(
            "Using a temporary server on http://127.0.0.1:%s\nSee %s for more information on "
            "running a dedicated Prefect server.",
            self.port,
            "https://www.prefect.io/docs/v3/concepts/server#how-to-guides",
        )

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if self.in_use:
            from prefect.logging import get_logger

            get_logger().info("Stopping temporary server on http://127.0.0.1:%s", self.port)
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if self.in_use and os.environ.get("PREFECT_API_URL") == self.api_url:
            del os.environ["PREFECT_API_URL"]
            if self._settings.ui_url is None:
                os.environ.pop("PREFECT_UI_URL", None)
        self.in_use = False


def start_temporary_server() -> TemporaryServer | None:
    """Launch Prefect's temporary server now if Prefect would start one for the flow, else None.

    Call `.use()` on the result just before the flow runs.
    """
    if os.environ.get("PREFECT_API_URL"):
        return None
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return None
    try:
        return TemporaryServer(settings)
    except (OSError, RuntimeError):  # no free port, no process: Prefect tries on its own later
        return None
