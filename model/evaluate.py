"""The eval-mode loss estimate: many batches, dropout off, no gradients, averaged over ranks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

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
    from model.batching import BatchSampler
    from model.dataset import open_dataset
    from model.dist import DistInfo, pick_device
    from model.sample import load_model

    loaded = load_model(checkpoint_uri, device)
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=pick_device(device))
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
