"""End to end through the real `gptpipe` command, Prefect's engine and a real Prefect server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.data import read_tokens
from tests.conftest import run_cli

TINY = [
    "--preset", "seed",
    "--set", "max_iters=60", "--set", "eval_interval=30", "--set", "eval_iters=5",
    "--set", "batch_size=16", "--set", "log_interval=20",
]  # fmt: skip


def run_pipeline(small_corpus: Path, env: dict, cwd: Path, nproc: int):
    result = run_cli(
        ["run", "--input", str(small_corpus), *TINY, "--nproc", str(nproc),
         "--run-id", f"e2e-{nproc}", "--sample-tokens", "80", "--store", str(cwd / "store")],
        env, cwd,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    run_dir = cwd / "store" / "runs" / f"e2e-{nproc}"
    return result, run_dir, json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_gptpipe_run_end_to_end(small_corpus, cli_env, tmp_path, nproc):
    result, run_dir, summary = run_pipeline(small_corpus, cli_env, tmp_path, nproc)
    output = result.stdout + result.stderr

    # every stage wrote its outputs into the run's folder
    for name in ("tokenizer.json", "tokens.parquet", "train.parquet", "val.parquet",
                 "train/ckpt.pt", "train/summary.json", "samples.txt"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    ids, meta = read_tokens(str(run_dir / "tokens.parquet"))
    assert len(ids) == 60_000 and meta["vocab_size"] == summary["stages"]["tokenize"]["vocab_size"]
    n_train = summary["stages"]["split"]["n_train_tokens"]
    assert n_train == 54_000 and summary["stages"]["split"]["n_val_tokens"] == 6_000

    # training ran on the asked ranks, learned something, and the evaluation is eval-mode
    assert summary["world_size"] == nproc
    assert f"training on {nproc} rank(s)" in output
    assert summary["stages"]["train"]["step"] == 60
    assert summary["val_loss"] < 4.0  # ln(vocab) ~ 4.1 before training
    samples = (run_dir / "samples.txt").read_text(encoding="utf-8")
    assert len(samples) > 0 and samples == summary["sample"]

    # the closing summary names the run, the losses and where each output is
    assert f"run e2e-{nproc}:" in result.stdout
    assert f"val {summary['val_loss']:.4f}" in result.stdout
    assert str(run_dir / "train" / "ckpt.pt") in result.stdout
    assert "Traceback" not in output


@pytest.mark.slow
def test_sample_command_is_deterministic_and_checks_the_prompt(small_corpus, cli_env, tmp_path):
    _, run_dir, _ = run_pipeline(small_corpus, cli_env, tmp_path, 1)
    ckpt = str(run_dir / "train" / "ckpt.pt")

    def sample(*extra: str):
        return run_cli(["sample", "--checkpoint", ckpt, "--max-new-tokens", "60", *extra],
                       cli_env, tmp_path)  # fmt: skip

    first, again, other = sample("--seed", "3"), sample("--seed", "3"), sample("--seed", "4")
    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout and first.stdout != other.stdout
    prompted = sample("--prompt", "ROMEO:", "--temperature", "0.8", "--top-k", "5")
    assert prompted.returncode == 0 and prompted.stdout.startswith("ROMEO:")

    unknown = sample("--prompt", "caf\u00e9 \u20ac")
    assert unknown.returncode == 2
    assert "'\u00e9'" in unknown.stderr and "'\u20ac'" in unknown.stderr
    assert unknown.stderr.startswith("error:") and "Traceback" not in unknown.stderr
