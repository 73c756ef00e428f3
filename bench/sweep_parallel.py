"""A sweep's wall time with trials one at a time and two at a time, same grid, alternating.

    .venv/bin/python -m bench.sweep_parallel [--rounds 3] [--iters 200] [--task-runner default]

A 4-trial grid (n_layer 1, 2 x learning_rate 1e-3, 3e-3) of tiny models (block 16, n_embd 32)
on the first 200,000 characters of Tiny Shakespeare. Each call runs the whole sweep flow into a
fresh store (so nothing is re-used from a cache): tokenize and split, four trainings and
evaluations, the registration. With --parallel 2 each training gets half of the cores (the
sweep's own rule); one at a time, each gets them all.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

from bench.common import alternate, median
from bench.vs_nanogpt import CORPUS
from model.config import build_config
from model.machine import cpu_description, usable_cores

SPACE = {
    "pruner": "none",
    "params": {"n_layer": [1, 2], "learning_rate": [1e-3, 3e-3]},
}
TINY = [
    "block_size=16",
    "n_embd=32",
    "n_head=4",
    "batch_size=16",
    "eval_interval=50",
    "eval_iters=10",
    "log_interval=50",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=200, help="max_iters of each trial")
    parser.add_argument("--task-runner", default="default", choices=("default", "dask"))
    args = parser.parse_args()
    print(f"{cpu_description()}, {usable_cores()} usable cores")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("distributed").setLevel(logging.WARNING)

    from flows.engines import share_temporary_server, with_task_runner
    from flows.sweep import sweep

    share_temporary_server()  # one Prefect server for every call (and the Dask workers)
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    corpus = work / "corpus.txt"
    corpus.write_text(CORPUS.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    config = build_config("seed", None, TINY).to_dict()
    space = {**SPACE, "budget": {"max_iters": args.iters}}
    calls = {"n": 0}

    def run(parallel: int) -> None:
        calls["n"] += 1
        folder = work / f"call-{calls['n']}"
        workers = parallel if args.task_runner == "dask" else None
        flow = with_task_runner(sweep, args.task_runner, None, workers)
        summary = flow(
            source=str(corpus),
            space=space,
            config=config,
            store=str(folder / "store"),
            parallel=parallel,
            tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
        )
        assert [t["state"] for t in summary["trials"]] == ["complete"] * 4

    times = alternate({"parallel 1": lambda: run(1), "parallel 2": lambda: run(2)}, args.rounds)
    for name, values in times.items():
        shown = ", ".join(f"{v:.1f}" for v in values)
        print(f"{name}: median {median(values):.1f} s ({shown})")
    ratio = median(times["parallel 1"]) / median(times["parallel 2"])
    print(f"parallel 2 is {ratio:.2f}x as fast as parallel 1 ({args.task_runner} task runner)")


if __name__ == "__main__":
    main()
