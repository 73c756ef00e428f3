"""A training whose rank is killed resumes from its last checkpoint and ends where an
uninterrupted training ends: same weights, same losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint
from model.launch import train_command

CONFIG = {
    "block_size": 32, "n_embd": 32, "n_head": 4, "n_layer": 2, "dropout": 0.1,
    "batch_size": 16, "max_iters": 400, "eval_interval": 200, "eval_iters": 2,
    "log_interval": 100, "checkpoint_interval": 100, "learning_rate": 3e-3, "device": "cpu",
}  # fmt: skip


def command(data: dict[str, str], out: Path, *extra: str) -> list[str]:
    return [*train_command(2), "--train", data["train.parquet"], "--val", data["val.parquet"],
            "--tokenizer", data["tokenizer.json"], "--out", str(out),
            "--config-json", json.dumps(CONFIG), *extra]  # fmt: skip


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_sigkilled_rank_resumes_to_the_uninterrupted_result(char_dataset, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole = subprocess.run(command(char_dataset, tmp_path / "whole"), env=env,
                           capture_output=True, text=True, timeout=240)  # fmt: skip
    assert whole.returncode == 0, whole.stdout + whole.stderr

    out = tmp_path / "interrupted"
    proc = subprocess.Popen(command(char_dataset, out), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
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

    resumed = subprocess.run(command(char_dataset, out, "--resume"), env=env,
                             capture_output=True, text=True, timeout=240)  # fmt: skip
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
