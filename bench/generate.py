"""Sampling speed: gptpipe's cached `GPT.generate` against the lecture's generate loop.

The lecture's full config (block_size 256, n_embd 384, 6 heads, 6 layers, vocab 65) with random
weights, the same on both sides (`GPT.from_lecture_state_dict` of the reference's state_dict),
batch 1, float32, eval mode, temperature 1. Both sides run in one process in alternating rounds;
the table shows median seconds per call, new tokens/s and the ratio. The lecture's loop is timed
under torch.no_grad (the lecture's script calls it without, so it also records autograd
graphs).

A case is PROMPT:NEW, a prompt of PROMPT tokens extended by NEW tokens. While the sequence fits
in block_size the cache makes each new token cost one position; past block_size every step runs
the whole 256-token window again on both sides (see `GPT.generate`), so that case's ratio is
mostly the fused model's against the per-head one.

A case that fits in block_size gets --rounds rounds (5), a longer one --long-rounds (3): on an
idle 2-core machine the default run takes about 2 minutes, nearly all of it the lecture's loop and
the 500-token case. Timings on a shared machine swing by several times with the other load (small
ops suffer most), so the load average is printed before and after; --threads 1 is much less
sensitive to it.

    .venv/bin/python -m bench.generate [--rounds 5] [--long-rounds 3] [--cases 1:255 1:500]
    .venv/bin/python -m bench.generate --quick    # 1:64 and 250:20, 3 rounds each
    .venv/bin/python -m bench.generate --uncached # also gptpipe without the cache
"""

from __future__ import annotations

import argparse
import os

import torch

from bench.common import alternate, median
from bench.lecture_reference import GPTLanguageModel
from model.gpt import GPT
from model.machine import cpu_description

LECTURE_SHAPE = dict(vocab_size=65, block_size=256, n_embd=384, n_head=6, n_layer=6)


def parse_case(text: str) -> tuple[int, int]:
    prompt, new = (int(part) for part in text.split(":"))
    if prompt < 1 or new < 1:
        raise argparse.ArgumentTypeError(f"a case is PROMPT:NEW with both >= 1, got {text}")
    return prompt, new


def make_sides(reference: GPTLanguageModel, ours: GPT, prompt: int, new: int, uncached: bool):
    idx = torch.randint(65, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    generator = torch.Generator()

    def lecture() -> None:
        with torch.no_grad():
            out = reference.generate(idx, new)
        assert out.shape == (1, prompt + new)

    def gptpipe(use_cache: bool = True) -> None:
        out = ours.generate(idx, new, generator=generator, use_cache=use_cache)
        assert out.shape == (1, prompt + new)

    sides = {"lecture": lecture, "gptpipe": gptpipe}
    if uncached:
        sides["uncached"] = lambda: gptpipe(use_cache=False)
    return sides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of a case within block")
    parser.add_argument("--long-rounds", type=int, default=3, help="rounds of a longer case")
    parser.add_argument("--cases", nargs="+", type=parse_case, default=None, metavar="P:N")
    parser.add_argument("--quick", action="store_true", help="cases 1:64 250:20, 3 rounds")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--uncached", action="store_true", help="also time gptpipe's generate without the cache"
    )
    args = parser.parse_args()
    print(cpu_description())
    cases = args.cases or ([(1, 64), (250, 20)] if args.quick else [(1, 255), (1, 500)])
    rounds, long_rounds = (3, 3) if args.quick else (args.rounds, args.long_rounds)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reference = GPTLanguageModel(**LECTURE_SHAPE, dropout=0.0).eval()
    ours = GPT.from_lecture_state_dict(reference.state_dict()).eval()
    block_size = ours.config.block_size
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; lecture config "
        f"(block_size {block_size}, n_embd 384, 6 heads, 6 layers, vocab 65), batch 1, float32; "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    header = f"{'case':<18} {'side':<9} {'median s':>9} {'new tok/s':>10} {'vs lecture':>11}"
    print(header)
    for prompt, new in cases:
        sides = make_sides(reference, ours, prompt, new, args.uncached)
        for warm in make_sides(reference, ours, prompt, min(new, 4), args.uncached).values():
            warm()  # a short warm-up call per side instead of a whole timed one
        fits = prompt + new <= block_size
        times = alternate(sides, rounds if fits else long_rounds, warmup=0)
        where = "<= block" if fits else "> block"
        lecture_s = median(times["lecture"])
        print(f"{len(times['lecture'])} alternating rounds, medians:", flush=True)
        for name, values in times.items():
            seconds = median(values)
            print(
                f"{f'{prompt}+{new} ({where})':<18} {name:<9} {seconds:>9.3f} "
                f"{new / seconds:>10.1f} {lecture_s / seconds:>10.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
    print(f"load average {os.getloadavg()[0]:.2f}")
