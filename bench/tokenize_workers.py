"""The tokenize stage on a Dask cluster of 1 and of 2 worker processes, same corpus, alternating.

    .venv/bin/python -m bench.tokenize_workers [--rounds 3] [--copies 32] [--shard-size 4M]

The corpus is Tiny Shakespeare repeated `--copies` times in one file, cut into shards of about
`--shard-size`. Both clusters are started once, before timing; each round re-tokenizes (refresh)
on one, then the other, and the time is that of the stage inside the flow (planning, the mapped
tasks, the manifest). Char and BPE are timed separately; the BPE encoder is held to one thread
per worker (RAYON_NUM_THREADS=1) so that workers, not threads, are what is compared.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from bench.common import median
from bench.vs_nanogpt import CORPUS
from model.corpus import parse_byte_size
from model.machine import cpu_description


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--copies", type=int, default=32)
    parser.add_argument("--shard-size", default="4M")
    parser.add_argument("--bpe-copies", type=int, default=4, help="BPE is ~100x slower than char")
    parser.add_argument("--bpe-shard-size", default="512K")
    args = parser.parse_args()
    print(cpu_description())
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    logging.getLogger("distributed").setLevel(logging.WARNING)

    from distributed import LocalCluster
    from prefect import flow
    from prefect_dask import DaskTaskRunner

    from flows.engines import share_temporary_server
    from tasks.results import Workspace
    from tasks.tokenize import tokenize

    share_temporary_server()  # the workers report to the same Prefect server as this process

    @flow(name="bench-tokenize")
    def timed(source: str, store: str, kind: str, shard_bytes: int) -> float:
        start = time.perf_counter()
        vocab_size = 512 if kind == "bpe" else None
        workspace = Workspace(store=store, refresh=frozenset({"tokenize"}))  # timed every time
        tokenize(source, workspace, tokenizer=kind, vocab_size=vocab_size, shard_bytes=shard_bytes)
        return time.perf_counter() - start

    text = CORPUS.read_text(encoding="utf-8")
    options = {
        "threads_per_worker": 1,
        "processes": True,
        "memory_limit": 0,
        "dashboard_address": None,
    }
    clusters = {n: LocalCluster(n_workers=n, **options) for n in (1, 2)}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for kind, copies, size in (
                ("char", args.copies, args.shard_size),
                ("bpe", args.bpe_copies, args.bpe_shard_size),
            ):
                shard_bytes = parse_byte_size(size)
                corpus = Path(tmp) / f"corpus-{kind}.txt"
                corpus.write_text(text * copies, encoding="utf-8")
                mb = corpus.stat().st_size / 1e6
                runs = {
                    n: timed.with_options(task_runner=DaskTaskRunner(address=c.scheduler_address))
                    for n, c in clusters.items()
                }
                for n in (1, 2):  # warm-up: imports in the workers, the tokenizer, the cache
                    runs[n](str(corpus), f"{tmp}/store-{n}", kind, shard_bytes)
                times: dict[int, list[float]] = {1: [], 2: []}
                for _ in range(args.rounds):
                    for n in (1, 2):
                        times[n].append(runs[n](str(corpus), f"{tmp}/store-{n}", kind, shard_bytes))
                t1, t2 = median(times[1]), median(times[2])
                n_shards = -(-corpus.stat().st_size // shard_bytes)
                print(
                    f"{kind}: {mb:.1f} MB in about {n_shards} shards; 1 worker {t1:.2f} s "
                    f"({mb / t1:.1f} MB/s), 2 workers {t2:.2f} s ({mb / t2:.1f} MB/s): "
                    f"{t1 / t2:.2f}x  [medians of {args.rounds}]",
                    flush=True,
                )
    finally:
        for cluster in clusters.values():
            cluster.close()


if __name__ == "__main__":
    main()
