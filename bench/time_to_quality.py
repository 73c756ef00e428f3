"""Time to quality as a user meets it: nanoGPT's README command for the CPU against
`gptpipe run --preset NAME`, each a whole process timed from start to exit, alternating, on the
same corpus (Tiny Shakespeare) and machine.

    .venv/bin/python -m bench.time_to_quality --nanogpt ../nanogpt [--preset fast] [--rounds 3]

nanoGPT (fetched, never committed: `git clone https://github.com/karpathy/nanoGPT`) runs its
README's CPU command in a work folder where its data/shakespeare_char/prepare.py already ran on
the corpus (not timed). gptpipe runs `gptpipe run --input CORPUS --preset NAME` in a fresh folder
every round: a new store, MLflow database and Prefect temporary server, every stage run, as a
user's first command is. Each side's final val loss is its own last evaluation (nanoGPT's at step
2000; gptpipe's evaluate stage). Prints the medians and gptpipe's time as a share of nanoGPT's.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.vs_nanogpt import CORPUS, REPO, TARGET_VAL, prepare
from model.machine import cpu_description

# nanoGPT's README, "I only have a macbook": the CPU command, as written there
NANOGPT_CPU = [
    "config/train_shakespeare_char.py",
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=2000",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
]
GPTPIPE = REPO / ".venv" / "bin" / "gptpipe"


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed:\n{result.stdout[-2000:]}{result.stderr}")
    return seconds, result.stdout + result.stderr


def run_nanogpt(nanogpt: Path, work: Path) -> tuple[float, float]:
    """nanoGPT's README command from its checkout's train.py; (seconds, final val loss)."""
    config = [str(nanogpt / arg) if arg.startswith("config/") else arg for arg in NANOGPT_CPU]
    seconds, out = timed([sys.executable, str(nanogpt / "train.py"), *config], work)
    vals = re.findall(r"^step \d+: train loss [\d.]+, val loss ([\d.]+)", out, re.M)
    return seconds, float(vals[-1])


def run_gptpipe(preset: str, corpus: Path, sets: list[str]) -> tuple[float, float]:
    """`gptpipe run` in a fresh folder; (seconds, the evaluate stage's val loss)."""
    with tempfile.TemporaryDirectory(prefix="gptpipe-ttq-") as folder:
        flags = [x for item in sets for x in ("--set", item)]
        cmd = [str(GPTPIPE), "run", "--input", str(corpus), "--preset", preset, *flags]
        seconds, out = timed(cmd, Path(folder))
    val = re.search(r"final loss \(eval mode\): train [\d.]+, val ([\d.]+)", out)
    return seconds, float(val.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT checkout")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="sets")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gptpipe-vs-nanogpt"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args.work, args.nanogpt.resolve())
    print(cpu_description(), flush=True)
    results: dict[str, list[tuple[float, float]]] = {"nanoGPT": [], "gptpipe": []}
    for round_ in range(args.rounds):
        results["nanoGPT"].append(run_nanogpt(args.nanogpt.resolve(), args.work))
        results["gptpipe"].append(run_gptpipe(args.preset, CORPUS, args.sets))
        print(
            f"round {round_ + 1}: "
            + ", ".join(f"{k} {v[-1][0]:.1f} s val {v[-1][1]:.4f}" for k, v in results.items()),
            flush=True,
        )
    medians = {k: statistics.median(s for s, _ in v) for k, v in results.items()}
    worst_val = {k: max(val for _, val in v) for k, v in results.items()}
    for name in results:
        print(f"{name:<8} median {medians[name]:6.1f} s, worst final val {worst_val[name]:.4f}")
    ratio = medians["gptpipe"] / medians["nanoGPT"]
    met = "met" if ratio <= 0.5 and worst_val["gptpipe"] <= TARGET_VAL else "NOT met"
    print(
        f"gptpipe --preset {args.preset} / nanoGPT's CPU command: {ratio:.2f}x the wall time "
        f"(target <= 0.50x at val <= {TARGET_VAL}: {met})"
    )


if __name__ == "__main__":
    main()
