"""The nightly retrain: the whole pipeline on the newest data, deployed by deploy/prefect.yaml.

It runs the `pipeline` flow as a subflow, which registers the new model version and moves the
`champion` alias only when the new model's val loss beats the champion's on the same val data.
Unset `source` and `store` fall back to $GPTPIPE_INPUT and $GPTPIPE_STORE (so a worker's
environment can point every run at the team's bucket), then to the pipeline's own defaults.
A `source` URL with `user:password@` is best given as $GPTPIPE_INPUT: Prefect stores this flow's
parameters as given, while the pipeline subflow's `source` is stored without the credentials.
"""

from __future__ import annotations

import os

from prefect import flow, get_run_logger

from flows.defaults import DEFAULT_STORE, TINY_SHAKESPEARE_URL
from flows.engines import resolve_task_runner, with_task_runner
from flows.pipeline import new_run_id, pipeline
from model.config import build_config
from model.corpus import DEFAULT_SHARD_BYTES
from storage.tracking import DEFAULT_EXPERIMENT
from tasks.tokenize import source_parameter


@flow(name="nightly-retrain")
def nightly_retrain(
    source: str | None = None,
    *,
    preset: str | None = None,
    overrides: list[str] | None = None,
    nproc: int | str = "auto",
    batch_size: int | None = None,
    store: str | None = None,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    model_name: str | None = None,
    run_id: str | None = None,
    sample_tokens: int = 500,
    task_runner: str = "default",
    dask_address: str | None = None,
    ray_address: str | None = None,
    workers: int | None = None,
    shard_bytes: int | None = None,
    val_shards: int = 0,
) -> dict:
    """Retrain on the newest data; `champion` moves only if the new model is better.

    ``task_runner`` "dask" (``dask_address`` of a running scheduler, else a local cluster of
    ``workers`` processes) or "ray" (``ray_address`` of a running cluster, else a local one) maps
    the tokenize stage's shards over that cluster; an address alone implies its runner.
    """
    logger = get_run_logger()
    extra = [f"batch_size={batch_size}"] if batch_size is not None else []
    cfg = build_config(preset, None, [*(overrides or []), *extra])
    source = source or os.environ.get("GPTPIPE_INPUT") or TINY_SHAKESPEARE_URL
    store = store or os.environ.get("GPTPIPE_STORE") or DEFAULT_STORE
    if "://" not in store:
        store = os.path.abspath(store)  # relative to the deployment's working directory
    runner, address = resolve_task_runner(task_runner, dask_address, ray_address)
    run_pipeline = with_task_runner(pipeline, runner, address, workers)
    summary = run_pipeline(
        source=source_parameter(source),  # the subflow's run stored without user:password@
        config=cfg.to_dict(),
        store=store,
        nproc=nproc,
        run_id=run_id or f"nightly-{new_run_id()}",
        tracking_uri=tracking_uri,
        experiment=experiment,
        model_name=model_name,
        sample_tokens=sample_tokens,
        shard_bytes=shard_bytes or DEFAULT_SHARD_BYTES,
        val_shards=val_shards,
    )
    model = summary["model"]
    logger.info(
        "%s version %s: %s (%s)",
        model["name"],
        model["version"],
        "now champion" if model["champion"] else "champion unchanged",
        model["reason"],
    )
    return summary
