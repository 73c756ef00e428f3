from __future__ import annotations

from prefect import get_run_logger, task

import storage
from model.data import read_tokens, split_tokens, write_tokens
from tasks.cache import cache_key, load_manifest, save_manifest, stage_dir
from tasks.common import IO_RETRIES, describe, stage_run


@task(name="split", **IO_RETRIES)
def split(
    tokens: dict,
    store: str,
    val_fraction: float,
    block_size: int,
    tracking: dict | None = None,
    refresh: bool = False,
) -> dict:
    """First (1 - val_fraction) of the tokens for training, the rest for validation (cached).

    `tokens` is the tokenize stage's reference to its Parquet file: uri, sha256, bytes.
    """
    logger = get_run_logger()
    with stage_run(tracking, "split") as run:
        key = cache_key("split", dataset_sha256=tokens["sha256"], val_fraction=val_fraction,
                        block_size=block_size)  # fmt: skip
        folder = stage_dir(store, "split", key)
        manifest = None if refresh else load_manifest(folder)
        cached = manifest is not None
        if manifest is None:
            manifest = _split(tokens["uri"], folder, val_fraction, block_size)
            save_manifest(folder, manifest)
        run.log_params({**manifest["metadata"], "cached": cached, "cache_key": key})
        run.record_io({"tokens": tokens}, manifest["outputs"])
    meta = manifest["metadata"]
    if cached:
        logger.info("split: re-using %s (cached: same data and settings)", folder)
    else:
        logger.info("split %d tokens: %d train, %d val", meta["n_train_tokens"] +
                    meta["n_val_tokens"], meta["n_train_tokens"], meta["n_val_tokens"])  # fmt: skip
    return {**manifest, "cached": cached, "mlflow_run_id": run.run_id}


def _split(tokens_uri: str, folder: str, val_fraction: float, block_size: int) -> dict:
    with storage.open_read(tokens_uri) as f:
        ids, metadata = read_tokens(f)
    train_ids, val_ids = split_tokens(ids, val_fraction, block_size)
    outputs = {}
    for name, part in (("train", train_ids), ("val", val_ids)):
        uri = storage.join(folder, f"{name}.parquet")
        with storage.open_write(uri) as f:
            write_tokens(part, f, {**metadata, "n_tokens": len(part), "split": name})
        outputs[name] = describe(uri)
    metadata = {
        "val_fraction": val_fraction,
        "n_train_tokens": len(train_ids),
        "n_val_tokens": len(val_ids),
    }
    return {"metadata": metadata, "outputs": outputs}
