"""Tokens/s of 2 Ray Train workers (`--train-engine ray`) against 2 torchrun ranks, one machine.

Both sides train the `cpu` preset (float32) on the same data with the launchers the train
stage uses (`model.launch.launch_ray_training`, `model.launch.launch_training`); rounds
alternate the sides. Reported: the median of the steady tokens/s each training logs (the time
per step) and the median wall time of a whole training (start-up included). The local Ray
cluster is started once, as a cluster is up before a pipeline uses it; its start-up is shown
apart.

    .venv/bin/python -m bench.ray_train [--iters 150] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.common import alternate, median, prepared, timed_run_sets
from bench.vs_nanogpt import ours_tokens_per_sec, prepare_ours
from model.config import build_config
from model.launch import Listeners, launch_ray_training, launch_training
from model.launch.ray import connect, import_ray
from model.machine import cpu_description, usable_cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}, {usable_cores()} usable cores")
    cfg = build_config("cpu", None, [*timed_run_sets(args.iters), "dtype=float32"])
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    data = prepared(prepare_ours(work))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    start = time.perf_counter()
    connect(None)  # the local cluster, once: the trainings below find it connected
    print(f"local Ray cluster started in {time.perf_counter() - start:.1f} s")
    rates: dict[str, list[float]] = {"torchrun": [], "ray": []}

    def side(name: str, launch):
        def run() -> None:
            lines: list[str] = []
            launch(cfg, str(work / name), inputs=data, nproc=2, listeners=Listeners(lines.append))
            rates[name].append(ours_tokens_per_sec("\n".join(lines)))

        return run

    seconds = alternate(
        {"torchrun": side("torchrun", launch_training), "ray": side("ray", launch_ray_training)},
        rounds=args.rounds,
    )
    import_ray().shutdown()
    steady = {name: median(values[1:]) for name, values in rates.items()}  # [0]: the warm-up
    wall = {name: median(values) for name, values in seconds.items()}
    for name in rates:
        print(
            f"{name:9s} steady {steady[name]:10,.0f} tokens/s, a whole training {wall[name]:.1f} s"
        )
    print(
        f"ray / torchrun: steady tokens/s {steady['ray'] / steady['torchrun']:.2f}x, "
        f"wall time {wall['ray'] / wall['torchrun']:.2f}x"
    )


if __name__ == "__main__":
    main()
