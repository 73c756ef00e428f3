"""A tiny model set with --set on the default (`cpu`) preset against the same sizes on `seed`.

The two differ in the rest of the recipe (schedule, clipping, weight decay, evaluation), and used
to differ in precision (`cpu` forced bf16, 8x slower at this size on a CPU without native bf16).
Both are `dtype: auto` now; this shows what is left. Alternating rounds, medians of tokens/s.

    .venv/bin/python -m bench.tiny_default [--iters 600] [--rounds 3]
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
from pathlib import Path

from bench.common import run_training, timed_run_sets
from bench.vs_nanogpt import ours_tokens_per_sec, prepare_ours
from model.machine import cpu_description

TINY = ["block_size=8", "n_embd=64", "n_head=4", "n_layer=4", "batch_size=32"]


def run(data, out: Path, preset: str, sets: list[str], iters: int) -> tuple[float, str]:
    stdout = run_training(data, out, preset=preset, sets=[*sets, *timed_run_sets(iters)])
    precision = re.search(r"tokens per step, (\S+)", stdout)
    return ours_tokens_per_sec(stdout), precision.group(1) if precision else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sides = {"cpu + --set (tiny)": ("cpu", TINY), "seed": ("seed", [])}
    rates: dict[str, list[float]] = {name: [] for name in sides}
    chosen: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_ours(Path(tmp))
        for _ in range(args.rounds):
            for name, (preset, sets) in sides.items():
                rate, chosen[name] = run(data, Path(tmp) / "out", preset, sets, args.iters)
                rates[name].append(rate)
    print(cpu_description())
    for name, values in rates.items():
        print(f"{name:<20} {statistics.median(values):>10,.0f} tokens/s  {chosen[name]}")
    ratio = statistics.median(rates["cpu + --set (tiny)"]) / statistics.median(rates["seed"])
    print(f"ratio (default preset / seed): {ratio:.2f}x")


if __name__ == "__main__":
    main()
