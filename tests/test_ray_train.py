"""Issue 17: training in Ray Train workers (`--train-engine ray`) on a real local Ray cluster.

One `ray start --head` of 2 CPUs for the file: 2 Ray workers end where 2 torchrun ranks end, a
killed worker is restarted from the store's checkpoint and ends there too, MLflow gets each
metric once, and the CLI's errors are one line before any work.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench.common import prepared
from model.checkpoint import load_checkpoint
from model.config import config_from_dict
from model.launch import Listeners
from storage.errors import GptpipeError
from tests.conftest import free_port, run_cli, seed_preset
from tests.test_cli_errors import assert_clean_error
from tests.test_ddp import BASE, max_abs_diff
from tests.test_ddp import train as torchrun_train

pytest.importorskip("ray.train.torch")

# long enough that a worker killed at step 200 dies mid-training, short enough for seconds
CONFIG = {
    **BASE,
    "batch_size": 4,
    "max_iters": 800,
    "eval_interval": 200,
    "log_interval": 100,
    "checkpoint_interval": 100,
}
KILL_AT = "checkpoint at step 200"
RAY = Path(sys.executable).with_name("ray")


@pytest.fixture(scope="module")
def ray_cluster():
    """`ray start --head --block` of 2 CPUs in a session of its own; yields its address. Its
    temp folder is its own too, so nothing else on the machine finds or stops it."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths are limited
    port = free_port()
    # no token authentication for this loopback-only cluster (docs/scaling.md says how a real
    # one uses it): the driver (this process, the CLI's) and the head must agree on the mode
    auth = {"RAY_AUTH_MODE": "disabled"}
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [
        str(RAY),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--num-cpus=2",
        "--num-gpus=0",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "ray start exited"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the Ray head did not come up in 60 s"
                time.sleep(0.5)
        yield {"address": f"127.0.0.1:{port}", "pid": proc.pid}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # ray start --block stops what it started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def ray_train(data, out: Path, address: str, **launch) -> dict:
    from model.launch import launch_ray_training

    summary = launch_ray_training(
        config_from_dict(CONFIG),
        str(out),
        inputs=prepared(data),
        nproc=2,
        address=address,
        **launch,
    )
    summary["weights"] = load_checkpoint(str(out / "ckpt.pt"))["model"]
    return summary


def tracked_run(tmp: Path) -> tuple[str, str]:
    """A real MLflow run (sqlite) for rank 0's calls: (tracking URI, run id)."""
    from storage.tracking import Tracker

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return uri, Tracker(uri, "ray-train").start_run("train")


def metric_steps(mlflow_run: tuple[str, str], name: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return [m.step for m in MlflowClient(mlflow_run[0]).get_metric_history(mlflow_run[1], name)]


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, char_dataset, tmp_path_factory) -> dict:
    """CONFIG trained by 2 torchrun ranks and by 2 Ray workers (tracked), once for the file."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    lines: list[str] = []
    mlflow_run = tracked_run(tmp)
    ray = ray_train(
        char_dataset,
        tmp / "ray",
        ray_cluster["address"],
        listeners=Listeners(on_line=lines.append, mlflow_run=mlflow_run),
    )
    torchrun = torchrun_train(char_dataset, tmp / "torchrun", nproc=2, **CONFIG)
    return {"ray": ray, "torchrun": torchrun, "lines": lines, "mlflow_run": mlflow_run}


def _ray_train_workers(root_pid: int) -> list[int]:
    """Ray Train worker processes below root_pid (the cluster's `ray start`), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"RayTrainWorker" in cmdline:
            found.append(pid)
    return sorted(found)


@pytest.mark.slow
def test_two_ray_workers_end_where_two_torchrun_ranks_end(uninterrupted):
    ray, torchrun = uninterrupted["ray"], uninterrupted["torchrun"]
    assert ray["world_size"] == torchrun["world_size"] == 2
    assert any(line.startswith("training on 2 rank(s)") for line in uninterrupted["lines"])
    assert [h["step"] for h in ray["history"]] == [0, 200, 400, 600, 800]
    for mine, theirs in zip(ray["history"], torchrun["history"], strict=True):
        assert mine == pytest.approx(theirs, abs=1e-6)
    assert max_abs_diff(ray["weights"], torchrun["weights"]) < 1e-5
    # sharp: the loss moved a lot, so equal histories are no accident of a flat curve
    assert ray["history"][0]["val_loss"] - ray["history"][-1]["val_loss"] > 0.3


@pytest.mark.slow
def test_rank_0_metrics_reach_mlflow_once(uninterrupted):
    run = uninterrupted["mlflow_run"]
    assert metric_steps(run, "val_loss") == [0, 200, 400, 600, 800]
    assert metric_steps(run, "loss") == list(range(100, 801, 100))
    # ... and only through the tracking run: no relayed tracking line reached the log
    assert not [line for line in uninterrupted["lines"] if line.startswith("gptpipe.mlflow")]


@pytest.mark.slow
def test_a_killed_worker_is_restarted_from_the_checkpoint(
    ray_cluster, char_dataset, uninterrupted, tmp_path
):
    killed: list[int] = []
    lines: list[str] = []

    def on_line(line: str) -> None:
        lines.append(line)
        if line.startswith(KILL_AT) and not killed:
            workers = _ray_train_workers(ray_cluster["pid"])
            assert len(workers) == 2, workers
            os.kill(workers[-1], signal.SIGKILL)
            killed.append(workers[-1])

    mlflow_run = tracked_run(tmp_path)
    summary = ray_train(
        char_dataset,
        tmp_path / "out",
        ray_cluster["address"],
        listeners=Listeners(on_line=on_line, mlflow_run=mlflow_run),
    )
    assert killed, "no worker was killed"
    resumed = [line for line in lines if line.startswith("resumed from step")]
    assert resumed and resumed[0].split()[3] in ("100", "200"), lines[-20:]
    reference = uninterrupted["ray"]
    assert summary["history"] == reference["history"]
    assert (summary["train_loss"], summary["val_loss"]) == (
        reference["train_loss"],
        reference["val_loss"],
    )
    assert max_abs_diff(summary["weights"], reference["weights"]) < 1e-6
    # the steps the restarted attempt computed again are logged once
    assert metric_steps(mlflow_run, "loss") == list(range(100, 801, 100))
    assert metric_steps(mlflow_run, "val_loss") == [0, 200, 400, 600, 800]


def test_a_cluster_smaller_than_asked_is_one_line():
    """The GPU case is the arithmetic on the cluster's resources (this machine has none)."""
    from model.launch.ray import plan_workers

    with pytest.raises(GptpipeError, match=r"--nproc 4 .* of one GPU each, but the c has 2 GPU"):
        plan_workers(4, "auto", {"CPU": 64, "GPU": 2}, "the c")
    with pytest.raises(GptpipeError, match="device=cuda, but the c has no GPUs"):
        plan_workers(1, "cuda", {"CPU": 64}, "the c")
    assert plan_workers(2, "auto", {"CPU": 1, "GPU": 2}, "the c") is True
    assert plan_workers(2, "cpu", {"CPU": 2, "GPU": 8}, "the c") is False


# ----------------------------------------------------------------------------- the real CLI


def _run_args(small_corpus: Path, tmp_path: Path, *extra: str) -> list[str]:
    store = str(tmp_path / "store")
    return ["run", "--input", str(small_corpus), "--store", store, "--train-engine", "ray", *extra]


@pytest.mark.slow
def test_cli_errors_are_one_line_before_any_work(ray_cluster, small_corpus, cli_env, tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    result = run_cli(_run_args(small_corpus, tmp_path, "--ray-address", dead), cli_env, tmp_path)
    assert_clean_error(result, "cannot reach the Ray cluster", dead)

    args = _run_args(
        small_corpus, tmp_path, "--ray-address", ray_cluster["address"], "--nproc", "3"
    )
    result = run_cli(args, cli_env, tmp_path)
    assert_clean_error(result, "--nproc 3", "has 2 CPU(s)")

    # ray missing: a `ray` package that cannot be imported, first on the path
    shadow = tmp_path / "no-ray" / "ray"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n"
    )
    env = {**cli_env, "PYTHONPATH": str(shadow.parent)}
    result = run_cli(_run_args(small_corpus, tmp_path), env, tmp_path)
    assert_clean_error(result, "needs ray[train]", "gptpipe[ray]")
    assert not (tmp_path / "store" / "runs").exists()


@pytest.mark.slow
def test_pipeline_trains_on_a_local_ray_cluster(small_corpus, cli_env, tmp_path):
    """No --ray-address: a local cluster is started for the training, and stopped after it."""
    sets = seed_preset(max_iters=20, eval_interval=10, eval_iters=2, log_interval=10)
    args = _run_args(small_corpus, tmp_path, "--nproc", "2", "--sample-tokens", "10", *sets)
    result = run_cli(args, cli_env, tmp_path, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "training on 2 rank(s)" in output
    summary = next((tmp_path / "store" / "runs").glob("*/summary.json"))
    assert '"world_size": 2' in summary.read_text()
