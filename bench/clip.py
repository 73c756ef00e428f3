"""Gradient clipping folded into the fused AdamW step against `clip_grad_norm_`, and no clipping.

The three sides train copies of one model on the same batches in one process, in alternating
rounds, float32 (what `dtype: auto` takes for these sizes on a CPU without native bf16); the
table shows median milliseconds a step and what clipping adds to a step without it.

    .venv/bin/python -m bench.clip [--rounds 15] [--steps 50] [--configs tiny cpu]
"""

from __future__ import annotations

import argparse

import torch

from bench.common import alternate, median
from model.config import build_config
from model.gpt import GPT
from model.machine import cpu_description
from model.train import clip_gradients, make_optimizer

# the tiny model of bench.tiny_default on the cpu preset's recipe, and the cpu preset itself
CONFIGS = {
    "tiny": ["block_size=8", "n_embd=64", "n_head=4", "n_layer=4", "batch_size=32"],
    "cpu": [],
}


def clip_grad_norm(optimizer, scaler, max_norm):
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


def no_clip(optimizer, scaler, max_norm):
    pass


def make_sides(name: str, steps: int):
    cfg = build_config("cpu", overrides=[*CONFIGS[name], "dropout=0.0"])
    batches = [
        (torch.randint(65, (cfg.batch_size, cfg.block_size)),) * 2 for _ in range(steps)
    ]  # (B, T) inputs and targets
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def trainer(clip):
        torch.manual_seed(0)
        model = GPT(cfg.model_config(65))
        optimizer = make_optimizer(model, cfg)

        def run_steps():
            for x, y in batches:
                _, loss = model(x, y)
                loss.backward()
                clip(optimizer, scaler, cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return run_steps

    sides = {
        "none": trainer(no_clip),
        "clip_grad_norm_": trainer(clip_grad_norm),
        "fused": trainer(clip_gradients),
    }
    return sides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=50, help="training steps per timed call")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    args = parser.parse_args()
    print(f"{cpu_description()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'config':<6} {'no clip':>9} {'clip_grad_norm_':>22} {'folded in the step':>22}")
    for name in args.configs:
        times = alternate(make_sides(name, args.steps), args.rounds)
        ms = {side: 1e3 * median(values) / args.steps for side, values in times.items()}
        base = ms["none"]
        cells = [
            f"{ms[s]:.3f} (+{100 * (ms[s] / base - 1):.1f}%)" for s in ("clip_grad_norm_", "fused")
        ]
        print(f"{name:<6} {base:>9.3f} {cells[0]:>22} {cells[1]:>22}  ms/step", flush=True)


if __name__ == "__main__":
    main()
