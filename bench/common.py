"""Timing helpers for benchmarks: alternate the sides, report medians and ratios."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from model.launch import train_command
from model.train import TrainingData

REPO = Path(__file__).resolve().parents[1]


def run_module(module: str, *args: str, **popen) -> str:
    """``python -m module args`` in the repository, to the end (an error raises); its stdout."""
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True, **popen).stdout


def timed_run_sets(iters: int) -> list[str]:
    """`--set`s for a speed run: ``iters`` steps, logged 6 times, no evaluation or checkpoint."""
    return [
        f"max_iters={iters}",
        "eval_interval=100000",
        "eval_iters=2",
        f"log_interval={max(1, iters // 6)}",
        "checkpoint_interval=0",
    ]


def run_training(
    data: Mapping[str, str],
    out: str | Path,
    *,
    preset: str,
    sets: Sequence[str] = (),
    nproc: int = 1,
    **popen,
) -> str:
    """Train to the end with the real entry point (`train_cli`) in the repository; its stdout."""
    flags = [x for item in sets for x in ("--set", item)]
    cmd = [*train_cli(data, out, nproc=nproc), "--preset", preset, *flags]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True, **popen).stdout


def prepared(data: Mapping[str, str]) -> TrainingData:
    """A prepared dataset's files (train.parquet, val.parquet, tokenizer.json) as training input."""
    return TrainingData(data["train.parquet"], data["val.parquet"], data["tokenizer.json"])


def train_cli(data: Mapping[str, str], out: str | Path, *, nproc: int = 1) -> list[str]:
    """The training entry point on a prepared dataset, writing to ``out``: plain python for one
    rank, torchrun for more, as the launcher starts it. Add the config flags (--preset, --set,
    --config-json) after it."""
    return [*train_command(nproc), *prepared(data).entry_args(), "--out", str(out)]


def alternate(
    sides: dict[str, Callable[[], None]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each side, calling the sides in turn each round (A B A B ...)."""
    for fn in sides.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)
