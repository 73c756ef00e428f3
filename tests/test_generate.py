"""GPT.generate with the key/value cache: the lecture's tokens, and the uncached loop's.

Exact comparisons run in float64, where the cached and the full forward agree to ~1e-15 and no
sampled or argmax token can flip; one float32 check at the lecture's full shape guards the real
configuration. Lengths go below, up to and well past block_size, where the window slides and the
cache can no longer be used.
"""

import pytest
import torch

from bench.lecture_reference import GPTLanguageModel
from model.config import GPTConfig
from model.gpt import GPT, KVCache

SEED_SHAPE = dict(vocab_size=65, block_size=8, n_embd=64, n_head=4, n_layer=4)
OTHER_SHAPE = dict(vocab_size=50, block_size=16, n_embd=32, n_head=2, n_layer=3)
LECTURE_SHAPE = dict(vocab_size=65, block_size=256, n_embd=384, n_head=6, n_layer=6)


def pair(shape: dict, seed: int = 1337, dtype: torch.dtype = torch.float64):
    """The lecture's model and ours with the same weights, both in eval mode."""
    torch.manual_seed(seed)
    ref = GPTLanguageModel(**shape, dropout=0.0)
    gpt = GPT.from_lecture_state_dict(ref.state_dict())
    return ref.eval().to(dtype), gpt.eval().to(dtype)


def prompt(vocab_size: int, B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def lecture_greedy(ref: GPTLanguageModel, idx: torch.Tensor, n: int) -> torch.Tensor:
    """The lecture's generate loop with argmax in place of multinomial."""
    for _ in range(n):
        logits, _ = ref(idx[:, -ref.block_size :])
        idx = torch.cat((idx, logits[:, -1, :].argmax(dim=-1, keepdim=True)), dim=1)
    return idx


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is as fast, and immune to a busy machine's other load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def seed_pair():
    return pair(SEED_SHAPE)


@pytest.fixture(scope="module")
def other_pair():
    return pair(OTHER_SHAPE, seed=5)


# ----------------------------------------------------------------------------- greedy


@pytest.mark.parametrize(
    "T, n",
    # block_size 8: stays below it, ends exactly at it, crosses it by one, goes far past it,
    # and prompts at and over block_size (cropped before the prefill)
    [(1, 3), (1, 7), (1, 8), (1, 100), (5, 100), (8, 20), (12, 20)],
)
def test_greedy_matches_the_lecture_loop(seed_pair, T, n):
    ref, gpt = seed_pair
    idx = prompt(65, B=3, T=T, seed=T + n)
    out = gpt.generate(idx, n, temperature=0)
    assert out.shape == (3, T + n)
    assert torch.equal(out[:, :T], idx)
    assert torch.equal(out, lecture_greedy(ref, idx, n))
    assert torch.equal(out, gpt.generate(idx, n, temperature=0, use_cache=False))


@pytest.mark.parametrize("B", [1, 4])
def test_greedy_matches_the_lecture_loop_other_shape(other_pair, B):
    ref, gpt = other_pair
    idx = prompt(50, B=B, T=3, seed=B)
    assert torch.equal(gpt.generate(idx, 100, temperature=0), lecture_greedy(ref, idx, 100))


def test_greedy_matches_the_lecture_loop_in_float32():
    ref, gpt = pair(OTHER_SHAPE, seed=8, dtype=torch.float32)
    idx = prompt(50, B=2, T=2, seed=3)
    assert torch.equal(gpt.generate(idx, 60, temperature=0), lecture_greedy(ref, idx, 60))


def test_greedy_at_the_lecture_shape_crossing_block_size_in_float32():
    """The full config, float32: a 250-token prompt, so the window starts sliding at token 7."""
    ref, gpt = pair(LECTURE_SHAPE, seed=2, dtype=torch.float32)
    idx = prompt(65, B=1, T=250, seed=4)
    out = gpt.generate(idx, 10, temperature=0)
    assert torch.equal(out, lecture_greedy(ref, idx, 10))


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    "temperature, top_k", [(1.0, None), (0.7, 5), (1.5, 1), (2.0, 65)], ids=str
)
def test_same_seed_samples_the_same_tokens_with_and_without_the_cache(
    seed_pair, temperature, top_k
):
    _, gpt = seed_pair
    idx = prompt(65, B=4, T=2, seed=1)
    cached = gpt.generate(idx, 60, temperature, top_k, generator=generator(7))
    uncached = gpt.generate(idx, 60, temperature, top_k, generator=generator(7), use_cache=False)
    assert torch.equal(cached, uncached)
    if top_k != 1:  # top_k=1 is greedy: every seed gives the same tokens
        assert not torch.equal(cached, gpt.generate(idx, 60, temperature, top_k, generator(8)))


