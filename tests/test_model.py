"""The model: parameter counts, config checks, equivalence with the lecture's gpt.py, generate."""

import dataclasses

import pytest
import torch

from bench.lecture_reference import GPTLanguageModel
from model.config import GPTConfig
from model.gpt import GPT
from storage.errors import GptpipeError

SEED_SHAPE = dict(vocab_size=65, block_size=8, n_embd=64, n_head=4, n_layer=4)
LECTURE_SHAPE = dict(vocab_size=65, block_size=256, n_embd=384, n_head=6, n_layer=6)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lecture_model(seed: int = 1337, dropout: float = 0.0, **shape) -> GPTLanguageModel:
    torch.manual_seed(seed)
    return GPTLanguageModel(**{**SEED_SHAPE, **shape}, dropout=dropout)


def random_batch(vocab_size: int, B: int, T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(vocab_size, (B, T), generator=g)
    targets = torch.randint(vocab_size, (B, T), generator=g)
    return idx, targets


# ----------------------------------------------------------------------------- parameter counts


def test_seed_config_has_208193_parameters():
    gpt = GPT(GPTConfig(**SEED_SHAPE, dropout=0.0))
    assert gpt.num_params() == 208_193
    assert n_params(gpt) == 208_193
    assert n_params(lecture_model()) == 208_193


def test_lecture_full_config_has_10788929_parameters():
    assert GPTConfig() == GPTConfig(**LECTURE_SHAPE, dropout=0.2)  # the defaults are the lecture's
    assert GPT(GPTConfig()).num_params() == 10_788_929
    assert n_params(GPTLanguageModel(**LECTURE_SHAPE, dropout=0.2)) == 10_788_929


def test_lecture_reference_keeps_the_lecture_state_dict_keys():
    sd = lecture_model().state_dict()
    for key in (
        "token_embedding_table.weight",
        "position_embedding_table.weight",
        "blocks.0.sa.heads.0.key.weight",
        "blocks.0.sa.heads.0.query.weight",
        "blocks.0.sa.heads.0.value.weight",
        "blocks.0.sa.heads.0.tril",
        "blocks.3.sa.heads.3.tril",
        "blocks.0.sa.proj.weight",
        "blocks.0.sa.proj.bias",
        "blocks.0.ffwd.net.0.weight",
        "blocks.0.ffwd.net.2.bias",
        "blocks.0.ln1.weight",
        "blocks.0.ln2.bias",
        "ln_f.weight",
        "lm_head.weight",
        "lm_head.bias",
    ):
        assert key in sd, key
    assert sd["blocks.0.sa.heads.0.key.weight"].shape == (16, 64)  # head_size 64 / 4
    assert torch.equal(sd["blocks.0.sa.heads.0.tril"], torch.tril(torch.ones(8, 8)))
    assert "blocks.4.ln1.weight" not in sd


# ----------------------------------------------------------------------------- config checks


def test_n_embd_must_be_divisible_by_n_head():
    with pytest.raises(GptpipeError, match=r"n_embd \(64\) must be divisible by n_head \(5\)"):
        GPTConfig(**{**SEED_SHAPE, "n_head": 5})


@pytest.mark.parametrize("name", ["vocab_size", "block_size", "n_embd", "n_head", "n_layer"])
@pytest.mark.parametrize("value", [0, -3])
def test_sizes_must_be_positive(name, value):
    with pytest.raises(GptpipeError) as info:
        GPTConfig(**{**SEED_SHAPE, name: value})
    assert str(info.value) == f"{name} must be positive, got {value}"


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_dropout_must_be_in_zero_one(dropout):
    with pytest.raises(GptpipeError, match=r"dropout must be in \[0, 1\)"):
        GPTConfig(**SEED_SHAPE, dropout=dropout)


@pytest.mark.parametrize("dropout", [0.0, 0.2, 0.99])
def test_valid_dropouts_are_accepted(dropout):
    assert GPTConfig(**SEED_SHAPE, dropout=dropout).dropout == dropout


def test_config_messages_are_one_line():
    bad = [{"n_head": 5}, {"n_layer": 0}, {"dropout": 2.0}]
    for override in bad:
        with pytest.raises(GptpipeError) as info:
            GPTConfig(**{**SEED_SHAPE, **override})
        assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- lecture equivalence


@pytest.mark.parametrize(
    "shape",
    [SEED_SHAPE, dict(vocab_size=50, block_size=16, n_embd=32, n_head=2, n_layer=3)],
    ids=["seed", "other"],
)
def test_from_lecture_state_dict_infers_the_config(shape):
    ref = lecture_model(**shape)
    gpt = GPT.from_lecture_state_dict(ref.state_dict())
    assert gpt.config == GPTConfig(**shape, dropout=0.0, bias=True)
    assert gpt.num_params() == n_params(ref)
    assert GPT.from_lecture_state_dict(ref.state_dict(), dropout=0.2).config.dropout == 0.2
    # the per-head matrices were fused and the masks dropped
    keys = set(gpt.state_dict())
    assert "blocks.0.sa.qkv.weight" in keys
    assert not any(".heads." in k or k.endswith("tril") for k in keys)


def test_converted_qkv_stacks_queries_then_keys_then_values():
    ref = lecture_model()
    sd = ref.state_dict()
    qkv = GPT.from_lecture_state_dict(sd).state_dict()["blocks.2.sa.qkv.weight"]
    assert qkv.shape == (3 * 64, 64)
    for role_index, role in enumerate(("query", "key", "value")):
        for h in range(4):
            rows = qkv[role_index * 64 + h * 16 : role_index * 64 + (h + 1) * 16]
            assert torch.equal(rows, sd[f"blocks.2.sa.heads.{h}.{role}.weight"])


@pytest.mark.parametrize("T", [8, 5, 1], ids=["T=block_size", "T=5", "T=1"])
def test_converted_model_matches_the_lecture_logits_and_loss(T):
    ref = lecture_model(seed=7).eval()
    gpt = GPT.from_lecture_state_dict(ref.state_dict()).eval()
    idx, targets = random_batch(65, B=4, T=T, seed=T)
    with torch.no_grad():
        ref_logits, ref_none = ref(idx)
        gpt_logits, gpt_none = gpt(idx)
        ref_flat, ref_loss = ref(idx, targets)
        gpt_logits2, gpt_loss = gpt(idx, targets)
    assert ref_none is None and gpt_none is None
    assert gpt_logits.shape == ref_logits.shape == (4, T, 65)
    torch.testing.assert_close(gpt_logits, ref_logits, atol=1e-5, rtol=1e-5)
    # the lecture flattens the logits when targets are given; ours keep (B, T, vocab)
    assert ref_flat.shape == (4 * T, 65)
    torch.testing.assert_close(gpt_logits2.view(4 * T, 65), ref_flat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gpt_loss, ref_loss, atol=1e-5, rtol=1e-5)
    # the loss is the usual cross-entropy of an untrained model: about ln(65)
    assert abs(gpt_loss.item() - torch.log(torch.tensor(65.0)).item()) < 0.2


def test_converted_model_matches_the_lecture_in_float64():
    ref = lecture_model(seed=3).eval()
    gpt = GPT.from_lecture_state_dict(ref.state_dict()).eval()
    ref, gpt = ref.double(), gpt.double()
    idx, targets = random_batch(65, B=3, T=6, seed=1)
    with torch.no_grad():
        gpt_logits, gpt_loss = gpt(idx, targets)
        ref_logits, ref_loss = ref(idx, targets)
    assert gpt_logits.dtype == torch.float64
    torch.testing.assert_close(gpt_logits.view(-1, 65), ref_logits, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gpt_loss, ref_loss, atol=1e-12, rtol=1e-12)


def test_a_model_with_other_weights_does_not_match():
    """Guards the equivalence tests: two different initialisations must differ."""
    ref = lecture_model(seed=1).eval()
    gpt = GPT.from_lecture_state_dict(lecture_model(seed=2).state_dict()).eval()
    idx, _ = random_batch(65, B=2, T=8)
    with torch.no_grad():
        assert not torch.allclose(gpt(idx)[0], ref(idx)[0], atol=1e-5)


def assert_same_weights(gpt: GPT, ref: GPTLanguageModel, atol: float, rtol: float) -> None:
    """Compare every lecture parameter with its slice of the fused model, without converting."""
    gpt_sd, C, nh = gpt.state_dict(), gpt.config.n_embd, gpt.config.n_head
    hs = C // nh
    for key, ref_value in ref.state_dict().items():
        if key.endswith(".tril"):
            continue
        if ".sa.heads." in key:
            layer, _, _, head, role, _ = key.split(".")[1:]
            row = ("query", "key", "value").index(role) * C + int(head) * hs
            ours = gpt_sd[f"blocks.{layer}.sa.qkv.weight"][row : row + hs]
        else:
            ours = gpt_sd[key]
        torch.testing.assert_close(
            ours, ref_value, atol=atol, rtol=rtol, msg=lambda detail, key=key: f"{key}: {detail}"
        )


@pytest.mark.parametrize(
    # Adam divides by sqrt(v) + eps: a gradient near zero is float32 rounding noise (summed in
    # another order by another CPU's kernels), which the default eps (1e-8) turns into most of a
    # full lr step (6.4e-4 of 1e-3 seen on an AMD EPYC). eps 1e-6, on both sides, keeps such
    # elements still, and the rest within 2e-4; in float64 the two stay equal to ~1e-12.
    "dtype, atol, eps",
    [(torch.float32, 2e-4, 1e-6), (torch.float64, 1e-9, 1e-8)],
    ids=["float32", "float64"],
)
def test_training_steps_keep_the_converted_model_equal_to_the_lecture(dtype, atol, eps):
    ref = lecture_model(seed=11)
    gpt = GPT.from_lecture_state_dict(ref.state_dict())
    ref, gpt = ref.to(dtype).train(), gpt.to(dtype).train()
    assert_same_weights(gpt, ref, atol=0, rtol=0)
    start = {k: v.clone() for k, v in gpt.state_dict().items()}
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, eps=eps)
    opt_gpt = torch.optim.AdamW(gpt.parameters(), lr=1e-3, eps=eps)
    for step in range(4):
        idx, targets = random_batch(65, B=8, T=8, seed=100 + step)
        _, ref_loss = ref(idx, targets)
        _, gpt_loss = gpt(idx, targets)
        torch.testing.assert_close(gpt_loss, ref_loss, atol=10 * atol, rtol=0)
        for loss, opt in ((ref_loss, opt_ref), (gpt_loss, opt_gpt)):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        assert_same_weights(gpt, ref, atol=atol, rtol=0)
    # training did move the weights by several lr steps, so the comparison above is not vacuous
    moved = max((gpt.state_dict()[k] - start[k]).abs().max().item() for k in start)
    assert moved > 3e-3


