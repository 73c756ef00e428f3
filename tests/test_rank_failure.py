"""A failure on one rank, or in the launcher, ends the whole training promptly and clearly."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from bench.common import train_cli
from model.launch import Listeners
from tests.conftest import launch_on
from tests.test_ddp import BASE

REPO = Path(__file__).resolve().parents[1]


def run_bounded(cmd: list[str], timeout: float) -> tuple[int | None, str, float]:
    """Run torchrun: (its exit code, or None if it ran past timeout; its output; seconds).

    A job that hangs gets SIGTERM, which torchrun passes on to its ranks (each in a session of
    its own, out of reach of a kill of torchrun's process group), so none is left running.
    """
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output, time.monotonic() - start
    except subprocess.TimeoutExpired:
        proc.terminate()
        output, _ = proc.communicate(timeout=60)
        return None, output, time.monotonic() - start


@pytest.mark.slow
def test_rank_0_failing_alone_ends_the_job_with_its_error(char_dataset):
    """Only rank 0 writes checkpoints: when it cannot, rank 1 is inside DDP's all-reduce. The job
    must end (torchrun stops rank 1) instead of waiting there, and say why in one line."""
    config = {**BASE, "max_iters": 30, "checkpoint_interval": 10, "batch_size": 4}
    cmd = [
        *train_cli(char_dataset, "/proc/gptpipe-out", nproc=2),
        "--config-json",
        json.dumps(config),
    ]
    code, output, seconds = run_bounded(cmd, timeout=90)
    assert code is not None, f"the job hung ({seconds:.0f} s):\n{output[-3000:]}"
    assert code != 0, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: could not write the checkpoint /proc/gptpipe-out/ckpt.pt: No such file or "
        "directory (0.0 MB free on that disk)"
    ], output[-3000:]
    # torchrun reports the failed rank with a traceback of its own; the ranks print none
    assert f'File "{REPO}/model/' not in output, output[-3000:]
    assert "terminate called" not in output, output[-3000:]


def _training_children() -> list[int]:
    """Process ids of this process's children that run model.train (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if ppid == os.getpid() and b"model.train" in cmdline:
            found.append(int(stat.parent.name))
    return found


class ShowFailed(Exception):
    pass


@pytest.mark.slow
def test_launcher_stops_the_training_when_reading_its_output_fails(char_dataset, tmp_path):
    """on_line raising (a logger that fails, Ctrl-C) stops the child instead of waiting for
    the whole training, and leaves no training process behind.

    on_line fails on the last line before a long silence: a child that prints again soon dies
    of the closed pipe anyway."""

    # about 200 s of training: waiting for its end would show
    config = {**BASE, "max_iters": 20_000, "eval_interval": 10_000, "log_interval": 10_000}

    def on_line(line: str) -> None:
        if line.startswith("step 0:"):  # the next line would come at step 10,000
            raise ShowFailed(line)

    start = time.monotonic()
    with pytest.raises(ShowFailed):
        launch_on(
            char_dataset,
            tmp_path / "out",
            config,
            listeners=Listeners(on_line=on_line),
        )
    assert time.monotonic() - start < 60
    assert _training_children() == []
