"""estimate_loss: eval mode (no dropout), no gradients, train mode restored, deterministic."""

import contextlib

import pytest
import torch

from model.config import GPTConfig
from model.dist import DistInfo
from model.evaluate import estimate_loss
from model.gpt import GPT

INFO = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
CONFIG = GPTConfig(vocab_size=65, block_size=8, n_embd=32, n_head=4, n_layer=2, dropout=0.3)
EVAL_ITERS = 3


def make_batches(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        (split, k): (
            torch.randint(65, (4, 8), generator=g),
            torch.randint(65, (4, 8), generator=g),
        )
        for split in ("train", "val")
        for k in range(EVAL_ITERS)
    }


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG).train()


@pytest.fixture
def batches() -> dict:
    return make_batches()


def batch_fn(batches: dict, calls: list | None = None):
    def batch(split: str, k: int):
        if calls is not None:
            calls.append((split, k))
        return batches[(split, k)]

    return batch


def test_dropout_is_off_and_gradients_are_off_inside_the_estimate(model, batches):
    seen = []  # (module name, module.training, grad enabled) at every forward call

    def record(name):
        def hook(module, args):
            seen.append((name, module.training, torch.is_grad_enabled()))

        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules()]
    try:
        estimate_loss(model, batch_fn(batches), ("train", "val"), EVAL_ITERS, INFO)
    finally:
        for h in handles:
            h.remove()
    dropouts = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert len(dropouts) == 2 * CONFIG.n_layer  # attention resid and feed-forward, per block
    assert dropouts <= {name for name, _, _ in seen}, "every Dropout ran"
    assert sum(1 for name, _, _ in seen if name == "") == 2 * EVAL_ITERS  # the model itself
    assert [entry for entry in seen if entry[1]] == [], "a module ran in train mode"
    assert [entry for entry in seen if entry[2]] == [], "a module ran with gradients on"


def test_model_is_back_in_train_mode_afterwards(model, batches):
    estimate_loss(model, batch_fn(batches), ("train", "val"), EVAL_ITERS, INFO)
    assert model.training
    assert all(m.training for m in model.modules())
    assert torch.is_grad_enabled()


def test_a_model_in_eval_mode_stays_in_eval_mode(model, batches):
    model.eval()
    estimate_loss(model, batch_fn(batches), ("val",), EVAL_ITERS, INFO)
    assert not any(m.training for m in model.modules())


def test_train_mode_is_restored_when_a_batch_fails(model, batches):
    def failing(split, k):
        if k == 1:
            raise RuntimeError("boom")
        return batches[(split, k)]

    with pytest.raises(RuntimeError, match="boom"):
        estimate_loss(model, failing, ("train",), EVAL_ITERS, INFO)
    assert all(m.training for m in model.modules())


def test_estimate_is_the_mean_eval_mode_loss_over_the_batches(model, batches):
    calls = []
    out = estimate_loss(model, batch_fn(batches, calls), ("train", "val"), EVAL_ITERS, INFO)
    assert set(out) == {"train", "val"}
    assert calls == [("train", k) for k in range(EVAL_ITERS)] + [
        ("val", k) for k in range(EVAL_ITERS)
    ]
    model.eval()
    with torch.no_grad():
        for split in ("train", "val"):
            losses = [model(*batches[(split, k)])[1].item() for k in range(EVAL_ITERS)]
            assert isinstance(out[split], float)
            assert out[split] == pytest.approx(sum(losses) / EVAL_ITERS, rel=1e-6)
    assert out["train"] != out["val"]


def test_estimates_with_dropout_are_deterministic(model, batches):
    a = estimate_loss(model, batch_fn(batches), ("train", "val"), EVAL_ITERS, INFO)
    b = estimate_loss(model, batch_fn(batches), ("train", "val"), EVAL_ITERS, INFO)
    assert a == b
    # the control: in train mode dropout=0.3 does change the loss from call to call
    x, y = batches[("train", 0)]
    with torch.no_grad():
        assert model(x, y)[1].item() != model(x, y)[1].item()


def test_the_autocast_context_wraps_every_forward(model, batches):
    entered = []

    @contextlib.contextmanager
    def autocast():
        entered.append(torch.is_grad_enabled())
        yield

    estimate_loss(model, batch_fn(batches), ("train", "val"), EVAL_ITERS, INFO, autocast=autocast)
    assert entered == [False] * (2 * EVAL_ITERS)


def test_evaluate_checkpoint_bits_scores_the_val_text_once(small_corpus, tmp_path):
    """The evaluate stage's measure: the losses and the val text's bits per byte from one load,
    equal to checkpoint_bits'; scores recorded before (`known`) are used, not measured again."""
    import numpy as np

    from model.data import write_tokens
    from model.evaluate import checkpoint_bits, evaluate_checkpoint, evaluate_checkpoint_bits
    from model.tokenizer import train_tokenizer
    from tests.test_bits_per_byte import save_checkpoint, train_tiny

    text = small_corpus.read_text(encoding="utf-8")[:30_000]
    tok = train_tokenizer("char", text)
    uris = {}
    for split, part in (("train", text[:27_000]), ("val", text[27_000:])):
        ids = tok.encode(part)
        with open(tmp_path / f"{split}.parquet", "wb") as f:
            write_tokens(ids, f, {"vocab_size": tok.vocab_size, "n_tokens": len(ids)})
        uris[split] = str(tmp_path / f"{split}.parquet")
    path = save_checkpoint(train_tiny(tok, text[:27_000], seed=1, steps=20), tok, tmp_path / "c.pt")
    asked = []
    losses, bits = evaluate_checkpoint_bits(
        path, uris, 4, 8, 1337, known=lambda settings: asked.append(settings)
    )
    assert losses == evaluate_checkpoint(path, uris, 4, 8, 1337)
    assert asked == [{"segment_tokens": 17, "n_segments": 32, "tokenizer": tok.to_json()}]
    assert not bits["recorded"] and len(bits["bytes"]) == 32  # 3000 val tokens hold 176 of 17
    alone = checkpoint_bits(path, uris["val"], n_segments=32, batch_size=8)
    assert bits["val_bpb"] == pytest.approx(alone["val_bpb"]) and 2 < bits["val_bpb"] < 7
    assert bits["val_bpb"] == pytest.approx(bits["nats"].sum() / bits["bytes"].sum() / np.log(2))
    recorded = (np.full(3, 7.0), np.array([2, 2, 3]))
    _, again = evaluate_checkpoint_bits(path, uris, 4, 8, 1337, known=lambda s: recorded)
    assert again["recorded"] and again["val_bpb"] == pytest.approx(21 / 7 / np.log(2))