def test_top_k_1_is_greedy_with_the_cache(other_pair):
    _, gpt = other_pair
    idx = prompt(50, B=2, T=4, seed=2)
    sampled = gpt.generate(idx, 40, temperature=1.3, top_k=1, generator=generator(0))
    assert torch.equal(sampled, gpt.generate(idx, 40, temperature=0))


def test_global_rng_samples_like_the_lecture_past_block_size(seed_pair):
    ref, gpt = seed_pair
    idx = torch.zeros((2, 1), dtype=torch.long)
    torch.manual_seed(3)
    with torch.no_grad():
        ref_out = ref.generate(idx, 40)
    torch.manual_seed(3)
    assert torch.equal(gpt.generate(idx, 40), ref_out)


# ----------------------------------------------------------------------------- the cached forward


def test_cached_forward_in_chunks_matches_the_full_forward(other_pair):
    """Prefill, a multi-token chunk after a cached prefix (the shifted mask), then single tokens."""
    _, gpt = other_pair
    idx = prompt(50, B=3, T=16, seed=6)
    cache = KVCache(gpt.config, 3, torch.float64, idx.device)
    with torch.no_grad():
        full = gpt(idx)[0]  # (B, T, vocab)
        for start, end in [(0, 5), (5, 9), (9, 10), (10, 16)]:
            last = gpt.forward_last(idx[:, start:end], cache)
            assert cache.length == end
            torch.testing.assert_close(last, full[:, end - 1], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(gpt.forward_last(idx), full[:, -1], atol=1e-12, rtol=1e-12)
        with pytest.raises(ValueError, match="do not fit in block_size 16"):
            gpt.forward_last(idx[:, :1], cache)


# ----------------------------------------------------------------------------- module state


def test_generate_keeps_the_training_flag_and_builds_no_graph():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**SEED_SHAPE, dropout=0.0))
    keys = list(gpt.state_dict())
    for training in (True, False):
        gpt.train(training)
        out = gpt.generate(torch.zeros((2, 1), dtype=torch.long), 12, generator=generator(0))
        assert all(m.training == training for m in gpt.modules())
        assert out.requires_grad is False and out.grad_fn is None
        assert torch.is_grad_enabled()
    assert all(p.grad is None for p in gpt.parameters())
    assert list(gpt.state_dict()) == keys  # the cache lives in generate, not on the module


def test_training_mode_with_dropout_takes_the_uncached_loop():
    """Dropout stays on in training mode, as before the cache: the same draws, the same tokens."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**SEED_SHAPE, dropout=0.2)).train()
    idx = torch.zeros((2, 1), dtype=torch.long)
    torch.manual_seed(4)
    a = gpt.generate(idx, 12, generator=generator(1))
    torch.manual_seed(4)
    b = gpt.generate(idx, 12, generator=generator(1), use_cache=False)
    assert torch.equal(a, b)
    assert gpt.training


def test_edge_cases(seed_pair):
    _, gpt = seed_pair
    idx = prompt(65, B=2, T=3)
    assert torch.equal(gpt.generate(idx, 0), idx)
    with pytest.raises(ValueError, match="at least one token"):
        gpt.generate(idx[:, :0], 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_greedy_with_the_cache_on_cuda():
    ref, gpt = pair(OTHER_SHAPE, seed=9)
    idx = prompt(50, B=3, T=2, seed=5)
    out = gpt.cuda().generate(idx.cuda(), 50, temperature=0)
    assert out.device.type == "cuda"
    assert torch.equal(out.cpu(), lecture_greedy(ref, idx, 50))
