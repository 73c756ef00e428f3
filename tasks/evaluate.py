from __future__ import annotations

from prefect import get_run_logger, task

from model.evaluate import evaluate_checkpoint
from tasks.common import IO_RETRIES, describe, stage_run


@task(name="evaluate", **IO_RETRIES)
def evaluate(
    checkpoint_uri: str,
    train_uri: str,
    val_uri: str,
    eval_iters: int,
    batch_size: int,
    seed: int,
    tracking: dict | None = None,
) -> dict:
    """Eval-mode loss of the final model on train and val."""
    with stage_run(tracking, "evaluate") as run:
        losses = evaluate_checkpoint(
            checkpoint_uri, {"train": train_uri, "val": val_uri}, eval_iters, batch_size, seed
        )
        record = {"train_loss": losses["train"], "val_loss": losses["val"]}
        run.log_metrics(record)
        run.log_params({"eval_iters": eval_iters, "batch_size": batch_size, "seed": seed})
        run.record_io(
            {"checkpoint": describe(checkpoint_uri), "train": describe(train_uri),
             "val": describe(val_uri)},
            {},
        )  # fmt: skip
    get_run_logger().info("eval-mode loss: train %.4f, val %.4f", losses["train"], losses["val"])
    return {**record, "eval_iters": eval_iters, "mlflow_run_id": run.run_id}
