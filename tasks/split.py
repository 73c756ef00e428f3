from __future__ import annotations

from prefect import get_run_logger, task

import storage
from model.data import read_tokens, split_tokens, write_tokens
from tasks.common import describe, retry_unless_user_error, stage_run


@task(
    name="split",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_user_error,
)
def split(
    tokens_uri: str,
    run_uri: str,
    val_fraction: float,
    block_size: int,
    tracking: dict | None = None,
) -> dict:
    """First (1 - val_fraction) of the tokens for training, the rest for validation."""
    with stage_run(tracking, "split") as run:
        with storage.open_read(tokens_uri) as f:
            ids, metadata = read_tokens(f)
        train_ids, val_ids = split_tokens(ids, val_fraction, block_size)
        outputs = {}
        for name, part in (("train", train_ids), ("val", val_ids)):
            uri = storage.join(run_uri, f"{name}.parquet")
            with storage.open_write(uri) as f:
                write_tokens(part, f, {**metadata, "n_tokens": len(part), "split": name})
            outputs[name] = describe(uri)
        record = {
            "val_fraction": val_fraction,
            "n_train_tokens": len(train_ids),
            "n_val_tokens": len(val_ids),
        }
        run.log_params(record)
        run.record_io({"tokens": describe(tokens_uri)}, outputs)
    get_run_logger().info(
        "split %d tokens: %d train, %d val", len(ids), len(train_ids), len(val_ids)
    )
    return {**record, "outputs": outputs, "mlflow_run_id": run.run_id}
