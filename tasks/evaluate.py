from __future__ import annotations

from prefect import get_run_logger, task

from model.evaluate import evaluate_checkpoint
from tasks.common import timed


@task(name="evaluate")
def evaluate(
    checkpoint_uri: str, train_uri: str, val_uri: str, eval_iters: int, batch_size: int, seed: int
) -> dict:
    """Eval-mode loss of the final model on train and val."""
    with timed({}) as record:
        losses = evaluate_checkpoint(
            checkpoint_uri, train_uri, val_uri, eval_iters, batch_size, seed
        )
        record.update(train_loss=losses["train"], val_loss=losses["val"], eval_iters=eval_iters)
    get_run_logger().info("eval-mode loss: train %.4f, val %.4f", losses["train"], losses["val"])
    return record