# ----------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**SEED_SHAPE, dropout=0.0)).eval()


def greedy_by_hand(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(idx[:, -model.config.block_size :])
            idx = torch.cat((idx, logits[:, -1, :].argmax(dim=-1, keepdim=True)), dim=1)
    return idx


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_generate_same_seed_same_tokens(gpt):
    idx = torch.zeros((2, 1), dtype=torch.long)
    a = gpt.generate(idx, 20, generator=generator(42))
    b = gpt.generate(idx, 20, generator=generator(42))
    c = gpt.generate(idx, 20, generator=generator(43))
    assert a.shape == (2, 21)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a[:, :1], idx)
    assert int(a.min()) >= 0 and int(a.max()) < 65


def test_generate_does_not_depend_on_the_global_rng_when_given_a_generator(gpt):
    idx = torch.zeros((1, 1), dtype=torch.long)
    torch.manual_seed(1)
    a = gpt.generate(idx, 15, generator=generator(5))
    torch.manual_seed(2)
    b = gpt.generate(idx, 15, generator=generator(5))
    assert torch.equal(a, b)


def test_temperature_zero_is_greedy(gpt):
    idx, _ = random_batch(65, B=3, T=4, seed=9)
    out = gpt.generate(idx, 12, temperature=0)
    assert torch.equal(out, greedy_by_hand(gpt, idx, 12))


