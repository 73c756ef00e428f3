"""Start training in child processes: `python -m model.train` for one rank, torchrun for more.

Children keep the parent free of process-group state and let torch elastic watch the ranks: if
one dies, torchrun stops the others instead of leaving them hanging in a collective.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from collections.abc import Callable

import torch

import storage
from model.config import TrainConfig
from model.errors import GptpipeError
from model.train import SUMMARY_NAME


def check_nproc(nproc: int, device: str = "auto") -> None:
    if nproc < 1:
        raise GptpipeError(f"--nproc must be at least 1, got {nproc}")
    wants_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if wants_gpu and nproc > torch.cuda.device_count():
        raise GptpipeError(
            f"--nproc {nproc} is more than the {torch.cuda.device_count()} GPU(s) here: "
            "lower --nproc or use --set device=cpu"
        )


def train_command(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "model.train"]
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nproc_per_node={nproc}", "-m", "model.train",
    ]  # fmt: skip


def launch_training(
    cfg: TrainConfig,
    train_uri: str,
    val_uri: str,
    tokenizer_uri: str,
    out_uri: str,
    nproc: int = 1,
    resume: bool = False,
    on_line: Callable[[str], None] = print,
    extra_env: dict[str, str] | None = None,
) -> dict:
    """Run training to the end, passing each output line to on_line; return its summary."""
    check_nproc(nproc, cfg.device)
    cmd = train_command(nproc) + [
        "--train", train_uri, "--val", val_uri, "--tokenizer", tokenizer_uri, "--out", out_uri,
        "--config-json", json.dumps(cfg.to_dict()),
    ]  # fmt: skip
    if resume:
        cmd.append("--resume")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    tail: collections.deque[str] = collections.deque(maxlen=40)
    errors: list[str] = []
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if line.startswith("error: ") and line not in errors:
                errors.append(line)
            on_line(line)
        code = proc.wait()
    if code != 0:
        if errors:
            raise GptpipeError(errors[0].removeprefix("error: "))
        raise RuntimeError(f"training exited with code {code}; last output:\n" + "\n".join(tail))
    return json.loads(storage.get_bytes(storage.join(out_uri, SUMMARY_NAME)))
