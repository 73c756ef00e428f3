"""Start training on a Ray cluster: `model.train`'s loop in N Ray Train workers (TorchTrainer).

The torchrun launcher's (`model.launch.torchrun`) counterpart for clusters. Ray Train starts
one worker process per rank, on whichever nodes have the resources (one GPU per worker where the
cluster has GPUs, else one CPU), sets the variables torchrun would set (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR...) and joins the torch process group (nccl, or gloo
on CPUs) before our function runs. `model.dist.setup` then finds that group, so
`model.train.train` runs unchanged: the same batches of (seed, step, rank, world size), the same
checkpoints and summary written by rank 0 to the store.

Faults: when a worker dies, Ray Train (`FailureConfig.max_failures`) starts the workers again;
every start after the first resumes from the checkpoint in the store, as `--resume` does.
Tracking: rank 0's output lines, the `model.launch.protocol` messages among them (tracking calls,
evaluations), are relayed to this process through a small actor and read as torchrun's stdout is
(`model.launch.reader.RankOutput`), so MLflow is reached from the driver only, training never
waits on it, and the metrics of steps a restarted attempt computes again are sent once.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

import torch

import storage
from model import dist
from model.config import TrainConfig, config_from_dict
from model.launch.protocol import LINE_MARK, parse_line
from model.launch.reader import RankOutput
from model.launch.torchrun import TO_STDOUT, Listeners
from model.machine import usable_cores
from model.train import SUMMARY_NAME, TrainingData, train
from storage.errors import GptpipeError, first_line

# Restarts of the workers after a failure (a dead process, a lost node) before the run fails
MAX_FAILURES = 2
# How often the driver collects rank 0's relayed lines
POLL_S = 0.25
INSTALL_HINT = "pip install 'gptpipe[ray]'"
# Given to the Ray workers (runtime_env env_vars) when set here: the store's credentials and
# endpoint, and gptpipe's own settings. Other variables come from the workers' own environment.
FORWARDED_ENV_PREFIXES = ("AWS_", "GPTPIPE_")


def import_ray():
    """The `ray` module with Ray Train importable, or a one-line error saying what to install."""
    try:
        import ray
        import ray.train.torch  # noqa: F401 - TorchTrainer, and Ray Train's own dependencies
    except ImportError as exc:
        missing = getattr(exc, "name", None) or first_line(exc)
        raise GptpipeError(
            f"--train-engine ray needs ray[train] (cannot import {missing}): {INSTALL_HINT}"
        ) from None
    return ray


def check_address(address: str) -> None:
    """A Ray address (HOST:PORT of the head's GCS, or ray://HOST:PORT of its Ray Client server)
    that does not answer is a one-line error here, not a minute of Ray retrying."""
    if address in ("auto", "local"):
        return  # Ray finds it itself (`ray start` on this machine), or starts one
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise GptpipeError(
            f"--ray-address {address}: expected HOST:PORT or ray://HOST:PORT (e.g. head:6379)"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=10):
            pass
    except OSError as exc:
        raise GptpipeError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}): start it or "
            "fix --ray-address"
        ) from None


def plan_workers(nproc: int, device: str, resources: dict[str, float], where: str) -> bool:
    """Whether the workers take one GPU each (else one CPU each), from the cluster's total
    resources; a cluster with fewer than nproc of them is a one-line error."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if device == "cuda" and gpus == 0:
        raise GptpipeError(f"device=cuda, but {where} has no GPUs: use --set device=cpu (or auto)")
    use_gpu = gpus > 0 and device != "cpu"
    kind, have = ("GPU", gpus) if use_gpu else ("CPU", cpus)
    if nproc > have:
        raise GptpipeError(
            f"--nproc {nproc} asks for {nproc} Ray Train workers of one {kind} each, but {where} "
            f"has {have} {kind}(s): lower --nproc or add nodes"
        )
    return use_gpu


def local_resources() -> dict[str, float]:
    """What a local cluster started for the run gets: this machine's usable cores and GPUs."""
    return {"CPU": usable_cores(), "GPU": torch.cuda.device_count()}


def check_ray_training(address: str | None, nproc: int, device: str = "auto") -> bool:
    """Everything `launch_ray_training` needs, checked before any work: Ray Train installed, the
    cluster reachable and big enough. Returns whether the workers will take GPUs."""
    ray = import_ray()
    if not address:
        return plan_workers(nproc, device, local_resources(), "this machine")
    check_address(address)
    connected = connect(address)
    try:
        return plan_workers(nproc, device, ray.cluster_resources(), f"the Ray cluster at {address}")
    finally:
        if connected:
            ray.shutdown()


def connect(address: str | None) -> bool:
    """Connect this process to the cluster at address, or start a local one (no dashboard, no
    usage report); returns whether it did (False: already connected, e.g. by prefect-ray)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    options: dict[str, Any] = {"log_to_driver": False}
    if not address:
        local = local_resources()
        options.update(num_cpus=local["CPU"], num_gpus=local["GPU"], include_dashboard=False)
    try:
        # "local": a new instance, never one that `ray start` left on this machine
        ray.init(address=address or "local", **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise GptpipeError(f"cannot connect to {where}: {first_line(exc)}") from None
    return True


class _Relay:
    """A Ray actor beside the workers: counts their starts and keeps rank 0's lines for the
    driver. Rank 0 sends each line without waiting for an answer (Ray runs one caller's calls
    to an actor in order), so printing costs the training no round trip."""

    def __init__(self) -> None:
        self.starts = 0
        self.lines: list[str] = []

    def start(self) -> int:
        self.starts += 1
        return self.starts

    def put(self, line: str) -> None:
        self.lines.append(line)

    def take(self) -> list[str]:
        taken, self.lines = self.lines, []
        return taken


class _RelayedStdout(io.TextIOBase):
    """sys.stdout of rank 0 inside a worker: whole lines go to the relay actor."""

    def __init__(self, relay) -> None:
        self.relay, self.partial = relay, ""

    def isatty(self) -> bool:
        return False  # progress as lines, not a bar

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            self.relay.put.remote(line)
        return len(text)


def _train_worker(spec: dict[str, Any]) -> None:
    """The function each Ray Train worker runs: `model.train.train` on the process group Ray
    has made. Every start after the first (a restart after a failure) resumes from the store's
    checkpoint; rank 0 decides and tells the others, so all ranks always agree."""
    import ray

    relay = spec["relay"]
    cfg = config_from_dict(spec["config"])
    info = dist.setup(spec["device"])
    restarted = dist.broadcast_from_main(lambda: ray.get(relay.start.remote()) > 1, info)
    out = _RelayedStdout(relay) if info.is_main else None
    try:
        with contextlib.redirect_stdout(out) if out else contextlib.nullcontext():
            train(
                cfg,
                spec["out"],
                inputs=TrainingData(*spec["inputs"]),
                info=info,
                resume=spec["resume"] or restarted,
                track_stdout=spec["track"],
            )
    except GptpipeError as exc:
        relay.put.remote(f"error: {exc}")  # the driver's one-line error, from any rank
        raise
    dist.teardown(ok=True)


class _OnceMetrics:
    """Drops the metric values of a (name, step) already sent: an attempt restarted from a
    checkpoint computes (the same values for) the steps since that checkpoint again."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, int]] = set()

    def __call__(self, line: str) -> str | None:
        call = parse_line(line)
        if call is None or call[0] != "log_metrics":
            return line
        values, step, ms = call[1]
        fresh = {k: v for k, v in values.items() if (k, step) not in self.seen}
        self.seen.update((k, step) for k in fresh)
        return LINE_MARK + json.dumps(["log_metrics", fresh, step, ms]) if fresh else None


def launch_ray_training(
    cfg: TrainConfig,
    out_uri: str,
    *,
    inputs: TrainingData,
    nproc: int = 1,
    address: str | None = None,
    resume: bool = False,
    listeners: Listeners = TO_STDOUT,
    max_failures: int = MAX_FAILURES,
) -> dict:
    """Run training in nproc Ray Train workers to the end; return its summary (as
    `model.launch.torchrun.launch_training` does, with the same arguments where they mean the same).

    address: a running cluster (HOST:PORT, ray://HOST:PORT), or None for a local cluster of
    this machine, started here for this training and stopped after it (which also stops a
    training that ``listeners.on_line`` or ``on_eval`` ended early; on a cluster this process
    did not connect to itself, e.g. prefect-ray's, such a training runs on to its end). The
    workers need gptpipe installed (the same version); the store's credentials
    (`FORWARDED_ENV_PREFIXES`) are passed on in their runtime environment.
    """
    ray = import_ray()
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if address:
        check_address(address)
    connected = connect(address)
    try:
        where = f"the Ray cluster at {address}" if address else "the local Ray cluster"
        use_gpu = plan_workers(nproc, cfg.device, ray.cluster_resources(), where)
        relay = ray.remote(num_cpus=0)(_Relay).remote()
        run = listeners.training_run()
        spec = {
            "config": cfg.to_dict(),
            "out": out_uri,
            "inputs": [inputs.train_uri, inputs.val_uri, inputs.tokenizer_uri],
            "resume": resume,
            "track": run is not None,
            "device": cfg.device if use_gpu else "cpu",
            "relay": relay,
        }
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config=spec,
            scaling_config=ScalingConfig(num_workers=nproc, use_gpu=use_gpu),
            run_config=RunConfig(
                name=f"gptpipe-train-{uuid.uuid4().hex[:8]}",
                failure_config=FailureConfig(max_failures=max_failures),
                worker_runtime_env={"env_vars": env},
            ),
        )
        try:
            _fit_relaying(trainer, relay, listeners.output(run))
        finally:
            if run is not None:
                run.close()  # what is still queued, and metrics that failed, are sent now
    finally:
        if connected:
            ray.shutdown()  # also stops a training still running (its actors are ours)
    return json.loads(storage.get_bytes(storage.join(out_uri, SUMMARY_NAME)))