def test_top_k_1_is_greedy(gpt):
    idx, _ = random_batch(65, B=3, T=4, seed=9)
    out = gpt.generate(idx, 12, temperature=1.0, top_k=1, generator=generator(0))
    assert torch.equal(out, greedy_by_hand(gpt, idx, 12))


def test_top_k_only_samples_among_the_k_most_likely(gpt):
    idx, _ = random_batch(65, B=16, T=8, seed=4)
    with torch.no_grad():
        logits, _ = gpt(idx)
    allowed = torch.topk(logits[:, -1, :], 3).indices  # (B, 3)
    out = gpt.generate(idx, 1, temperature=2.0, top_k=3, generator=generator(1))
    picked = out[:, -1:]  # (B, 1)
    assert bool((allowed == picked).any(dim=1).all())


def test_context_longer_than_block_size_is_cropped(gpt):
    block_size = gpt.config.block_size
    idx, _ = random_batch(65, B=2, T=block_size + 5, seed=3)
    out = gpt.generate(idx, 6, temperature=0)
    assert out.shape == (2, block_size + 5 + 6)
    assert torch.equal(out[:, : block_size + 5], idx)
    # only the last block_size tokens matter
    cropped = gpt.generate(idx[:, -block_size:], 6, temperature=0)
    assert torch.equal(out[:, block_size + 5 :], cropped[:, block_size:])


def test_forward_longer_than_block_size_raises(gpt):
    idx = torch.zeros((1, gpt.config.block_size + 1), dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds block_size 8"):
        gpt(idx)


def test_generate_samples_like_the_lecture_from_the_global_rng():
    """Without a generator, temperature 1 and no top_k sample exactly the lecture's tokens."""
    ref = lecture_model(seed=21).eval().double()
    gpt = GPT.from_lecture_state_dict(lecture_model(seed=21).state_dict()).eval().double()
    idx = torch.zeros((2, 1), dtype=torch.long)
    torch.manual_seed(99)
    with torch.no_grad():
        ref_out = ref.generate(idx, 25)  # crosses block_size, so the cropping is compared too
    torch.manual_seed(99)
    gpt_out = gpt.generate(idx, 25)
    assert torch.equal(gpt_out, ref_out)


def test_config_is_frozen():
    cfg = GPTConfig(**SEED_SHAPE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_layer = 2  # type: ignore[misc]
