"""The eval-mode loss estimate: many batches, dropout off, no gradients, averaged over ranks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch

from model.dist import DistInfo, all_reduce_mean

BatchFn = Callable[[str, int], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def estimate_loss(
    model: torch.nn.Module,
    batch: BatchFn,
    splits: tuple[str, ...],
    eval_iters: int,
    info: DistInfo,
    autocast: Callable = contextlib.nullcontext,
) -> dict[str, float]:
    """Mean loss over `eval_iters` batches of each split, in eval mode, then back to train mode.

    `batch(split, k)` gives the k-th evaluation batch of a split for this rank. Every rank
    evaluates its own batches on the plain model (not through the DDP wrapper), then the means are
    averaged over ranks with all_reduce.
    """
    was_training = model.training
    model.eval()
    out = {}
    try:
        for split in splits:
            losses = torch.zeros(eval_iters, device=info.device)
            for k in range(eval_iters):
                x, y = batch(split, k)
                with autocast():
                    _, loss = model(x, y)
                losses[k] = loss.float()
            out[split] = all_reduce_mean(losses.mean(), info).item()
    finally:
        model.train(was_training)
    return out


def evaluate_checkpoint(
    checkpoint_uri: str,
    data_uris: dict[str, str],
    eval_iters: int,
    batch_size: int,
    seed: int,
    device: str = "auto",
) -> dict[str, float]:
    """Eval-mode loss of a saved model on each split in data_uris ({"val": uri, ...}).

    The datasets are closed before it returns: it runs in long-lived processes (a Prefect
    worker, register evaluating past champions), where open shard files would pile up.
    """
    from model.sample import load_model

    return _losses(load_model(checkpoint_uri, device), data_uris, eval_iters, batch_size, seed)


def _losses(loaded, data_uris: dict[str, str], eval_iters: int, batch_size: int, seed: int):
    """`evaluate_checkpoint` of a loaded model (`model.sample.load_model`)."""
    from model.batching import BatchSampler
    from model.dataset import open_dataset
    from model.dist import DistInfo

    device = next(loaded.model.parameters()).device
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=device)
    with contextlib.ExitStack() as stack:
        data = {split: stack.enter_context(open_dataset(uri)) for split, uri in data_uris.items()}
        sampler = BatchSampler(
            data, batch_size, loaded.model.config.block_size, seed, 0, 1, 1, info.device
        )
        # step -1 keeps these batches apart from those of the evaluations during training
        return estimate_loss(
            loaded.model,
            lambda split, k: sampler.eval_batch(split, -1, k),
            tuple(data_uris),
            eval_iters,
            info,
        )


def val_segments(val_uri: str, tokenizer, *, segment_tokens: int, n_segments: int) -> list:
    """The val split's segments for bits per byte (`model.bits.eval_segments`); ``tokenizer`` is
    the one that made the split's ids. The dataset is closed before it returns."""
    from model.bits import eval_segments
    from model.dataset import open_dataset

    with open_dataset(val_uri) as data:
        return eval_segments(data, tokenizer, segment_tokens=segment_tokens, n_segments=n_segments)


def checkpoint_segment_nats(
    checkpoint_uri: str, segments: list, *, batch_size: int, device: str = "auto"
) -> np.ndarray:
    """Per-segment nats of a saved model on ``segments``, with its own tokenizer (NaN where it
    cannot encode a segment): `model.bits.segment_nats`."""
    from model.bits import segment_nats
    from model.sample import load_model

    loaded = load_model(checkpoint_uri, device)
    return segment_nats(loaded.model, loaded.tokenizer, segments, batch_size=batch_size)


def evaluate_checkpoint_bits(
    checkpoint_uri: str,
    data_uris: dict[str, str],
    eval_iters: int,
    batch_size: int,
    seed: int,
    device: str = "auto",
    *,
    known: Callable[[dict], tuple[np.ndarray, np.ndarray] | None] | None = None,
) -> tuple[dict[str, float], dict]:
    """`evaluate_checkpoint`'s losses, and `checkpoint_bits` of the "val" split, from one load.

    ``known(settings)`` may return the per-segment (nats, bytes) recorded before for these
    segment settings (``segment_tokens``, ``n_segments``, ``tokenizer``): then the segments are
    not scored again, and the bits say ``"recorded": True``."""
    from model.sample import load_model

    loaded = load_model(checkpoint_uri, device)
    losses = _losses(loaded, data_uris, eval_iters, batch_size, seed)
    return losses, _bits(loaded, data_uris["val"], eval_iters * batch_size, batch_size, known)


def checkpoint_bits(
    checkpoint_uri: str, val_uri: str, *, n_segments: int, batch_size: int, device: str = "auto"
) -> dict:
    """The val text's bits per byte for a saved model, on up to ``n_segments`` segments of its
    block_size + 1 tokens (`model.bits`), cut with its own tokenizer: a dict of ``val_bpb``,
    ``segment_tokens``, ``n_segments`` (asked for), ``tokenizer`` (its JSON), and per segment
    ``nats`` and ``bytes`` (NumPy arrays)."""
    from model.sample import load_model

    return _bits(load_model(checkpoint_uri, device), val_uri, n_segments, batch_size)


def _bits(loaded, val_uri: str, n_segments: int, batch_size: int, known=None) -> dict:
    from model.bits import bits_per_byte, segment_nats

    settings = {
        "segment_tokens": loaded.model.config.block_size + 1,
        "n_segments": n_segments,
        "tokenizer": loaded.tokenizer.to_json(),
    }
    found = known(settings) if known is not None else None
    if found is not None:
        nats, n_bytes = found
    else:
        segments = val_segments(
            val_uri,
            loaded.tokenizer,
            segment_tokens=settings["segment_tokens"],
            n_segments=n_segments,
        )
        nats = segment_nats(loaded.model, loaded.tokenizer, segments, batch_size=batch_size)
        n_bytes = np.array([s.n_bytes for s in segments], dtype=np.int64)
    return {
        **settings,
        "val_bpb": bits_per_byte(nats, n_bytes),
        "nats": nats,
        "bytes": n_bytes,
        "recorded": found is not None,
    }
