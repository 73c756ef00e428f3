"""The training recipe around the model: the learning-rate schedule, the optimizer(s) and clipping.

Every choice is a `TrainConfig` setting whose default is what the loop always did (AdamW on all
parameters, weight decay on every matrix, a constant or cosine rate), so a config that names none
of the new settings trains exactly as before. The new ones:

- `lr_schedule`: `linear` (warmup, then a straight line down to min_lr at max_iters) and `wsd`
  (warmup, stable at learning_rate, then a straight line down to min_lr over the last
  `decay_fraction` of max_iters), beside `constant` and `cosine`.
- `weight_decay_params`: `matrices` (every 2-D weight: embeddings, lm_head and the blocks', as
  nanoGPT does) or `hidden` (the blocks' 2-D weights only).
- `optimizer`: `adamw`, or `muon`: `torch.optim.Muon` for the blocks' 2-D weights (attention's
  qkv and projection, the feed-forward's two layers) at `muon_lr`, while the embeddings, lm_head,
  biases and layer norms stay on AdamW, as the modded-nanogpt speedrun records do. Muon
  orthogonalises each matrix's momentum (5 Newton-Schulz steps), so every direction of a layer
  moves at the same rate.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch

from model.config import TrainConfig
from model.gpt import GPT


def get_lr(it: int, cfg: TrainConfig) -> float:
    """AdamW's learning rate at step ``it`` (Muon's is muon_lr times the same fraction): constant,
    or a linear warmup and then a decay to min_lr at max_iters (cosine, linear, or wsd's linear
    decay over the last decay_fraction of the steps)."""
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    start = cfg.warmup_iters
    if cfg.lr_schedule == "wsd":
        start = max(start, cfg.max_iters - round(cfg.decay_fraction * cfg.max_iters))
        if it < start:
            return cfg.learning_rate
    progress = min(1.0, (it - start) / max(1, cfg.max_iters - start))
    if cfg.lr_schedule == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        coeff = 1.0 - progress
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def set_lr(optimizer: Any, it: int, cfg: TrainConfig) -> float:
    """Set every param group's rate for step ``it``; returns AdamW's, the one logged."""
    lr = get_lr(it, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)
    return lr


def is_hidden_matrix(name: str, param: torch.nn.Parameter) -> bool:
    """A 2-D weight inside the blocks (not an embedding, not lm_head)."""
    return param.dim() == 2 and name.startswith("blocks.")


def _adamw(groups: list[dict], cfg: TrainConfig) -> torch.optim.AdamW:
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)


def make_optimizer(
    model: GPT, cfg: TrainConfig, *, orthogonalize_in: torch.dtype = torch.float32
) -> torch.optim.Optimizer | MuonWithAdamW:
    """AdamW, weight decay on the matrices `weight_decay_params` names (never on biases or layer
    norms); with optimizer=muon, Muon for the blocks' matrices and AdamW for the rest, its
    orthogonalisation in ``orthogonalize_in`` (the training's matmul precision: see `Muon`)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if is_hidden_matrix(n, p)]
    other_matrices = [p for n, p in named if p.dim() >= 2 and not is_hidden_matrix(n, p)]
    vectors = [p for _, p in named if p.dim() < 2]
    other_decay = cfg.weight_decay if cfg.weight_decay_params == "matrices" else 0.0
    if cfg.optimizer == "muon":
        muon = Muon(
            [{"params": hidden, "lr_ratio": cfg.muon_lr / cfg.learning_rate}],
            lr=cfg.muon_lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.muon_momentum,
            orthogonalize_in=orthogonalize_in,
        )
        rest = [
            {"params": other_matrices, "weight_decay": other_decay},
            {"params": vectors, "weight_decay": 0.0},
        ]
        return MuonWithAdamW(muon, _adamw(rest, cfg))
    if cfg.weight_decay_params == "matrices":  # the groups (and their order) the loop always had
        matrices = [p for _, p in named if p.dim() >= 2]
        groups = [
            {"params": matrices, "weight_decay": cfg.weight_decay},
            {"params": vectors, "weight_decay": 0.0},
        ]
    else:
        groups = [
            {"params": hidden, "weight_decay": cfg.weight_decay},
            {"params": other_matrices + vectors, "weight_decay": 0.0},
        ]
    return _adamw(groups, cfg)


def orthogonalize(
    updates: torch.Tensor,
    coefficients: tuple[float, float, float],
    steps: int,
    eps: float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(k, m, n) matrices -> k matrices with the same singular vectors and singular values near 1:
    Muon's quintic Newton-Schulz iteration (the same steps as torch.optim.Muon's), batched, its
    matmuls in ``dtype``."""
    a, b, c = coefficients
    x = updates.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # work on the wide side: its Gram matrix is the smaller one
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.mT  # (k, m, m)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon's update, parameter groups and state (its checkpoints load either way),
    stepped a shape at a time: the matrices of one shape are orthogonalised in one batched
    `orthogonalize`, instead of one bfloat16 Newton-Schulz per matrix.

    The iteration runs in ``orthogonalize_in``: the training passes bf16 where its forward runs
    in bf16 (a GPU, or a CPU with native bf16 matmuls where the precision probe found bf16
    faster), as the reference does on GPUs, and float32 otherwise: torch's always-bf16 step is
    about 50 times slower on an AVX2-only EPYC, which has no bf16 matmul. See
    docs/performance.md, "Time to quality", for the step times.
    """

    def __init__(self, params, *, orthogonalize_in: torch.dtype = torch.float32, **settings):
        super().__init__(params, **settings)
        self.orthogonalize_in = orthogonalize_in

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            by_shape: dict[torch.Size, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[p.shape].append(p)
            for shape, params in by_shape.items():
                grads = [p.grad for p in params]
                bufs = [
                    self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                    for p in params
                ]
                torch._foreach_lerp_(bufs, grads, 1 - momentum)
                if group["nesterov"]:
                    updates = torch.stack(grads).lerp_(torch.stack(bufs), momentum)
                else:
                    updates = torch.stack(bufs)
                ortho = orthogonalize(
                    updates,
                    group["ns_coefficients"],
                    group["ns_steps"],
                    group["eps"],
                    self.orthogonalize_in,
                )
                rows, cols = shape
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
                scale = lr * math.sqrt(max(1.0, rows / cols))  # torch's "original" adjustment
                torch._foreach_add_(params, list(ortho.to(params[0].dtype).unbind(0)), alpha=-scale)
        return loss


class MuonWithAdamW:
    """Two optimizers stepped as one: what the loop, GradScaler and checkpoints need of one.

    `GradScaler.step` calls `step()` (disabled) or unscales `param_groups` and then calls
    `step()` (float16), so both work through this; clipping takes the unfused path, since the
    fused AdamW's `grad_scale` would clip only its own share of the gradients.
    """

    defaults = {"fused": False}

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def clip_gradients(
    optimizer: torch.optim.Optimizer | MuonWithAdamW, scaler: torch.amp.GradScaler, max_norm: float
) -> None:
    """Scale the gradients to a total norm of at most max_norm before the optimizer's step, as
    `clip_grad_norm_` does, but without multiplying them in a pass of its own.

    The scale, min(1, max_norm / norm), is handed to the fused AdamW step as its `grad_scale`
    (the attribute GradScaler sets on fused optimizers), which divides each gradient by
    max(1, norm / max_norm) as it reads it. `clip_grad_norm_` multiplies every gradient in a
    kernel of its own first: on a CPU about 50 small kernels, which `python -m bench.clip`
    measured at 6.6% of a tiny model's step, against 4.3% for this (a Xeon, float32). With
    float16's GradScaler, whose own `grad_scale` that is, or Muon beside AdamW, the gradients
    are unscaled and clipped as usual.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if scaler.is_enabled() or not optimizer.defaults.get("fused"):
        scaler.unscale_(optimizer)  # clip the true gradients (a no-op without float16)
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    optimizer.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0)


__all__ = [
    "Muon",
    "MuonWithAdamW",
    "clip_gradients",
    "get_lr",
    "is_hidden_matrix",
    "make_optimizer",
    "orthogonalize",
    "set_lr",
]
