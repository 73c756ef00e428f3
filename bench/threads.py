"""Threads per rank: the split of the usable cores (`threads: 0`) against what ranks got before.

Before this split, one rank ran torch's default thread count (the CPU affinity: a cgroup quota,
as in a container started with `--cpus=1`, was not seen) and torchrun's ranks one thread each
(its OMP_NUM_THREADS=1, on any number of cores). Each side is `python -m model.train` (torchrun
for 2 ranks) on the `cpu` preset; rounds alternate the sides; medians of tokens/s.

    .venv/bin/python -m bench.threads [--iters 150] [--rounds 3] [--no-quota]

The quota scenario runs the trainings in a cgroup (v1 or v2) with a 1-core CPU quota, created
and removed here (needs root); it is skipped with a message where none can be made.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import run_training, timed_run_sets
from bench.vs_nanogpt import REPO, ours_tokens_per_sec, prepare_ours
from model.machine import cpu_description, usable_cores


@contextlib.contextmanager
def cpu_quota_cgroup(cores: float):
    """A fresh cgroup limited to `cores` CPUs; yields the file a pid is written to, or None."""
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    if v2.exists() and "cpu" in v2.read_text().split():
        folder, files = (
            Path("/sys/fs/cgroup/gptpipe-bench"),
            {"cpu.max": f"{int(cores * 1e5)} 100000"},
        )
    else:
        folder = Path("/sys/fs/cgroup/cpu/gptpipe-bench")
        files = {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": str(int(cores * 1e5))}
    try:
        folder.mkdir(exist_ok=True)
        for name, value in files.items():
            (folder / name).write_text(value)
    except OSError as exc:
        print(f"no cgroup with a CPU quota can be made here ({exc.strerror}): skipped")
        yield None
        return
    try:
        yield folder / "cgroup.procs"
    finally:
        with contextlib.suppress(OSError):
            folder.rmdir()


def train_tokens_per_sec(data, out: Path, nproc: int, threads: int, iters: int, procs) -> float:
    sets = [*timed_run_sets(iters), "dtype=float32", f"threads={threads}"]

    def join_cgroup():
        if procs is not None:
            procs.write_text(str(os.getpid()))

    stdout = run_training(data, out, preset="cpu", sets=sets, nproc=nproc, preexec_fn=join_cgroup)
    return ours_tokens_per_sec(stdout)


def threads_in(procs, code: str) -> int:
    """The integer a Python snippet prints when run in the cgroup (procs) or as it is."""
    join = (lambda: procs.write_text(str(os.getpid()))) if procs is not None else None
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
        preexec_fn=join,
    )
    return int(out.stdout)


def scenario(name: str, data, work: Path, args, procs) -> None:
    for nproc in (1, 2):
        # before: torch's own default for one rank, torchrun's OMP_NUM_THREADS=1 for two
        before = threads_in(procs, "import torch; print(torch.get_num_threads())")
        before = before if nproc == 1 else 1
        split = f"from model.machine import threads_per_rank; print(threads_per_rank({nproc}))"
        after = threads_in(procs, split)
        sides = {"before": before, "after": 0}
        rates: dict[str, list[float]] = {side: [] for side in sides}
        for _ in range(args.rounds):
            for side, threads in sides.items():
                out = work / f"out-{side}"
                rates[side].append(
                    train_tokens_per_sec(data, out, nproc, threads, args.iters, procs)
                )
        b, a = statistics.median(rates["before"]), statistics.median(rates["after"])
        print(
            f"{name:<22} {nproc:>5} {before:>14} {'':>2}{after:>13} "
            f"{b:>12,.0f} {a:>12,.0f} {a / b:>6.2f}x",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-quota", action="store_true", help="skip the cgroup scenario")
    args = parser.parse_args()
    print(f"{cpu_description()}; {usable_cores()} usable cores; float32, `cpu` preset")
    print(
        f"{'scenario':<22} {'ranks':>5} {'threads before':>14} {'threads after':>15} "
        f"{'before tok/s':>12} {'after tok/s':>12} {'ratio':>7}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare_ours(work)
        scenario(f"{usable_cores()} cores", data, work, args, None)
        if not args.no_quota:
            with cpu_quota_cgroup(1.0) as procs:
                if procs is not None:
                    scenario("cgroup quota: 1 core", data, work, args, procs)


if __name__ == "__main__":
    main()
