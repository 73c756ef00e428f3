"""DistributedDataParallel is right: 2 gloo ranks of batch B end where 1 rank of batch 2B ends."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from bench.common import train_cli
from model.checkpoint import load_checkpoint
from model.machine import threads_per_rank

BASE = {
    "block_size": 32,
    "n_embd": 32,
    "n_head": 4,
    "n_layer": 2,
    "dropout": 0.0,
    "max_iters": 6,
    "eval_interval": 100,
    "eval_iters": 2,
    "log_interval": 3,
    "checkpoint_interval": 0,
    "learning_rate": 3e-3,
    "device": "cpu",
}


def train(data: dict[str, str], out: Path, nproc: int, **overrides) -> dict:
    """Train with the real entry point: torchrun for several ranks, plain python for one."""
    cfg = json.dumps({**BASE, **overrides})
    result = subprocess.run(
        [
            *train_cli(data, str(out), nproc=nproc),
            "--config-json",
            cfg,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    summary["weights"] = load_checkpoint(str(out / "ckpt.pt"))["model"]
    summary["log"] = result.stdout
    return summary


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_rank_with_double_batch(char_dataset, tmp_path):
    two = train(char_dataset, tmp_path / "two", nproc=2, batch_size=4)
    one = train(char_dataset, tmp_path / "one", nproc=1, batch_size=8)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert "training on 2 rank(s)" in two["log"]
    # each rank's threads: the usable cores split between the machine's ranks
    assert f"threads: {threads_per_rank(2)} per rank" in two["log"]
    assert f"threads: {threads_per_rank(1)} per rank" in one["log"]
    assert max_abs_diff(two["weights"], one["weights"]) < 1e-5

    # the comparison is sharp: a run over other samples ends elsewhere
    other = train(char_dataset, tmp_path / "other", nproc=1, batch_size=8, seed=7)
    assert max_abs_diff(other["weights"], one["weights"]) > 1e-3


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch(char_dataset, tmp_path):
    """no_sync on all but the last micro-step: 2 ranks x 2 micro-steps of B == 1 rank of 4B."""
    accum = train(char_dataset, tmp_path / "accum", nproc=2, batch_size=2, grad_accum_steps=2)
    big = train(char_dataset, tmp_path / "big", nproc=1, batch_size=8)
    assert max_abs_diff(accum["weights"], big["weights"]) < 1e-5
