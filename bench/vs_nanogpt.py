"""gptpipe's training loop against nanoGPT's train.py, on the same machine, alternating runs.

nanoGPT is not part of this project: fetch it yourself and point --nanogpt at the checkout
(`git clone https://github.com/karpathy/nanoGPT`). Both sides train on Tiny Shakespeare,
character-level, prepared by their own code (nanoGPT's data/shakespeare_char/prepare.py on a copy
of the corpus; gptpipe's tokenizer and Parquet writer).

    .venv/bin/python -m bench.vs_nanogpt --nanogpt ../nanogpt [--configs cpu lecture]
        [--iters 60] [--rounds 3] [--quality] [--ours-set dtype=bfloat16 ...]

throughput: median tokens/s over steady-state iterations of each run, medians over rounds.
--quality: nanoGPT's README command for the CPU (2000 iterations) against the `cpu` preset as
it stands (with --ours-set too); the wall time (process start to the evaluation line) at which
val loss first reaches <= 1.89.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO, run_training
from model.config import build_config
from model.machine import cpu_description

CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
TARGET_VAL = 1.89


def nanogpt_args(
    preset: str, iters: int, eval_interval: int, eval_iters: int | None = None
) -> list[str]:
    cfg = build_config(preset)
    args = [
        "--device=cpu",
        "--compile=False",
        f"--block_size={cfg.block_size}",
        f"--batch_size={cfg.batch_size}",
        f"--n_layer={cfg.n_layer}",
        f"--n_head={cfg.n_head}",
        f"--n_embd={cfg.n_embd}",
        f"--dropout={cfg.dropout}",
        f"--max_iters={iters}",
        f"--lr_decay_iters={max(iters, 2000)}",
        f"--eval_interval={eval_interval}",
        f"--eval_iters={eval_iters or cfg.eval_iters}",
        "--log_interval=1",
    ]
    if preset == "cpu":
        args += ["--learning_rate=1e-3"]  # nanoGPT's README command for the CPU
    return args


def prepare(work: Path, nanogpt: Path) -> dict[str, str]:
    """Both sides' data from the same corpus, each prepared by its own code."""
    data = work / "data" / "shakespeare_char"
    data.mkdir(parents=True, exist_ok=True)
    shutil.copy(nanogpt / "data" / "shakespeare_char" / "prepare.py", data / "prepare.py")
    shutil.copy(CORPUS, data / "input.txt")
    shutil.copy(nanogpt / "configurator.py", work / "configurator.py")  # train.py opens it from cwd
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)
    return prepare_ours(work)


def prepare_ours(work: Path, corpus: Path = CORPUS) -> dict[str, str]:
    """gptpipe's tokenizer and train/val Parquet of the corpus, under work/gptpipe-data."""
    from model.data import split_tokens, write_tokens
    from model.tokenizer import train_tokenizer

    text = corpus.read_text(encoding="utf-8")
    tok = train_tokenizer("char", text)
    ids = tok.encode(text)
    ours = work / "gptpipe-data"
    ours.mkdir(exist_ok=True)
    (ours / "tokenizer.json").write_text(tok.to_json(), encoding="utf-8")
    for name, part in zip(("train", "val"), split_tokens(ids, 0.1, 256), strict=True):
        write_tokens(part, str(ours / f"{name}.parquet"), {"vocab_size": tok.vocab_size})
    return {name: str(ours / name) for name in ("tokenizer.json", "train.parquet", "val.parquet")}


def run_nanogpt(nanogpt: Path, work: Path, args: list[str]) -> tuple[str, float]:
    start = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            str(nanogpt / "train.py"),
            str(nanogpt / "config" / "train_shakespeare_char.py"),
            *args,
        ],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout, start


def run_ours(data: dict[str, str], work: Path, preset: str, overrides: list[str]):
    start = time.perf_counter()
    return run_training(data, work / "gptpipe-out", preset=preset, sets=overrides), start


