"""Generate text from a checkpoint."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from model.checkpoint import load_checkpoint
from model.config import GPTConfig
from model.dist import pick_device
from model.gpt import GPT
from model.tokenizer import tokenizer_from_json
from storage.errors import GptpipeError


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: object
    checkpoint: dict


def load_model(uri: str, device: str = "auto") -> LoadedModel:
    """A model in eval mode with its tokenizer, from a checkpoint URI."""
    torch_device = pick_device(device)
    ckpt = load_checkpoint(uri, map_location=torch_device)
    try:
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        tokenizer = tokenizer_from_json(ckpt["tokenizer"])
    except (KeyError, TypeError, RuntimeError, GptpipeError) as exc:
        # a checkpoint from another program, or edited: missing keys, weights of another shape;
        # load_state_dict's message is a heading, then one line per weight that does not fit
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [repr(exc)]
        detail = f"no {exc}" if isinstance(exc, KeyError) else lines[min(1, len(lines) - 1)]
        raise GptpipeError(f"{uri} is not a usable gptpipe checkpoint: {detail[:300]}") from None
    model.to(torch_device).eval()
    return LoadedModel(model, tokenizer, ckpt)


def check_seed(seed: int) -> None:
    if not -(2**63) <= seed < 2**64:  # what torch.Generator.manual_seed accepts
        raise GptpipeError(f"seed must fit in 64 bits, got {seed}")


def row_seed(seed: int, row: int) -> int:
    """The seed of row ``row`` of prompts sampled together with ``seed``: ``seed + row`` (past
    2**64 - 1 it wraps to 0). Each prompt of a batch gets its own random stream, as varied as
    separate requests and as reproducible; row 0 is the prompt sent alone with ``seed``."""
    check_seed(seed)
    derived = seed + row
    return derived - 2**64 if derived >= 2**64 else derived


def sample_text(
    loaded: LoadedModel,
    prompt: str = "",
    *,
    max_new_tokens: int = 500,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 1337,
) -> tuple[str, list[str]]:
    """The prompt followed by max_new_tokens generated tokens, and notes for the user.

    Same seed, same text: sampling uses its own generator, not the global RNG. An empty prompt
    starts from a newline where the vocabulary has one (the lecture starts from token 0).
    """
    if max_new_tokens < 0:
        raise GptpipeError(f"max_new_tokens must not be negative, got {max_new_tokens}")
    if not (temperature >= 0 and math.isfinite(temperature)):  # rejects nan and inf too
        raise GptpipeError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise GptpipeError(f"top_k must be at least 1, got {top_k}")
    check_seed(seed)
    tokenizer, model = loaded.tokenizer, loaded.model
    notes: list[str] = []
    unknown = tokenizer.unknown_chars(prompt)
    if unknown:
        shown = ", ".join(repr(c) for c in unknown)
        raise GptpipeError(
            f"the prompt has characters the tokenizer does not know: {shown}; use only "
            "characters of the training corpus"
        )
    start = prompt if prompt else ("\n" if not tokenizer.unknown_chars("\n") else "")
    ids = tokenizer.encode(start) if start else [0]
    block_size = model.config.block_size
    if len(ids) > block_size:
        notes.append(
            f"the prompt is {len(ids)} tokens, more than block_size {block_size}: the model "
            f"sees only its last {block_size} tokens"
        )
    device = next(model.parameters()).device
    idx = torch.tensor([list(ids)], dtype=torch.long, device=device)  # (1, T)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature, top_k, generator=generator)
    text = tokenizer.decode(out[0].tolist())
    if not prompt and start:
        text = text[len(start) :]
    return text, notes
