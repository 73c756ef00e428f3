"""The training step's gradient clipping, folded into the fused AdamW step, against torch's own
`clip_grad_norm_` on the same model and batches."""

from __future__ import annotations

import pytest
import torch

from model.config import GPTConfig, TrainConfig
from model.gpt import GPT
from model.train import clip_gradients, make_optimizer

TINY = GPTConfig(vocab_size=65, block_size=8, n_embd=32, n_head=4, n_layer=2, dropout=0.0)


def weights_after_steps(clip, *, steps: int = 20, scaler_enabled: bool = False) -> torch.Tensor:
    torch.manual_seed(0)
    model = GPT(TINY)
    optimizer = make_optimizer(model, TrainConfig(learning_rate=1e-3, weight_decay=0.1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scaler_enabled)
    batches = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randint(65, (2, 16, 8), generator=batches)
        _, loss = model(x, y)
        scaler.scale(loss).backward()
        clip(optimizer, scaler)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def reference_clip(max_norm: float):
    def clip(optimizer, scaler):
        scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    return clip


def ours(max_norm: float):
    return lambda optimizer, scaler: clip_gradients(optimizer, scaler, max_norm)


def no_clip(optimizer, scaler):
    pass


@pytest.mark.parametrize("scaler_enabled", [False, True], ids=["fused step", "grad scaler"])
def test_clipping_matches_clip_grad_norm(scaler_enabled):
    # 0.05 is far below these gradients' norm: every step is clipped
    expected = weights_after_steps(reference_clip(0.05), scaler_enabled=scaler_enabled)
    got = weights_after_steps(ours(0.05), scaler_enabled=scaler_enabled)
    unclipped = weights_after_steps(no_clip, scaler_enabled=scaler_enabled)
    assert (got - expected).abs().max() < 1e-6
    assert (unclipped - expected).abs().max() > 1e-3  # the clipping changed the training


def test_gradients_under_the_limit_are_left_as_they_are():
    got = weights_after_steps(ours(1e9))
    assert torch.equal(got, weights_after_steps(no_clip))