def _fit_relaying(trainer, relay, output: RankOutput) -> None:
    """trainer.fit() in a thread while this one hands rank 0's relayed lines on; a failed
    training is its first `error:` line (a GptpipeError), else its error and last lines."""
    import ray

    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            failure.append(exc)

    fitting = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    fitting.start()
    once = _OnceMetrics()
    while True:
        done = not fitting.is_alive()  # read before the last take: no line is left behind
        lines = [kept for line in ray.get(relay.take.remote()) if (kept := once(line))]
        output.read(lines)
        if done:
            break
        time.sleep(POLL_S)
    if not failure:
        return  # an attempt's error that a restart got past is no failure
    error = output.failure(f"Ray Train failed: {first_line(failure[0])}")
    if isinstance(error, GptpipeError):
        raise error  # the training's own one-line error
    raise error from failure[0]


TRAIN_ENGINES = ("torchrun", "ray")


def check_train_engine(
    engine: str, address: str | None = None, *, nproc: int = 1, device: str = "auto"
) -> None:
    """`--train-engine` and what it needs, before any work: torchrun needs nothing more, ray
    its install and a reachable cluster with the resources for nproc workers."""
    if engine not in TRAIN_ENGINES:
        raise GptpipeError(f"--train-engine {engine}: choose one of {', '.join(TRAIN_ENGINES)}")
    if engine == "ray":
        check_ray_training(address, nproc, device)
