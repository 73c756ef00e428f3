"""The split stage: train and val datasets over the tokenized shards, without loading them all.

By fraction (the lecture's split): the first ``int((1 - val_fraction) * n_tokens)`` tokens train,
the rest validate, whatever the shard layout; only the shard the cut falls in is read, and its two
halves are written next to the split's manifests. With ``val_shards=N`` the last N whole shards
validate instead. Either way the split writes its own manifests (``train.json``, ``val.json``) that
list the shards of each side; shards the cut does not touch are referenced, not copied.
"""

from __future__ import annotations

from prefect import get_run_logger, task

import storage
from model.data import read_tokens, split_tokens, write_tokens
from model.dataset import SHARD_ROW_GROUP_SIZE, make_manifest, read_manifest, write_manifest
from storage.errors import GptpipeError
from tasks.cache import cache_key
from tasks.common import IO_RETRIES, claim_stage, stage_run
from tasks.results import Artifact, SplitResult, Workspace

_ENTRY_KEYS = ("uri", "sha256", "bytes", "n_tokens")


@task(name="split", **IO_RETRIES)
def split(
    tokens: Artifact,
    workspace: Workspace,
    *,
    val_fraction: float,
    block_size: int,
    val_shards: int = 0,
) -> SplitResult:
    """Split the tokenize stage's dataset (``tokens``: its manifest) into train and val."""
    logger = get_run_logger()
    with stage_run(workspace.tracking, "split") as run:
        key = cache_key(
            "split",
            dataset_sha256=tokens.sha256,
            val_fraction=val_fraction,
            block_size=block_size,
            val_shards=val_shards,
        )
        with claim_stage(workspace, "split", key, logger.info) as found:
            folder, manifest = found.folder, found.manifest
            cached = manifest is not None
            if manifest is None:
                found.save(_split(tokens.uri, folder, val_fraction, block_size, val_shards))
                manifest = found.manifest
        run.log_params({**manifest["metadata"], "cached": cached, "cache_key": key})
        run.record_io({"tokens": tokens.to_dict()}, manifest["outputs"])
    meta = manifest["metadata"]
    if cached:
        logger.info("split: re-using %s (cached: same data and settings)", folder)
    else:
        n_train, n_val = meta["n_train_tokens"], meta["n_val_tokens"]
        logger.info("split %d tokens: %d train, %d val", n_train + n_val, n_train, n_val)
    return SplitResult.from_manifest(manifest, cached=cached, mlflow_run_id=run.run_id)


def _split(
    dataset_uri: str, folder: str, val_fraction: float, block_size: int, val_shards: int
) -> dict:
    """The split's manifest, ``{"metadata", "outputs"}``, as the cache stores it."""
    dataset = read_manifest(dataset_uri)
    shards = [{k: s[k] for k in _ENTRY_KEYS if k in s} for s in dataset["shards"]]
    if val_shards:
        sides = _split_by_shards(shards, val_shards, block_size)
    else:
        sides = _split_by_fraction(shards, folder, val_fraction, block_size)
    outputs = {}
    for name, entries in zip(("train", "val"), sides, strict=True):
        manifest = make_manifest(
            entries,
            tokenizer=dataset.get("tokenizer"),
            vocab_size=dataset["vocab_size"],
            split=name,
        )
        uri = write_manifest(storage.join(folder, f"{name}.json"), manifest)
        outputs[name] = Artifact.of(uri).to_dict()
    metadata = {
        "val_fraction": val_fraction,
        "val_shards": val_shards,
        "n_train_tokens": sum(e["n_tokens"] for e in sides[0]),
        "n_val_tokens": sum(e["n_tokens"] for e in sides[1]),
    }
    return {"metadata": metadata, "outputs": outputs}


def _split_by_fraction(shards, folder, val_fraction, block_size):
    total = sum(s["n_tokens"] for s in shards)
    # split_tokens on a range checks the settings and both sides' lengths, with the lecture's rule
    train_range, _ = split_tokens(range(total), val_fraction, block_size)
    cut, start = len(train_range), 0
    for k, shard in enumerate(shards):
        end = start + shard["n_tokens"]
        if cut == start:
            return shards[:k], shards[k:]
        if cut < end:
            head, tail = _cut_shard(shard, cut - start, folder)
            return [*shards[:k], head], [tail, *shards[k + 1 :]]
        start = end
    raise AssertionError("the cut lies inside the dataset")  # split_tokens guarantees it


def _cut_shard(shard: dict, at: int, folder: str) -> tuple[dict, dict]:
    """The shard's first ``at`` ids and the rest, written as two token files in ``folder``."""
    with storage.open_read(shard["uri"]) as f:
        ids, metadata = read_tokens(f)
    halves = []
    for name, part in (("train-tail", ids[:at]), ("val-head", ids[at:])):
        uri = storage.join(folder, f"{name}.parquet")
        with storage.open_write(uri) as f:
            write_tokens(
                part,
                f,
                {**metadata, "n_tokens": len(part), "split": name},
                row_group_size=SHARD_ROW_GROUP_SIZE,
            )
        halves.append({**Artifact.of(uri).to_dict(), "n_tokens": len(part)})
    return halves[0], halves[1]


def _split_by_shards(shards, val_shards, block_size):
    # the run request checked the value, and the count for a file, folder or s3:// source
    # (flows.request.check_val_shards); an http(s) source's shards are known only now
    if val_shards >= len(shards):
        raise GptpipeError(
            f"val_shards {val_shards}: the dataset has {len(shards)} shard(s) and training "
            "needs at least one; use fewer val shards, a smaller shard size, or val_fraction"
        )
    train, val = shards[:-val_shards], shards[-val_shards:]
    for side, entries in (("train", train), ("validation", val)):
        n = sum(e["n_tokens"] for e in entries)
        if n < block_size + 1:
            raise GptpipeError(
                f"the {side} split has {n} tokens but block_size={block_size} needs at least "
                f"{block_size + 1}; use more or larger shards, or a smaller block_size"
            )
    return train, val
