"""gptpipe's training loop against the lecture's model and loop, as separate runs, alternating.

The lecture's side is its gpt.py training loop: `get_batch` stacking one window per sample in
Python, the per-head model (bench/lecture_reference.py), AdamW, `loss.backward()`. gptpipe's side
is `python -m model.train` on the same corpus and config. Both report steady-state tokens/s
(evaluation excluded); the table gives medians over rounds and the ratio.

    .venv/bin/python -m bench.vs_lecture_loop [--configs seed cpu] [--iters 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import run_module
from bench.vs_nanogpt import CORPUS, ours_tokens_per_sec, run_ours
from model.config import build_config
from model.machine import cpu_description


def lecture_worker(preset: str, iters: int) -> float:
    """The lecture's loop, timed over its last 80% of iterations; returns tokens/s."""
    from bench.lecture_reference import GPTLanguageModel

    cfg = build_config(preset)
    text = CORPUS.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    train_data = data[: int(0.9 * len(data))]

    def get_batch():
        ix = torch.randint(len(train_data) - cfg.block_size, (cfg.batch_size,))
        x = torch.stack([train_data[i : i + cfg.block_size] for i in ix])
        y = torch.stack([train_data[i + 1 : i + cfg.block_size + 1] for i in ix])
        return x, y

    torch.manual_seed(1337)
    model = GPTLanguageModel(
        len(chars), cfg.block_size, cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.dropout
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    warm = iters // 5
    for it in range(iters):
        if it == warm:
            start = time.perf_counter()
        xb, yb = get_batch()
        _, loss = model(xb, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (iters - warm) * cfg.batch_size * cfg.block_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["seed", "cpu"])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps({"tokens_per_sec": lecture_worker(args.worker, args.iters)}))
        return

    from bench.vs_nanogpt import prepare_ours

    print(cpu_description())

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare_ours(work)
        print(f"{'config':<8} {'lecture tok/s':>14} {'gptpipe tok/s':>14} {'ratio':>7}")
        for preset in args.configs:
            theirs, ours = [], []
            for _ in range(args.rounds):
                flags = ["--worker", preset, "--iters", str(args.iters)]
                worker = run_module("bench.vs_lecture_loop", *flags)
                theirs.append(json.loads(worker)["tokens_per_sec"])
                overrides = [
                    f"max_iters={args.iters}",
                    f"eval_interval={10 * args.iters}",
                    f"log_interval={max(1, args.iters // 5)}",
                    "checkpoint_interval=0",
                ]
                out, _ = run_ours(data, work, preset, overrides)
                ours.append(ours_tokens_per_sec(out))
            lecture, mine = statistics.median(theirs), statistics.median(ours)
            print(
                f"{preset:<8} {lecture:>14,.0f} {mine:>14,.0f} {mine / lecture:>6.2f}x", flush=True
            )


if __name__ == "__main__":
    main()
