"""Start training in child processes: `python -m model.train` for one rank, torchrun for more.

Children keep the parent free of process-group state and let torch elastic watch the ranks: if
one dies, torchrun stops the others instead of leaving them hanging in a collective. Rank 0's
output is read by `model.launch.reader.RankOutput` (its tracking calls and evaluations are
messages of `model.launch.protocol`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

import storage
from model.config import TrainConfig
from model.launch.lifeline import die_with_parent
from model.launch.protocol import Evaluation
from model.launch.reader import RankOutput
from model.launch.sender import TrainingRun
from model.train import SUMMARY_NAME, TRACK_STDOUT_ARG, TrainingData
from storage.errors import GptpipeError

# How long a child that was told to stop (SIGTERM) gets before it is killed; torchrun passes the
# signal on to its ranks and waits for them
STOP_GRACE_S = 30


def resolve_nproc(nproc: int | str, device: str = "auto") -> int:
    """``--nproc`` as a number of ranks: ``auto`` is one rank per visible GPU where training runs on
    GPUs (``device`` cuda, or auto with a GPU visible), else 1; a number is checked."""
    if nproc == "auto":
        on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        return max(torch.cuda.device_count(), 1) if on_gpu else 1
    if isinstance(nproc, bool) or not isinstance(nproc, int | str):
        raise GptpipeError(f"--nproc must be a whole number or auto, got {nproc!r}")
    if isinstance(nproc, str):
        if not nproc.strip().lstrip("-").isdigit():
            raise GptpipeError(f"--nproc must be a whole number or auto, got {nproc!r}")
        nproc = int(nproc)
    check_nproc(nproc, device)
    return nproc


def check_nproc(nproc: int, device: str = "auto") -> None:
    if nproc < 1:
        raise GptpipeError(f"--nproc must be at least 1, got {nproc}")
    if device == "cuda" and not torch.cuda.is_available():
        raise GptpipeError(
            "device=cuda, but no CUDA GPU is visible here: use --set device=cpu (or auto)"
        )
    wants_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if wants_gpu and nproc > torch.cuda.device_count():
        raise GptpipeError(
            f"--nproc {nproc} is more than the {torch.cuda.device_count()} GPU(s) here: "
            "lower --nproc or use --set device=cpu"
        )


RDZV_BACKENDS = ("c10d", "static")


@dataclass(frozen=True)
class Rendezvous:
    """Where the nodes of a multi-node training meet: torchrun's rendezvous (one node: unused).

    Several nodes meet at ``endpoint`` (HOST:PORT, the same on every node). With the c10d backend
    (torchrun's documented, fault-tolerant way) the store is hosted by the node whose address is
    HOST and global ranks are assigned at the rendezvous, so node_rank is not passed (torchrun
    ignores it there). With the static backend node_rank R gets global ranks R*nproc ..
    R*nproc+nproc-1: node 0 holds rank 0, which writes the outputs.
    """

    nnodes: int = 1
    node_rank: int = 0
    endpoint: str | None = None
    id: str = "gptpipe"
    backend: str = "c10d"

    def torchrun_args(self) -> list[str]:
        """torchrun's flags for this node; checks them with one-line errors."""
        if self.backend not in RDZV_BACKENDS:
            raise GptpipeError(
                f"rdzv_backend must be one of {', '.join(RDZV_BACKENDS)}, got {self.backend!r}"
            )
        if not 0 <= self.node_rank < self.nnodes:
            raise GptpipeError(f"node_rank must be in 0..{self.nnodes - 1}, got {self.node_rank}")
        host, sep, port = (self.endpoint or "").rpartition(":")
        if not sep or not host or not port.isdigit():
            raise GptpipeError(
                f"training on {self.nnodes} nodes needs rdzv_endpoint HOST:PORT (the same on "
                f"every node), got {self.endpoint!r}"
            )
        args = [
            f"--nnodes={self.nnodes}",
            f"--rdzv_backend={self.backend}",
            f"--rdzv_endpoint={self.endpoint}",
        ]
        if self.backend == "static":
            return [*args, f"--node_rank={self.node_rank}"]
        return [*args, f"--rdzv_id={self.id}"]


ONE_NODE = Rendezvous()


def train_command(nproc: int, rendezvous: Rendezvous = ONE_NODE) -> list[str]:
    """The launcher: nproc ranks on this machine, times the rendezvous' nodes if there are more."""
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    entry = [f"--nproc_per_node={nproc}", "-m", "model.train"]
    if rendezvous.nnodes > 1:
        return [*torchrun, *rendezvous.torchrun_args(), *entry]
    if nproc == 1:
        return [sys.executable, "-m", "model.train"]
    return [*torchrun, "--standalone", *entry]


@dataclass(frozen=True)
class Listeners:
    """Who hears a training's rank 0, for either launcher: each output line (``on_line``), the
    MLflow run its tracking calls go to (``mlflow_run``: tracking URI, run id; None: not
    tracked) and its evaluations (``on_eval``: True stops the training). They travel together
    from the train stage to `model.launch.reader.RankOutput`."""

    on_line: Callable[[str], None] = print
    mlflow_run: tuple[str, str] | None = None
    on_eval: Callable[[Evaluation], bool] | None = None

    def training_run(self) -> TrainingRun | None:
        """The background sender of rank 0's tracking calls to ``mlflow_run``, if there is one."""
        return TrainingRun(*self.mlflow_run) if self.mlflow_run else None

    def output(self, run: TrainingRun | None) -> RankOutput:
        """The reader of rank 0's output that hands it to these listeners (and to ``run``)."""
        return RankOutput(run, self.on_line, self.on_eval)


TO_STDOUT = Listeners()


def launch_training(
    cfg: TrainConfig,
    out_uri: str,
    *,
    inputs: TrainingData,
    nproc: int = 1,
    resume: bool = False,
    listeners: Listeners = TO_STDOUT,
    extra_env: dict[str, str] | None = None,
    rendezvous: Rendezvous = ONE_NODE,
) -> dict:
    """Run training to the end, passing each output line to ``listeners.on_line``; return its
    summary.

    ``listeners.on_eval(evaluation)`` is called at each of the training's evaluations (rank 0's
    `model.launch.protocol.Evaluation` messages); when it returns True the training is stopped
    and `TrainingStopped` raised (a sweep prunes a trial so).

    ``listeners.mlflow_run``: (tracking URI, run id) of the MLflow run to log training into.
    Rank 0 is then told (`--track-stdout`) to print its tracking calls
    (`model.launch.protocol.LineRun`) and this process sends them, from a thread (training never
    waits on MLflow), so the training processes need not load MLflow. After the training this
    waits on MLflow `model.launch.sender.CLOSE_TIMEOUT_S` (60 s) at most.

    If reading the training's output fails (``on_line`` raises, Ctrl-C, SIGTERM), the training
    is stopped rather than waited for; its last checkpoint stays. If this process is killed, the
    training gets SIGTERM (on Linux: `model.launch.lifeline`) instead of going on orphaned.

    With several nodes (`Rendezvous`), call this on every node (same arguments but the node_rank);
    out_uri should be a store every node reaches (s3://, a shared filesystem): global rank 0
    writes the checkpoint and the summary there. A node that cannot see them returns
    {"node_rank": R} only.
    """
    check_nproc(nproc, cfg.device)
    cmd = [
        *train_command(nproc, rendezvous),
        *inputs.entry_args(),
        *("--out", out_uri),
        *("--config-json", json.dumps(cfg.to_dict())),
    ]
    if resume:
        cmd.append("--resume")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    run = listeners.training_run()
    if run is not None:
        cmd.append(TRACK_STDOUT_ARG)  # rank 0 prints its calls; output hands them to run
    output = listeners.output(run)
    try:
        with subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            bufsize=1,
            preexec_fn=die_with_parent(),  # this thread waits for the child: it outlives it
        ) as proc:
            try:
                assert proc.stdout is not None
                output.read(proc.stdout)
            except BaseException:
                _stop(proc)  # Popen's exit would wait for the whole training
                raise
            code = proc.wait()
    finally:
        if run is not None:
            run.close()  # what is still queued, and metrics that failed, are sent now
    if code != 0:
        raise output.failure(f"training exited with code {code}")
    summary_uri = storage.join(out_uri, SUMMARY_NAME)
    if rendezvous.nnodes > 1 and not storage.exists(summary_uri):
        return {"node_rank": rendezvous.node_rank}  # rank 0 ran on another node and wrote elsewhere
    return json.loads(storage.get_bytes(summary_uri))


def _stop(proc: subprocess.Popen) -> None:
    """Stop the child: SIGTERM (torchrun stops its ranks), SIGKILL if it is still there later."""
    proc.terminate()
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
