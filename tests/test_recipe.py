"""The training recipe (model/recipe.py): schedules, optimizer groups, Muon beside AdamW, the
initial weights' scale; and that a config naming none of it trains as it always did."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from model.config import GPTConfig, TrainConfig, build_config
from model.gpt import GPT
from model.recipe import (
    Muon,
    MuonWithAdamW,
    clip_gradients,
    get_lr,
    make_optimizer,
    orthogonalize,
    set_lr,
)

TINY = GPTConfig(vocab_size=17, block_size=8, n_embd=16, n_head=2, n_layer=2, dropout=0.0)


def tiny_model(seed: int = 0, **init) -> GPT:
    torch.manual_seed(seed)
    return GPT(TINY, **init)


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY.vocab_size, (4, TINY.block_size + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def train_steps(model: GPT, cfg: TrainConfig, steps: int, optimizer=None) -> list[float]:
    optimizer = optimizer or make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = []
    for step in range(steps):
        set_lr(optimizer, step, cfg)
        _, loss = model(*batch())  # one batch, learnt by heart
        loss.backward()
        if cfg.grad_clip:
            clip_gradients(optimizer, scaler, cfg.grad_clip)
        scaler.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------- schedules


def test_cosine_is_the_formula_it_always_was():
    cfg = TrainConfig(lr_schedule="cosine", learning_rate=1e-3, min_lr=1e-4, warmup_iters=10)
    cfg = dataclasses.replace(cfg, max_iters=110)
    assert get_lr(0, cfg) == 1e-3 * 1 / 11
    assert get_lr(10, cfg) == pytest.approx(1e-3)
    assert get_lr(60, cfg) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))
    assert get_lr(110, cfg) == pytest.approx(1e-4)


def test_linear_goes_straight_down_to_the_floor():
    cfg = TrainConfig(lr_schedule="linear", learning_rate=1e-3, min_lr=0.0, max_iters=100)
    assert get_lr(0, cfg) == pytest.approx(1e-3)
    assert get_lr(50, cfg) == pytest.approx(5e-4)
    assert get_lr(75, cfg) == pytest.approx(2.5e-4)
    assert get_lr(100, cfg) == 0.0


def test_wsd_holds_the_peak_then_decays_over_the_last_fraction():
    cfg = TrainConfig(
        lr_schedule="wsd",
        learning_rate=1e-3,
        min_lr=1e-4,
        warmup_iters=10,
        max_iters=100,
        decay_fraction=0.4,
    )
    assert get_lr(4, cfg) == pytest.approx(1e-3 * 5 / 11)  # warming up
    assert [get_lr(i, cfg) for i in (10, 30, 59)] == [1e-3] * 3  # stable
    assert get_lr(60, cfg) == pytest.approx(1e-3)  # the decay starts at 100 - 40
    assert get_lr(80, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert get_lr(100, cfg) == pytest.approx(1e-4)
    everything = dataclasses.replace(cfg, decay_fraction=1.0)  # decays from the warmup's end
    assert get_lr(55, everything) == pytest.approx(1e-4 + 0.5 * 9e-4)


# ----------------------------------------------------------------------------- optimizers


def test_default_optimizer_is_the_fused_adamw_it_was():
    model = tiny_model()
    optimizer = make_optimizer(model, TrainConfig(weight_decay=0.1))
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert decayed["params"] == [p for p in model.parameters() if p.dim() >= 2]
    assert plain["params"] == [p for p in model.parameters() if p.dim() < 2]


def test_hidden_weight_decay_spares_embeddings_and_lm_head():
    model = tiny_model()
    cfg = TrainConfig(weight_decay=0.1, weight_decay_params="hidden")
    decayed, plain = make_optimizer(model, cfg).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decayed["params"]} == {
        n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks.")
    }
    assert "token_embedding_table.weight" in {names[id(p)] for p in plain["params"]}
    assert "lm_head.weight" in {names[id(p)] for p in plain["params"]}


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = tiny_model()
    cfg = TrainConfig(optimizer="muon", learning_rate=2e-3, muon_lr=0.04, weight_decay=0.1)
    optimizer = make_optimizer(model, cfg)
    assert isinstance(optimizer, MuonWithAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[id(p)] for g in optimizer.muon.param_groups for p in g["params"]}
    on_adamw = {names[id(p)] for g in optimizer.adamw.param_groups for p in g["params"]}
    assert on_muon == {n for n, p in model.named_parameters() if n.startswith("blocks.")} - {
        n for n, p in model.named_parameters() if p.dim() < 2
    }
    assert on_muon and "blocks.0.ffwd.net.0.weight" in on_muon
    assert on_adamw == set(names.values()) - on_muon
    set_lr(optimizer, 5, dataclasses.replace(cfg, lr_schedule="linear", max_iters=10))
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(0.04 * 0.5)
    assert optimizer.adamw.param_groups[0]["lr"] == pytest.approx(2e-3 * 0.5)


def test_muon_trains_and_continues_exactly_from_its_state_dict():
    cfg = TrainConfig(optimizer="muon", learning_rate=3e-3, muon_lr=0.05, grad_clip=1.0)
    model = tiny_model()
    losses = train_steps(model, cfg, 30)
    assert losses[-1] < losses[0] - 0.5  # it learns the batches

    straight = tiny_model()
    opt = make_optimizer(straight, cfg)
    train_steps(straight, cfg, 3, opt)
    saved_model = {k: v.clone() for k, v in straight.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # its tensors are the live state
    after = train_steps(straight, cfg, 3, opt)

    resumed = tiny_model(seed=99)
    resumed.load_state_dict(saved_model)
    opt2 = make_optimizer(resumed, cfg)
    opt2.load_state_dict(saved_opt)
    assert train_steps(resumed, cfg, 3, opt2) == after


def test_init_std_scales_the_initial_weights():
    default, wide = tiny_model(), tiny_model(init_std=0.08)
    w = "blocks.0.ffwd.net.0.weight"
    ratio = wide.state_dict()[w].std() / default.state_dict()[w].std()
    assert ratio == pytest.approx(4.0, rel=1e-4)  # the same draw, scaled
    assert torch.equal(default.state_dict()[w], tiny_model().state_dict()[w])
    assert default.state_dict()[w].std() == pytest.approx(0.02, rel=0.1)


def test_a_config_without_the_new_settings_is_unchanged():
    """The presets name none of the new settings: their defaults are what the loop did."""
    for preset in ("seed", "lecture"):
        cfg = build_config(preset)
        assert (cfg.optimizer, cfg.weight_decay_params, cfg.init_std) == ("adamw", "matrices", 0.02)
        assert cfg.lr_schedule == "constant"
        assert all(get_lr(i, cfg) == cfg.learning_rate for i in (0, 100, cfg.max_iters))


def test_muon_with_adamw_clips_over_all_gradients():
    model = tiny_model()
    cfg = TrainConfig(optimizer="muon")
    optimizer = make_optimizer(model, cfg)
    _, loss = model(*batch())
    (loss * 1000).backward()
    clip_gradients(optimizer, torch.amp.GradScaler("cpu", enabled=False), 1.0)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert math.isclose(torch.nn.utils.get_total_norm(grads).item(), 1.0, rel_tol=1e-4)


def test_batched_muon_steps_as_torch_muon_does():
    """model.recipe.Muon orthogonalises in float32, batched by shape; torch's in bfloat16 one
    matrix at a time: the same update up to bf16's rounding, and the same state."""
    ours, theirs = tiny_model(), tiny_model()
    hidden = lambda m: [p for n, p in m.named_parameters() if p.dim() == 2 and "blocks" in n]  # noqa: E731
    settings = {"lr": 0.05, "weight_decay": 0.1, "momentum": 0.9}
    opt_ours = Muon(hidden(ours), **settings)
    opt_theirs = torch.optim.Muon(hidden(theirs), **settings)
    before = [p.clone() for p in hidden(ours)]
    for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
        for step in range(2):
            _, loss = model(*batch(step))
            loss.backward()
            opt.step()
            opt.zero_grad()
    for start, a, b in zip(before, hidden(ours), hidden(theirs), strict=True):
        moved_a, moved_b = (a - start).detach().flatten(), (b - start).detach().flatten()
        assert torch.cosine_similarity(moved_a, moved_b, dim=0) > 0.98
        assert moved_a.norm() == pytest.approx(moved_b.norm().item(), rel=0.02)
    opt_theirs.load_state_dict(opt_ours.state_dict())  # the same state layout
    assert opt_ours.state_dict()["state"].keys() == opt_theirs.state_dict()["state"].keys()


def test_muon_orthogonalizes_at_the_trainings_matmul_precision():
    """bf16 where the forward runs in bf16 (the precision probe's choice), else float32."""
    from model.precision import Precision
    from model.trainer import TrainingState

    cfg = TrainConfig(optimizer="muon")
    for dtype, expected in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        state = TrainingState.create(
            cfg, TINY, Precision(dtype, "test"), torch.device("cpu"), "{}", ""
        )
        assert state.optimizer.muon.orthogonalize_in == expected
    updates = torch.randn(3, 16, 48, generator=torch.Generator().manual_seed(0))
    coefficients = (3.4445, -4.775, 2.0315)
    low = orthogonalize(updates, coefficients, 5, 1e-7, torch.bfloat16).float()
    full = orthogonalize(updates, coefficients, 5, 1e-7, torch.float32)
    assert low.dtype == full.dtype == torch.float32
    assert torch.cosine_similarity(low.flatten(), full.flatten(), dim=0) > 0.99
    singular_values = torch.linalg.svdvals(
        full
    )  # near 1: Newton-Schulz's quintic lands in ~[0.5, 1.5]
    assert singular_values.min() > 0.4 and singular_values.max() < 1.6
