"""Training-step throughput: gptpipe's GPT against the lecture's per-head model.

Both sides start from the same weights and train on the same batches in the same process, in
alternating rounds; the table shows median tokens/s and the ratio. The lecture's side is float32;
gptpipe's runs at the precision its training loop resolves for the config on this machine
(`dtype: auto`, model/precision.py; the last column says which).

    .venv/bin/python -m bench.train_step [--rounds 15] [--steps 10] [--configs seed cpu lecture]
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from bench.common import alternate, median
from bench.lecture_reference import GPTLanguageModel
from model.config import build_config
from model.gpt import GPT
from model.machine import cpu_description
from model.precision import resolve_precision
from model.train import make_optimizer

# the batch size each config is benchmarked at (its preset's)
CONFIGS = ("seed", "cpu", "lecture")


def make_sides(preset: str, steps: int):
    cfg = build_config(preset, overrides=["dropout=0.0"])
    torch.manual_seed(0)
    reference = GPTLanguageModel(65, cfg.block_size, cfg.n_embd, cfg.n_head, cfg.n_layer, 0.0)
    ours = GPT.from_lecture_state_dict(reference.state_dict())
    batches = []
    for _ in range(steps):
        window = torch.randint(65, (cfg.batch_size, cfg.block_size + 1))  # (B, T+1)
        batches.append((window[:, :-1].contiguous(), window[:, 1:].contiguous()))

    # gptpipe's side runs at the precision its training loop resolves for this config
    precision = resolve_precision(
        cfg, ours.config, torch.device("cpu"), planned_steps=cfg.max_iters
    )

    def trainer(model, optimizer, autocast=contextlib.nullcontext):
        def run_steps():
            for x, y in batches:
                with autocast():
                    _, loss = model(x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        return run_steps

    # the lecture's optimizer line, and ours (fused AdamW, decay on matrices only)
    lecture_opt = torch.optim.AdamW(reference.parameters(), lr=cfg.learning_rate)
    sides = {
        "lecture": trainer(reference, lecture_opt),
        "gptpipe": trainer(ours, make_optimizer(ours, cfg), lambda: precision.autocast("cpu")),
    }
    return sides, cfg.batch_size * cfg.block_size * steps, precision.dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed call")
    parser.add_argument("--configs", nargs="+", default=["seed", "cpu"], choices=CONFIGS)
    args = parser.parse_args()
    print(f"{cpu_description()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'config':<8} {'lecture tok/s':>14} {'gptpipe tok/s':>14} {'ratio':>7}  gptpipe")
    for preset in args.configs:
        sides, tokens, precision = make_sides(preset, args.steps)
        rounds = args.rounds if preset != "lecture" else max(3, args.rounds // 3)
        times = alternate(sides, rounds)
        lecture, ours = tokens / median(times["lecture"]), tokens / median(times["gptpipe"])
        print(
            f"{preset:<8} {lecture:>14,.0f} {ours:>14,.0f} {ours / lecture:>6.2f}x  {precision}",
            flush=True,
        )


if __name__ == "__main__":
    main()
