"""The lecture's GPT, written once with a fused q/k/v projection and PyTorch's fused attention.

Same function and the same parameters as the lecture's per-head `Head`/`MultiHeadAttention`
modules: the `n_head` key, query and value matrices of a block are stacked into one `qkv` Linear,
and the masked softmax is `scaled_dot_product_attention(is_causal=True)`, which picks a flash or
memory-efficient kernel where one exists. `GPT.from_lecture_state_dict` converts the lecture's
weights into this layout.

`GPT.generate` decodes with a key/value cache (`KVCache`); see its docstring for why the cache is
only used while the sequence fits in `block_size`.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
from torch.nn import functional as F

from model.config import GPTConfig


class CausalSelfAttention(nn.Module):
    """All heads of one block at once: (B, T, C) -> (B, T, C)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        # rows [0:C) are the queries of heads 0..nh-1, then the keys, then the values
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # under CPU bf16 autocast: PyTorch's bf16 attention kernel for the CPU is about 5x
            # slower than its float32 one (fwd + bwd), so attention itself runs in float32
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(
                    q.float(), k.float(), v.float(), dropout_p=dropout_p, is_causal=True
                )
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        # out: (B, nh, T, hs)
        out = out.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side: (B, T, C)
        return self.resid_dropout(self.proj(out))

    def forward_cached(
        self,
        x: torch.Tensor,
        k_cache: torch.Tensor | None,
        v_cache: torch.Tensor | None,
        start: int,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Inference-only attention of x (B, T, C), the tokens at positions [start, start + T).

        The new keys and values are written into k_cache/v_cache (B, nh, block_size, hs) at
        [start, start + T) and the queries attend to every cached position before theirs. With
        no cache (None), start must be 0 and only x's own keys are used. last_only: return the
        output of the last position only, (B, 1, C), for when only the next token's logits are
        needed. No dropout: callers use this in eval mode.
        """
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        end = start + T
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if k_cache is not None and v_cache is not None:
            k_cache[:, :, start:end] = k
            v_cache[:, :, start:end] = v
            k, v = k_cache[:, :, :end], v_cache[:, :, :end]  # (B, nh, end, hs)
        elif start != 0:
            raise ValueError("attention without a cache must start at position 0")
        if last_only:
            q, T = q[:, -1:], 1
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if T == 1:
            # one query, the newest position: it sees every key, so no mask at all
            out = F.scaled_dot_product_attention(q, k, v)
        elif start == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # is_causal aligns the mask to the top left; queries after a cached prefix need it
            # shifted right by start
            mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(out)


class FeedForward(nn.Module):
    """The lecture's 4x ReLU MLP: (B, T, C) -> (B, T, C)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias),
            nn.ReLU(),
            nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    """Pre-norm transformer block: communication (attention) then computation (MLP)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.sa = CausalSelfAttention(config)
        self.ffwd = FeedForward(config)
        self.ln1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.ln2 = nn.LayerNorm(config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.sa(self.ln1(x))  # (B, T, C)
        x = x + self.ffwd(self.ln2(x))  # (B, T, C)
        return x

    def forward_cached(
        self,
        x: torch.Tensor,
        k_cache: torch.Tensor | None,
        v_cache: torch.Tensor | None,
        start: int,
        last_only: bool = False,
    ) -> torch.Tensor:
        """`forward` for inference with a key/value cache; see `CausalSelfAttention`."""
        attended = self.sa.forward_cached(self.ln1(x), k_cache, v_cache, start, last_only)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        x = x + attended
        return x + self.ffwd(self.ln2(x))


class KVCache:
    """Every layer's keys and values for positions [0, length), preallocated and filled in place.

    k, v: (n_layer, B, nh, block_size, hs); k[i] is layer i's (B, nh, block_size, hs) cache.
    """

    def __init__(
        self, config: GPTConfig, batch_size: int, dtype: torch.dtype, device: torch.device
    ):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, hs)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, *, init_std: float = 0.02):
        super().__init__()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding_table = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.Sequential(*[Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.bias)
        self.apply(lambda module: self._init_weights(module, init_std))

    @staticmethod
    def _init_weights(module: nn.Module, std: float) -> None:
        """The lecture's init (std 0.02): N(0, std) weights, zero biases; LayerNorm keeps ones
        and zeros."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx, targets: (B, T) token ids. Returns logits (B, T, vocab_size) and the mean loss."""
        B, T = idx.shape
        if self.config.block_size < T:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        tok_emb = self.token_embedding_table(idx)  # (B, T, C)
        pos_emb = self.position_embedding_table(torch.arange(T, device=idx.device))  # (T, C)
        x = tok_emb + pos_emb  # (B, T, C)
        x = self.blocks(x)  # (B, T, C)
        x = self.ln_f(x)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))
        return logits, loss

    def forward_last(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, vocab_size) of the token after idx (B, T); for inference only (no dropout).

        With a cache, idx holds the tokens at positions [cache.length, cache.length + T): their
        keys and values are added to the cache, earlier positions are read from it. Without one,
        idx is a whole context at positions [0, T), like `forward`'s. Either way only the last
        position goes through the last block's attention output, MLP, ln_f and lm_head: nothing
        else needs it.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        end = start + T
        if T == 0 or self.config.block_size < end:
            raise ValueError(
                f"positions [{start}, {end}) do not fit in block_size {self.config.block_size}"
            )
        x = self.token_embedding_table(idx) + self.position_embedding_table.weight[start:end]
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            k_cache = cache.k[i] if cache is not None else None
            v_cache = cache.v[i] if cache is not None else None
            x = block.forward_cached(x, k_cache, v_cache, start, last_only=i == last)
        if cache is not None:
            cache.length = end
        return self.lm_head(self.ln_f(x[:, -1]))  # (B, vocab_size)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        *,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens sampled tokens; the context is cropped to block_size.

        temperature 0 means greedy decoding (argmax). Each step is the lecture's: the next token
        is drawn from the logits of `self(idx[:, -block_size:])` at the last position, with
        positions counted from 0 at the start of that window.

        With use_cache (the default) the steps are computed with a key/value cache (`KVCache`):
        the context is run through the model once (prefill) and each new token then costs one
        position's worth of work, as long as the whole sequence fits in block_size. Once it
        does not, the window slides by one token every step and, with learned absolute position
        embeddings, *every* token of the window moves to a new position: its layer-0 input
        (token + position embedding) changes, and so do all keys and values of every layer.
        Nothing cached is valid any more, and there is no exact shortcut (the only part that
        depends on a token and its position alone, layer 0's ln1/qkv, is a few percent of the
        work). So each step past block_size runs the whole window again, as the lecture's loop
        does, but fused and with only the last position through the last block's MLP and the
        head. The tokens are those of the uncached loop: the same logits up to float rounding,
        and the same sampling calls on the same generator (or the global RNG).

        The cache is for inference: a model in training mode with dropout > 0 takes the uncached
        loop (dropout on, as before). The module's training flag is never changed.
        """
        if not use_cache or (self.training and self.config.dropout > 0) or max_new_tokens <= 0:
            return self._generate_uncached(idx, max_new_tokens, temperature, top_k, generator)
        B, T = idx.shape
        if T == 0:
            raise ValueError("generate needs at least one token of context")
        block_size = self.config.block_size
        out = torch.empty(
            (B, T + max_new_tokens),
            dtype=torch.promote_types(idx.dtype, torch.long),
            device=idx.device,
        )
        out[:, :T] = idx
        cache = KVCache(self.config, B, self.token_embedding_table.weight.dtype, idx.device)
        logits = self.forward_last(idx[:, -block_size:], cache)  # prefill: (B, vocab_size)
        for t in range(T, T + max_new_tokens):
            out[:, t : t + 1] = sample_next(logits, temperature, top_k, generator)  # (B, 1)
            if t + 1 == T + max_new_tokens:
                break
            if cache.length < block_size:
                logits = self.forward_last(out[:, t : t + 1], cache)  # one new position
            else:
                # the window slid: all positions changed, run the new window from position 0
                logits = self.forward_last(out[:, t + 1 - block_size : t + 1])
        return out

    @torch.no_grad()
    def _generate_uncached(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The lecture's loop: a full forward of the cropped context for every new token."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size :]  # (B, <=block_size)
            logits, _ = self(idx_cond)
            idx_next = sample_next(logits[:, -1, :], temperature, top_k, generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T+1)
        return idx

    @classmethod
    def from_lecture_state_dict(
        cls, state_dict: dict[str, torch.Tensor], dropout: float = 0.0
    ) -> GPT:
        """Build a GPT from a state_dict saved from the lecture's gpt.py (per-head modules).

        The config is read off the shapes; the per-head key/query/value matrices are stacked into
        each block's fused `qkv` weight; the `tril` buffers are dropped.
        """
        vocab_size, n_embd = state_dict["token_embedding_table.weight"].shape
        block_size = state_dict["position_embedding_table.weight"].shape[0]
        layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
        heads = {
            int(m.group(1))
            for k in state_dict
            if (m := re.match(r"blocks\.0\.sa\.heads\.(\d+)\.key\.weight", k))
        }
        config = GPTConfig(
            vocab_size=vocab_size,
            block_size=block_size,
            n_embd=n_embd,
            n_head=len(heads),
            n_layer=len(layers),
            dropout=dropout,
            bias="lm_head.bias" in state_dict,
        )
        converted = {}
        for key, value in state_dict.items():
            if key.endswith(".tril") or ".sa.heads." in key:
                continue
            converted[key] = value
        for layer in range(config.n_layer):
            per_role = [
                [
                    state_dict[f"blocks.{layer}.sa.heads.{h}.{role}.weight"]
                    for h in range(config.n_head)
                ]
                for role in ("query", "key", "value")
            ]
            converted[f"blocks.{layer}.sa.qkv.weight"] = torch.cat(
                [torch.cat(heads_of_role, dim=0) for heads_of_role in per_role], dim=0
            )  # (3C, C)
        model = cls(config)
        model.load_state_dict(converted, strict=True)
        return model


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token from last-position logits (B, vocab_size) -> (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)  # (B, vocab_size)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


def flops_per_token(model: GPT) -> int:
    """Training FLOPs per token: 6 N (N without position embeddings) + attention's 12 L C T."""
    c = model.config
    n = model.num_params() - model.position_embedding_table.weight.numel()
    return 6 * n + 12 * c.n_layer * c.n_embd * c.block_size
