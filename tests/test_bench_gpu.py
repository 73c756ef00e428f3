"""bench/gpu.py, the GPU checks, run small on the CPU: every check runs, and a missed target fails.

A device session gets a script that is known to work; what it cannot test here is the GPU itself
(NCCL, the CUDA flash kernel, compile on CUDA), which is what the script is for.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import CORPUS, REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CORPUS.is_file(), reason=f"the corpus {CORPUS} is absent"),
]


def run_checks(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.gpu",
            "--device",
            "cpu",
            "--preset",
            "seed",
            "--corpus",
            str(CORPUS),
            "--json",
            str(out),
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    rows = json.loads(out.read_text()) if out.exists() else []
    return result, rows


def test_every_check_runs_and_passes_on_the_cpu(tmp_path):
    result, rows = run_checks(
        tmp_path, "--iters", "40", "--max-val-loss", "4.0", "--generate-tokens", "12"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    by_name = {row["check"]: row for row in rows}
    assert list(by_name) == ["device", "flash", "ddp", "generate", "train"]
    assert all(row["ok"] for row in rows)
    assert by_name["ddp"]["backend"] == "gloo" and by_name["ddp"]["world_size"] == 2
    assert by_name["ddp"]["max_diff"] == 0.0
    train = by_name["train"]
    assert train["steps"] == 40 and not train["compile"]
    # dtype auto: float32, or bf16 where this CPU has native bf16 and the probe found it faster
    assert train["precision"] in ("float32", "bfloat16") and train["precision_reason"]
    assert 0 < train["val_loss"] < 4.0 and train["tokens_per_sec"] > 0 and train["mfu_percent"] > 0
    assert f"val loss {train['val_loss']:.4f}" in result.stdout


def test_a_missed_training_target_fails_with_what_was_seen(tmp_path):
    result, rows = run_checks(
        tmp_path, "--checks", "train", "--iters", "10", "--max-val-loss", "1.0"
    )
    assert result.returncode == 1
    (row,) = rows
    assert not row["ok"]
    assert "the target is val loss <= 1.0" in row["result"]
    assert "train     FAILED" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_no_cuda_is_a_one_line_error():
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: no CUDA device is visible: run this on a GPU machine, or pass --device cpu "
        "for the small run"
    )


def test_a_failed_run_is_explained_by_its_ranks_line_not_torchruns_banner():
    from bench.gpu import _cause

    torchrun = subprocess.CompletedProcess(
        [],
        1,
        stdout="ddp-result {}\n",
        stderr="terminate called without an active exception\n"
        "W1126 .../torch/distributed/elastic/multiprocessing/api.py:1028] Sending SIGTERM\n"
        "Traceback (most recent call last):\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
        "======================================================\n",
    )
    assert _cause(torchrun) == "terminate called without an active exception"
    train = subprocess.CompletedProcess([], 2, stdout="step 0\n", stderr="error: no corpus\n")
    assert _cause(train) == "error: no corpus"
    assert _cause(subprocess.CompletedProcess([], 1, stdout="", stderr="")) == "no output"
