"""Interrupts: Ctrl-C and SIGTERM end a `gptpipe run` at once and cleanly; a killed one leaves
nothing running.

The end-to-end tests run the real `gptpipe` console script in a session of its own, without
PREFECT_API_URL, so that it boots Prefect's temporary server (the path where a Ctrl-C used to
stop that server too and the command then retried against it for minutes), and signal its
whole process group as a terminal (Ctrl-C) or coreutils `timeout` (SIGTERM) does.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from model.launch import Listeners
from tests.conftest import descendants, launch_on, seed_preset

# 600 steps of the tiny model: the signal comes at the first checkpoint (step 100), the
# resumed run trains the rest in seconds
MAX_ITERS = 600
TINY = seed_preset(
    max_iters=MAX_ITERS,
    eval_interval=500,
    checkpoint_interval=100,
    eval_iters=2,
    batch_size=8,
    log_interval=50,
)
CHECKPOINT_LINE = re.compile(r"checkpoint at step (\d+): (\S+)")
# the signal to the end of the command; the run itself takes a second or two here
STOP_WITHIN_S = 20


def running(pids: list[int]) -> list[str]:
    """The command lines of those of pids that still run (zombies do not)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if state != "Z":
            shown = cmdline.replace(b"\0", b" ").decode(errors="replace")[:200]
            alive.append(f"{pid} {shown}")
    return alive


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (alive := running(pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


@pytest.fixture()
def env(tmp_path) -> dict[str, str]:
    """No Prefect API: the command boots its own temporary server (the bug's path)."""
    environ = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {
        **environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "GPTPIPE_CACHE_DIR": os.environ.get("GPTPIPE_CACHE_DIR", str(tmp_path / "cache")),
        "PYTHONUNBUFFERED": "1",
    }


class Command:
    """The real `gptpipe` in a session of its own, its stdout and stderr read by a thread."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path):
        gptpipe = Path(sys.executable).with_name("gptpipe")
        self.proc = subprocess.Popen(
            [str(gptpipe), *args],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._new_line = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._new_line:
                self.lines.append(line.rstrip("\n"))
                self._new_line.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: re.Pattern, timeout: float = 180) -> re.Match:
        """The first line that matches pattern; fails if the command ends or time runs out."""
        deadline = time.monotonic() + timeout
        with self._new_line:
            while True:
                for line in self.lines:
                    if match := pattern.search(line):
                        return match
                if self.proc.poll() is not None and not self._reader.is_alive():
                    pytest.fail(f"gptpipe ended ({self.proc.returncode}):\n{self.output}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no line matching {pattern.pattern!r}:\n{self.output}")
                self._new_line.wait(0.5)

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"gptpipe did not end within {timeout} s:\n{self.output}")
        self._reader.join(10)
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def mlflow_runs(tracking_uri: str, run_id: str) -> dict[str, str]:
    """{run name: status} of the pipeline run named run_id and its stage runs."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("gptpipe")
    parents = client.search_runs(
        [experiment.experiment_id], f"tags.`gptpipe.run_id` = '{run_id}'", order_by=["start_time"]
    )
    assert parents, f"no MLflow run of {run_id}"
    parent = parents[0]  # the interrupted one (a resumed run is another MLflow run)
    stages = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    return {"pipeline": parent.info.status, **{r.info.run_name: r.info.status for r in stages}}


def flow_run_states(prefect_home: Path) -> list[str]:
    """The state of each flow run the temporary server recorded, oldest first."""
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        return [row[0] for row in db.execute("SELECT state_type FROM flow_run ORDER BY created")]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["ctrl-c", "sigterm"],
)
def test_a_signal_to_the_process_group_stops_the_run_and_it_resumes(
    signum, code, word, env, small_corpus, tmp_path
):
    store = tmp_path / "store"
    args = ["run", "--input", str(small_corpus), "--store", str(store), *TINY]
    run = Command(args, env, tmp_path)
    try:
        checkpoint = run.wait_for(CHECKPOINT_LINE)
        below = descendants(run.proc.pid)  # the temporary server, the training
        os.killpg(run.proc.pid, signum)  # what a terminal's Ctrl-C, or `timeout`, does
        signalled = time.monotonic()
        assert run.wait(STOP_WITHIN_S + 10) == code, run.output
        took = time.monotonic() - signalled
    finally:
        run.kill()
    out = run.output
    assert took < STOP_WITHIN_S, f"{took:.1f} s after the signal:\n{out}"
    assert "Traceback" not in out, out
    assert "ConnectError" not in out, out
    assert not wait_gone(below), out
    resume_lines = [line for line in out.splitlines() if "--resume" in line]
    assert len(resume_lines) == 1, out
    line = resume_lines[0]
    found = re.fullmatch(
        rf"{word}: run (\S+) stopped; its training checkpoint \(step (\d+)\) is kept: continue it "
        r"with the same command plus --run-id (\S+) --resume",
        line,
    )
    assert found, line
    run_id, step = found[1], int(found[2])
    assert found[3] == run_id
    assert int(checkpoint[1]) <= step < MAX_ITERS
    from model.checkpoint import load_checkpoint

    ckpt = Path(checkpoint[2])
    assert ckpt.is_file() and ckpt.is_relative_to(store)
    assert load_checkpoint(str(ckpt))["step"] >= step
    runs = mlflow_runs(env["MLFLOW_TRACKING_URI"], run_id)
    assert runs["pipeline"] == "KILLED" and runs["train"] == "KILLED", runs
    assert runs["tokenize"] == runs["split"] == "FINISHED", runs
    assert flow_run_states(Path(env["PREFECT_HOME"])) == ["CRASHED"]

    # the printed way on: the same command plus --run-id ID --resume
    resumed = subprocess.run(
        [str(Path(sys.executable).with_name("gptpipe")), *args, "--run-id", run_id, "--resume"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, text
    assert "Traceback" not in text, text
    done = re.search(r"done: (\d+) steps \(from step (\d+) to (\d+)\) in ", text)
    assert done, text
    assert (int(done[1]), int(done[3])) == (MAX_ITERS - int(done[2]), MAX_ITERS)
    assert int(done[2]) >= step and int(done[1]) < MAX_ITERS
    summary = json.loads((store / "runs" / run_id / "summary.json").read_text())
    assert summary["run_id"] == run_id
    assert flow_run_states(Path(env["PREFECT_HOME"])) == ["CRASHED", "COMPLETED"]


@pytest.mark.slow
def test_a_killed_run_leaves_no_training_and_no_server_behind(env, small_corpus, tmp_path):
    """SIGKILL to the command alone (no exit handler runs): its training (torchrun and its
    ranks) and its temporary Prefect server end with it. The training prints nothing after its
    first evaluation, so it would not die of a broken pipe either."""
    quiet = seed_preset(
        max_iters=100_000,
        eval_interval=100_000,
        log_interval=100_000,
        checkpoint_interval=0,
        eval_iters=2,
        batch_size=8,
    )
    args = ["run", "--input", str(small_corpus), "--store", str(tmp_path / "store"), *quiet]
    run = Command([*args, "--nproc", "2"], env, tmp_path)
    below: list[int] = []
    try:
        run.wait_for(re.compile(r"step 0: train loss"))
        below = descendants(run.proc.pid)
        commands = "\n".join(running(below))
        assert "uvicorn" in commands and "model.train" in commands, commands
        os.kill(run.proc.pid, signal.SIGKILL)
        assert run.wait(10) == -signal.SIGKILL
        assert not wait_gone(below), run.output
    finally:
        run.kill()
        for pid in below:  # what a failure left (the server is in a session of its own)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_die_with_parent_ends_the_child_of_a_killed_process(tmp_path):
    """`model.launch.lifeline.die_with_parent`: the child of a SIGKILLed process gets SIGTERM."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    parent_code = (
        "import subprocess, sys, time\n"
        "from model.launch.lifeline import die_with_parent\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],"
        " preexec_fn=die_with_parent())\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        child = int(parent.stdout.readline())
        assert running([child])
        parent.kill()
        parent.wait()
        assert not wait_gone([child], 10)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


@pytest.mark.slow
def test_resume_with_nothing_to_resume_says_so_and_done_counts_this_process_steps(
    char_dataset, tmp_path
):
    config = {
        "block_size": 8,
        "n_embd": 16,
        "n_head": 2,
        "n_layer": 1,
        "batch_size": 4,
        "max_iters": 20,
        "eval_interval": 10,
        "eval_iters": 1,
        "log_interval": 10,
        "checkpoint_interval": 10,
        "device": "cpu",
    }
    out = tmp_path / "train"
    lines: list[str] = []
    launch_on(char_dataset, out, config, resume=True, listeners=Listeners(on_line=lines.append))
    assert f"nothing to resume in {out / 'ckpt.pt'}: training from step 0" in lines, lines
    assert any(line.startswith("done: 20 steps in ") for line in lines), lines

    lines.clear()
    launch_on(
        char_dataset,
        out,
        {**config, "max_iters": 30},
        resume=True,
        listeners=Listeners(on_line=lines.append),
    )
    assert f"resumed from step 20 ({out / 'ckpt.pt'})" in lines, lines
    assert any(line.startswith("done: 10 steps (from step 20 to 30) in ") for line in lines), lines