def nanogpt_tokens_per_sec(stdout: str, tokens_per_iter: int) -> float:
    ms = [
        float(m)
        for m in re.findall(r"^iter (\d+): .*time ([\d.]+)ms", stdout, re.M)[5:]
        for m in [m[1]]
    ]
    return tokens_per_iter / (statistics.median(ms) / 1000)


def ours_tokens_per_sec(stdout: str) -> float:
    rates = [float(r.replace(",", "")) for r in re.findall(r"([\d,]+) tokens/s", stdout)[1:]]
    return statistics.median(rates)


def throughput(
    nanogpt: Path, work: Path, data, preset: str, iters: int, rounds: int, ours_set: list[str]
):
    cfg = build_config(preset)
    tokens_per_iter = cfg.batch_size * cfg.block_size
    theirs, ours = [], []
    # evaluations are not timed, and kept short (both sides evaluate at the start; gptpipe also
    # at the end): at the lecture's config its 200 batches would take minutes on a CPU
    for _ in range(rounds):
        out, _ = run_nanogpt(nanogpt, work, nanogpt_args(preset, iters, 10 * iters, eval_iters=2))
        theirs.append(nanogpt_tokens_per_sec(out, tokens_per_iter))
        log_every = max(1, iters // 6)
        overrides = [
            f"max_iters={iters}",
            f"eval_interval={10 * iters}",
            "eval_iters=2",
            f"log_interval={log_every}",
            "checkpoint_interval=0",
            *ours_set,
        ]
        out, _ = run_ours(data, work, preset, overrides)
        ours.append(ours_tokens_per_sec(out))
    return statistics.median(theirs), statistics.median(ours)


def time_to_quality(
    nanogpt: Path, work: Path, data, ours_set: list[str]
) -> tuple[float | None, float | None]:
    """Seconds from process start until the first evaluation with val loss <= TARGET_VAL."""

    def first_reaching(stdout: str, start: float, pattern: str) -> float | None:
        # both sides print their evaluation lines as they go; re-run with timestamps is
        # overkill, so use the line's position in the iteration count and the total wall time
        total = time.perf_counter() - start
        steps = [(int(s), float(v)) for s, v in re.findall(pattern, stdout, re.M)]
        last = max(s for s, _ in steps)
        hit = next((s for s, v in steps if v <= TARGET_VAL), None)
        return None if hit is None else total * hit / last

    out, start = run_nanogpt(nanogpt, work, nanogpt_args("cpu", 2000, 250))
    theirs = first_reaching(out, start, r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)")
    out, start = run_ours(data, work, "cpu", ours_set)
    ours = first_reaching(out, start, r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)")
    return theirs, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT checkout")
    parser.add_argument("--configs", nargs="+", default=["cpu"], choices=("cpu", "lecture"))
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quality", action="store_true")
    ours_help = "config overrides for gptpipe's side only, e.g. dtype=bfloat16"
    parser.add_argument("--ours-set", nargs="+", default=[], metavar="KEY=VALUE", help=ours_help)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gptpipe-vs-nanogpt"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = prepare(args.work, args.nanogpt.resolve())
    print(cpu_description())
    print(f"{'config':<8} {'nanoGPT tok/s':>14} {'gptpipe tok/s':>14} {'ratio':>7}")
    for preset in args.configs:
        iters = args.iters if preset == "cpu" else max(8, args.iters // 6)
        theirs, ours = throughput(
            args.nanogpt.resolve(), args.work, data, preset, iters, args.rounds, args.ours_set
        )
        print(f"{preset:<8} {theirs:>14,.0f} {ours:>14,.0f} {ours / theirs:>6.2f}x", flush=True)
    if args.quality:
        theirs, ours = time_to_quality(args.nanogpt.resolve(), args.work, data, args.ours_set)
        print(
            f"time to val loss <= {TARGET_VAL} (cpu config, 2000 iterations): nanoGPT "
            f"{theirs and f'{theirs:.1f} s'}, gptpipe {ours and f'{ours:.1f} s'}"
            + (f", ratio {ours / theirs:.2f}" if theirs and ours else "")
        )


if __name__ == "__main__":
    main()
