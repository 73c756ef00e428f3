"""Training and evaluation batches: random windows like the lecture's get_batch, vectorized.

Sampling is defined per optimizer step, not per rank: step s draws one global batch of
world_size * grad_accum_steps * batch_size windows from a generator seeded with (seed, s), and
each (micro-step, rank) takes its own slice. So 2 ranks of batch B see exactly the samples 1 rank
of batch 2B sees, and a run resumed at step s draws what an uninterrupted run would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.data import windows_at
from model.dataset import TokenDataset
from storage.errors import GptpipeError


def seed_for(*parts: int) -> int:
    """A generator seed from several small integers (stable across runs and machines)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


@dataclass
class BatchSampler:
    """One rank's slices of the per-step global batch (see the module docstring)."""

    data: dict[str, torch.Tensor | TokenDataset]  # a 1-D int64 tensor or a (sharded) dataset
    batch_size: int
    block_size: int
    seed: int
    rank: int
    world_size: int
    grad_accum_steps: int
    device: torch.device
    generator: torch.Generator = field(default_factory=torch.Generator)

    def __post_init__(self) -> None:
        for split, data in self.data.items():
            if len(data) < self.block_size + 1:
                raise GptpipeError(
                    f"the {split} split has {len(data)} tokens, too few for "
                    f"block_size={self.block_size}; need at least {self.block_size + 1}"
                )

    def _take(self, split: str, seed: int, n_slices: int, slot: int):
        data = self.data[split]
        self.generator.manual_seed(seed)
        ix = torch.randint(
            len(data) - self.block_size, (n_slices * self.batch_size,), generator=self.generator
        )
        ix = ix[slot * self.batch_size : (slot + 1) * self.batch_size]  # (B,)
        if isinstance(data, TokenDataset):
            x, y = data.windows(ix, self.block_size)
        else:
            x, y = windows_at(data, ix, self.block_size)
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(
                self.device, non_blocking=True
            )
        return x, y

    def train_batch(self, step: int, micro: int):
        slot = micro * self.world_size + self.rank
        return self._take(
            "train", seed_for(self.seed, step), self.world_size * self.grad_accum_steps, slot
        )

    def eval_batch(self, split: str, step: int, k: int):
        tag = 1 if split == "train" else 2
        return self._take(split, seed_for(self.seed, step, tag, k), self.world_size, self.rank)
