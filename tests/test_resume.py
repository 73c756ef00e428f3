"""A training whose rank is killed resumes from its last checkpoint and ends where an
uninterrupted training ends: same weights, same losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.common import train_cli
from model.checkpoint import load_checkpoint
from tests.conftest import children, descendants

CONFIG = {
    "block_size": 32,
    "n_embd": 32,
    "n_head": 4,
    "n_layer": 2,
    "dropout": 0.1,
    "batch_size": 16,
    "max_iters": 400,
    "eval_interval": 200,
    "eval_iters": 2,
    "log_interval": 100,
    "checkpoint_interval": 100,
    "learning_rate": 3e-3,
    "device": "cpu",
}


def command(data: dict[str, str], out: Path, *extra: str) -> list[str]:
    return [
        *train_cli(data, str(out), nproc=2),
        "--config-json",
        json.dumps(CONFIG),
        *extra,
    ]


@pytest.mark.slow
def test_sigkilled_rank_resumes_to_the_uninterrupted_result(char_dataset, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole = subprocess.run(
        command(char_dataset, tmp_path / "whole"),
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert whole.returncode == 0, whole.stdout + whole.stderr

    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        command(char_dataset, out),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    killed = None
    for line in proc.stdout:
        if "checkpoint at step 100" in line:
            ranks = children(proc.pid)
            assert ranks, "torchrun should have rank processes"
            killed = ranks[0]
            os.kill(killed, signal.SIGKILL)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) != 0, "the job must stop when a rank dies: " + rest[-2000:]
    assert killed is not None
    assert not (out / "summary.json").exists()
    step = load_checkpoint(str(out / "ckpt.pt"))["step"]
    assert 100 <= step < 400

    resumed = subprocess.run(
        command(char_dataset, out, "--resume"), env=env, capture_output=True, text=True, timeout=240
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from step {step}" in resumed.stdout

    a = load_checkpoint(str(tmp_path / "whole" / "ckpt.pt"))
    b = load_checkpoint(str(out / "ckpt.pt"))
    assert a["step"] == b["step"] == 400
    for name, tensor in a["model"].items():
        assert torch.allclose(tensor, b["model"][name], atol=1e-6), name
    final = [json.loads((d / "summary.json").read_text()) for d in (tmp_path / "whole", out)]
    assert final[0]["val_loss"] == pytest.approx(final[1]["val_loss"], abs=1e-6)
    curves = [[(h["step"], h["train_loss"], h["val_loss"]) for h in f["history"]] for f in final]
    assert [c[0] for c in curves[0]] == [c[0] for c in curves[1]] == [0, 200, 400]
    assert [v for c in curves[0] for v in c[1:]] == pytest.approx(
        [v for c in curves[1] for v in c[1:]]
    )


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.slow
def test_pipeline_retries_a_killed_training_from_its_checkpoint(small_corpus, cli_env, tmp_path):
    """A rank SIGKILLed inside `gptpipe run`: Prefect retries the train task, which resumes."""
    gptpipe = Path(sys.executable).with_name("gptpipe")
    sets = [
        "max_iters=400",
        "checkpoint_interval=100",
        "eval_interval=200",
        "eval_iters=2",
        "log_interval=100",
        "batch_size=16",
    ]
    proc = subprocess.Popen(
        [
            str(gptpipe),
            "run",
            "--input",
            str(small_corpus),
            "--preset",
            "seed",
            "--nproc",
            "2",
            "--store",
            str(tmp_path / "store"),
            "--run-id",
            "killed",
            "--sample-tokens",
            "20",
            *[x for s in sets for x in ("--set", s)],
        ],
        env=cli_env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output, killed = [], None
    for line in proc.stdout:
        output.append(line)
        if killed is None and "checkpoint at step 100" in line:
            family = descendants(proc.pid)
            launcher = next(p for p in family if "torch.distributed.run" in cmdline(p))
            killed = children(launcher)[0]
            os.kill(killed, signal.SIGKILL)
    text = "".join(output)
    assert proc.wait(timeout=300) == 0, text[-4000:]
    assert killed is not None
    assert "resumed from step" in text
    summary = json.loads((tmp_path / "store" / "runs" / "killed" / "summary.json").read_text())
    assert summary["stages"]["train"]["step"] == 400
