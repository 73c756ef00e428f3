"""What `gptpipe run` adds over `python -m model.train` on the same config and corpus.

Both are whole processes timed from start to exit, alternating. The pipeline side runs on the
local defaults (Prefect's temporary server, a sqlite MLflow in the working folder, a local store)
with `--refresh all`, so every stage really runs; the first pipeline run, in a fresh folder where
it also creates the MLflow database (as a user's first command does, and as the time-to-quality
bench runs it), is reported apart as "cold", with its own time to the first training line.

Each output line is time-stamped as it arrives, so the medians are also split into phases: up to
the first training line ("training on ..."), the training itself (up to "done: ..."), and what
comes after it (the pipeline's evaluate, sample and register stages, the model log, the exit).

    .venv/bin/python -m bench.overhead [--rounds 3] [--preset seed] [--iters 200] [--start-up]

With --start-up only the start-up is measured, on a fresh folder (cold) and again in the same
folder (warm), each run stopped at its first training line: quick, and on a machine busy with
other work it does not wait for a slowed training.
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

from bench.common import train_cli
from bench.vs_nanogpt import CORPUS, REPO, prepare_ours
from model.machine import cpu_description

# where a run is, from its output: (phase name, a line that ends the phase)
MARKS = {
    "flow": "Beginning flow run",
    "train_start": "training on ",
    "train_end": "done: ",
    "flow_end": "Finished in state Completed()",
}


def timed(
    cmd: list[str], cwd: Path, env: dict, *, stop_at: str | None = None
) -> tuple[float, dict[str, float]]:
    """Seconds from start to exit, and when (seconds from start) each of MARKS was first seen;
    with ``stop_at`` (one of MARKS), the command is stopped (SIGTERM) once that mark is seen."""
    start = time.perf_counter()
    marks: dict[str, float] = {}
    tail: list[str] = []
    with subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**env, "PYTHONUNBUFFERED": "1"},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter() - start
            tail = [*tail[-40:], line]
            for name, text in MARKS.items():
                if text in line and (name != "flow_end" or "Flow run" in line):
                    marks.setdefault(name, now)
            if stop_at in marks:
                proc.terminate()  # the command ends as on any SIGTERM: exit status 143
                proc.stdout.read()
                break
        code = proc.wait()
    if code != 0 and stop_at not in marks:
        raise SystemExit("".join(tail))
    return time.perf_counter() - start, marks


def phases(total: float, marks: dict[str, float]) -> dict[str, float]:
    """Up to the first training line, the training, and after it up to the exit."""
    return {
        "start-up (to 'training on')": marks["train_start"],
        "training ('training on' to 'done')": marks["train_end"] - marks["train_start"],
        "after training (to exit)": total - marks["train_end"],
    }


def start_up(run: list[str], env: dict, rounds: int) -> None:
    """Only the start-up: fresh-folder (cold) and second (warm) runs, each stopped at its first
    training line; medians of seconds to the flow's start and to that line."""
    runs: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            for found in runs.values():
                found.append(timed(run, Path(tmp), env, stop_at="train_start")[1])
    print(
        f"preset {run[run.index('--preset') + 1]}, {rounds} rounds (medians), stopped at the "
        "first training line"
    )
    for kind, found in runs.items():
        flow, train = (
            statistics.median(m[name] for m in found) for name in ("flow", "train_start")
        )
        print(
            f"{kind} ({'fresh folder' if kind == 'cold' else 'second run'}): {flow:.1f} s to "
            f"the flow's start, {train:.1f} s to the first training line"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument(
        "--start-up",
        action="store_true",
        help="only gptpipe run's start-up, cold and warm, each run stopped at its first "
        "training line (no model.train side, no training)",
    )
    args = parser.parse_args()
    print(f"{cpu_description()}; load average {os.getloadavg()[0]:.1f} at the start")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_"))}
    sets = ["--set", f"max_iters={args.iters}", "--set", f"eval_interval={args.iters}"]
    gptpipe = str(Path(sys.executable).with_name("gptpipe"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare_ours(work)
        train = [
            *train_cli(data, str(work / "train-out")),
            "--preset",
            args.preset,
            *sets,
        ]
        run = [
            gptpipe,
            "run",
            "--input",
            str(CORPUS),
            "--preset",
            args.preset,
            *sets,
            "--refresh",
            "all",
            "--sample-tokens",
            "200",
        ]
        if args.start_up:
            start_up(run, env, args.rounds)
            return
        cold, cold_marks = timed(run, work, env)
        pipeline, plain = [], []
        for _ in range(args.rounds):
            plain.append(timed(train, REPO, env))
            pipeline.append(timed(run, work, env))
    p, t = (statistics.median(total for total, _ in runs) for runs in (pipeline, plain))
    print(f"preset {args.preset}, {args.iters} iterations, {args.rounds} rounds (medians)")
    print(f"python -m model.train   {t:6.1f} s")
    print(f"gptpipe run             {p:6.1f} s   (cold, first run: {cold:.1f} s)")
    print(f"overhead                {p - t:6.1f} s   (cold: {cold - t:.1f} s)")
    split = [[phases(*run) for run in runs] for runs in (pipeline, plain)]
    print(f"\n{'phase (medians)':<40}{'gptpipe run':>12}{'model.train':>12}{'difference':>12}")
    for name in split[0][0]:
        ours, theirs = (statistics.median(run[name] for run in runs) for runs in split)
        print(f"{name:<40}{ours:>10.1f} s{theirs:>10.1f} s{ours - theirs:>10.1f} s")
    flow = [(m["flow"], m["train_start"] - m["flow"], tot - m["flow_end"]) for tot, m in pipeline]
    start, to_train, exit_ = (statistics.median(values) for values in zip(*flow, strict=True))
    print(
        f"gptpipe run: {start:.1f} s to the flow's start, {to_train:.1f} s from there to the "
        f"first training line, {exit_:.1f} s from the flow's end to the exit"
    )
    print(
        f"cold (fresh folder, first run): {cold_marks['flow']:.1f} s to the flow's start, "
        f"{cold_marks['train_start']:.1f} s to the first training line"
    )


if __name__ == "__main__":
    main()
