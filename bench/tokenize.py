"""Tokenization throughput: gptpipe's char tokenizer to Parquet against the lecture's encode, and
the BPE encoder on 1 and all cores.

    .venv/bin/python -m bench.tokenize [--rounds 5] [--copies 8]

The corpus is repeated `--copies` times (about 9 MB at 8) so that timings are not all start-up.
The lecture's encode is `[stoi[c] for c in s]`; gptpipe's "encode + Parquet" side is what the
tokenize stage does with a shard's text (`write_shard_tokens`: chunked encode, each chunk
compressed while the next is encoded), into memory.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics

from bench.common import alternate, median, run_module
from bench.vs_nanogpt import CORPUS
from model.dataset import write_shard_tokens
from model.machine import cpu_description
from model.tokenizer import CharTokenizer, train_tokenizer


def bpe_worker(copies: int, rounds: int) -> None:
    import time

    text = CORPUS.read_text(encoding="utf-8")
    tok = train_tokenizer("bpe", text, 1024)
    big = text * copies
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        tok.encode(big)
        times.append(time.perf_counter() - start)
    print(json.dumps({"mb_per_s": len(big.encode()) / 1e6 / statistics.median(times)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--bpe-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    print(cpu_description())
    if args.bpe_worker:
        bpe_worker(args.copies, args.rounds)
        return
    text = CORPUS.read_text(encoding="utf-8") * args.copies
    megabytes = len(text.encode()) / 1e6
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    tok = CharTokenizer.train(text)

    def lecture() -> None:
        [stoi[c] for c in text]  # the lecture's encode

    def gptpipe_encode() -> None:
        tok.encode(text)

    def gptpipe_parquet() -> None:
        write_shard_tokens(tok, text, io.BytesIO(), {})

    sides = {"lecture": lecture, "encode": gptpipe_encode, "parquet": gptpipe_parquet}
    rate = {k: megabytes / median(v) for k, v in alternate(sides, args.rounds).items()}
    print(
        f"char, {megabytes:.1f} MB: lecture encode {rate['lecture']:,.1f} MB/s; gptpipe "
        f"encode {rate['encode']:,.1f} MB/s ({rate['encode'] / rate['lecture']:.1f}x), "
        f"encode + Parquet {rate['parquet']:,.1f} MB/s "
        f"({rate['parquet'] / rate['lecture']:.1f}x)"
    )

    rates = {}
    for threads in ("1", str(os.cpu_count())):
        env = {**os.environ, "RAYON_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "true"}
        flags = ["--bpe-worker", "--copies", str(args.copies), "--rounds", str(args.rounds)]
        out = run_module("bench.tokenize", *flags, env=env)
        rates[threads] = json.loads(out)["mb_per_s"]
    one, many = rates["1"], rates[str(os.cpu_count())]
    print(
        f"bpe (vocab 1024) encode: 1 thread {one:.1f} MB/s, {os.cpu_count()} threads "
        f"{many:.1f} MB/s, ratio {many / one:.2f}x"
    )


if __name__ == "__main__":
    main()
