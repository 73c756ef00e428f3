"""Where the pipeline's mapped tasks run: Prefect's default thread pool, a Dask cluster
(prefect-dask) or a Ray cluster (prefect-ray). The engines are optional extras of the package:
``pip install 'gptpipe[dask]'`` or ``'gptpipe[ray]'``.
"""

from __future__ import annotations

import os

from storage.errors import GptpipeError

TASK_RUNNERS = ("default", "dask", "ray")


def resolve_task_runner(
    name: str, dask_address: str | None = None, ray_address: str | None = None
) -> tuple[str, str | None]:
    """The task runner and the cluster address to use: an address implies its runner.

    The one rule for the CLI (``--dask-address``) and the nightly flow (``dask_address``): a
    Dask address with runner "default" means "dask", a Ray address "ray"; an address of the
    other engine, or both addresses, is an error.
    """
    if dask_address and ray_address:
        raise GptpipeError("give --dask-address or --ray-address, not both")
    implied = "dask" if dask_address else "ray" if ray_address else None
    if implied is None:
        return name, None
    if name not in ("default", implied):
        raise GptpipeError(f"--{implied}-address goes with --task-runner {implied}, not {name}")
    return implied, dask_address or ray_address


def check_task_runner(name: str, address: str | None, workers: int | None) -> None:
    """Fail early, with what to fix, on settings that cannot make a task runner."""
    if name not in TASK_RUNNERS:
        raise GptpipeError(f"--task-runner {name}: choose one of {', '.join(TASK_RUNNERS)}")
    if name == "default" and (address or workers):
        raise GptpipeError(
            "--dask-address and --workers need --task-runner dask or --task-runner ray"
        )
    if workers is not None and workers < 1:
        raise GptpipeError(f"--workers must be at least 1, got {workers}")
    if address and workers:
        raise GptpipeError("--workers starts a local cluster; it cannot go with --dask-address")
    if name != "default":
        _import_runner(name)
    if address:
        _check_reachable(name, address)


def _check_reachable(name: str, address: str) -> None:
    """A cluster address that does not answer is a one-line error, not a traceback at flow start."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise GptpipeError(f"--{name}-address {address}: expected HOST:PORT (e.g. tcp://host:8786)")
    try:
        with socket.create_connection((host, port), timeout=10):
            pass
    except OSError as exc:
        raise GptpipeError(
            f"cannot reach the {name.capitalize()} cluster at {address} ({exc.strerror or exc}): "
            f"start it or fix --{name}-address"
        ) from None


def _import_runner(name: str):
    module, cls, extra = {
        "dask": ("prefect_dask", "DaskTaskRunner", "dask"),
        "ray": ("prefect_ray", "RayTaskRunner", "ray"),
    }[name]
    try:
        return getattr(__import__(module), cls)
    except ImportError:
        raise GptpipeError(
            f"--task-runner {name} needs the {module.replace('_', '-')} package: "
            f"pip install 'gptpipe[{extra}]'"
        ) from None


def make_task_runner(name: str = "default", address: str | None = None, workers: int | None = None):
    """A Prefect task runner, or None for the flow's default (a thread pool in this process)."""
    check_task_runner(name, address, workers)
    if name == "default":
        return None
    runner_class = _import_runner(name)
    n_workers = workers or os.cpu_count() or 1
    if name == "dask":
        if address:
            return runner_class(address=address)
        # one single-threaded worker process per core: tokenizing holds the GIL
        # memory_limit=0: no spill folder. Dask names it `storage` inside the worker's folder,
        # which is first on the worker's sys.path and would shadow our `storage` package.
        cluster = {
            "n_workers": n_workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
            "memory_limit": 0,
        }
        return runner_class(cluster_kwargs=cluster)
    if address:
        return runner_class(address=address)
    return runner_class(init_kwargs={"num_cpus": n_workers, "include_dashboard": False})


def with_task_runner(
    flow, name: str = "default", address: str | None = None, workers: int | None = None
):
    """``flow`` set to run its tasks on the chosen engine."""
    runner = make_task_runner(name, address, workers)
    if runner is None:
        return flow
    share_temporary_server()
    return flow.with_options(task_runner=runner)


def share_temporary_server() -> None:
    """Without a Prefect server configured, start Prefect's temporary one here and export its URL,
    so that worker processes report their task runs to it instead of each starting their own.
    (The CLI has usually done so already, early: flows/prefect_env.py.)"""
    from flows.prefect_env import start_temporary_server

    server = start_temporary_server()
    if server:
        server.use()
