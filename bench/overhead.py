"""What `gptpipe run` adds over `python -m model.train` on the same config and corpus.

Both are whole processes timed from start to exit, alternating. The pipeline side runs on the
local defaults (Prefect's temporary server, a sqlite MLflow in the working folder, a local store)
with `--refresh all`, so every stage really runs; the first pipeline run, which also creates the
MLflow database, is reported apart as "cold".

    .venv/bin/python -m bench.overhead [--rounds 3] [--preset seed] [--iters 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.vs_nanogpt import CORPUS, REPO, prepare_ours


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stdout[-2000:] + result.stderr[-2000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_"))}
    sets = ["--set", f"max_iters={args.iters}", "--set", f"eval_interval={args.iters}"]
    gptpipe = str(Path(sys.executable).with_name("gptpipe"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare_ours(work)
        train = [sys.executable, "-m", "model.train", "--train", data["train.parquet"],
                 "--val", data["val.parquet"], "--tokenizer", data["tokenizer.json"],
                 "--out", str(work / "train-out"), "--preset", args.preset, *sets]  # fmt: skip
        run = [gptpipe, "run", "--input", str(CORPUS), "--preset", args.preset, *sets,
               "--refresh", "all", "--sample-tokens", "200"]  # fmt: skip
        cold = timed(run, work, env)
        pipeline, plain = [], []
        for _ in range(args.rounds):
            plain.append(timed(train, REPO, env))
            pipeline.append(timed(run, work, env))
    p, t = statistics.median(pipeline), statistics.median(plain)
    print(f"preset {args.preset}, {args.iters} iterations, {args.rounds} rounds (medians)")
    print(f"python -m model.train   {t:6.1f} s")
    print(f"gptpipe run             {p:6.1f} s   (cold, first run: {cold:.1f} s)")
    print(f"overhead                {p - t:6.1f} s   (cold: {cold - t:.1f} s)")


if __name__ == "__main__":
    main()
