"""One training step with AdamW, with torch.optim.Muon beside AdamW, and with model.recipe's
batched Muon beside AdamW (orthogonalising in float32, and in bf16 where the training's forward
runs in bf16, as it then does): the same model, batch and precision, alternating in one process;
medians of the step time and the ratios to AdamW.

    .venv/bin/python -m bench.muon_step [--preset cpu] [--steps 30] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from model.config import build_config
from model.gpt import GPT
from model.machine import cpu_description
from model.precision import resolve_precision
from model.recipe import Muon, MuonWithAdamW, make_optimizer, set_lr


def torch_muon(model: GPT, cfg) -> MuonWithAdamW:
    """make_optimizer's Muon and AdamW, with torch's own Muon in place of ours."""
    ours = make_optimizer(model, cfg)
    muon = torch.optim.Muon(
        ours.muon.param_groups[0]["params"],
        lr=cfg.muon_lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.muon_momentum,
    )
    return MuonWithAdamW(muon, ours.adamw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cfg = build_config(args.preset, overrides=["optimizer=muon"])
    device = torch.device("cpu")
    precision = resolve_precision(cfg, cfg.model_config(65), device, planned_steps=cfg.max_iters)
    torch.manual_seed(0)
    x = torch.randint(0, 65, (cfg.batch_size, cfg.block_size))
    y = torch.randint(0, 65, (cfg.batch_size, cfg.block_size))
    sides = {
        "adamw": lambda m: make_optimizer(m, build_config(args.preset)),
        "torch.optim.Muon": lambda m: torch_muon(m, cfg),
        "model.recipe.Muon": lambda m: make_optimizer(m, cfg),
    }
    if precision.dtype == "bfloat16":
        sides["model.recipe.Muon, bf16"] = lambda m: make_optimizer(
            m, cfg, orthogonalize_in=torch.bfloat16
        )
    assert isinstance(make_optimizer(GPT(cfg.model_config(65)), cfg).muon, Muon)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, optimizer_for in sides.items():
            torch.manual_seed(0)
            model = GPT(cfg.model_config(65)).train()
            optimizer = optimizer_for(model)
            for step in range(args.steps + 3):
                if step == 3:  # after the first steps' allocations
                    start = time.perf_counter()
                set_lr(optimizer, step, cfg)
                with precision.autocast("cpu"):
                    _, loss = model(x, y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            times[name].append((time.perf_counter() - start) / args.steps)
    print(cpu_description())
    print(f"preset {args.preset}, {precision.describe()}, {torch.get_num_threads()} threads")
    base = statistics.median(times["adamw"])
    for name, values in times.items():
        ms = statistics.median(values) * 1000
        print(f"{name:<24} {ms:7.1f} ms a step  {ms / 1000 / base:5.2f}x adamw")


if __name__ == "__main__":
    main()
