from __future__ import annotations

from prefect import get_run_logger, task

from model.evaluate import evaluate_checkpoint
from tasks.common import IO_RETRIES, log_split_inputs, stage_run
from tasks.results import Artifact, EvaluateResult, SplitResult, Workspace, artifact_dicts


@task(name="evaluate", **IO_RETRIES)
def evaluate(
    checkpoint: Artifact,
    splits: SplitResult,
    *,
    workspace: Workspace,
    eval_iters: int,
    batch_size: int,
    seed: int,
) -> EvaluateResult:
    """Eval-mode loss of the final model on train and val."""
    with stage_run(workspace.tracking, "evaluate") as run:
        log_split_inputs(run, splits, {"train": "evaluation", "val": "evaluation"})
        losses = evaluate_checkpoint(
            checkpoint.uri,
            {"train": splits.train.uri, "val": splits.val.uri},
            eval_iters,
            batch_size,
            seed,
        )
        run.log_metrics({"train_loss": losses["train"], "val_loss": losses["val"]})
        run.log_params({"eval_iters": eval_iters, "batch_size": batch_size, "seed": seed})
        inputs = {"checkpoint": checkpoint, "train": splits.train, "val": splits.val}
        run.record_io(artifact_dicts(inputs), {})
    get_run_logger().info("eval-mode loss: train %.4f, val %.4f", losses["train"], losses["val"])
    return EvaluateResult(
        train_loss=losses["train"],
        val_loss=losses["val"],
        eval_iters=eval_iters,
        batch_size=batch_size,
        seed=seed,
        mlflow_run_id=run.run_id,
    )
