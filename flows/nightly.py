"""The nightly retrain: the whole pipeline on the newest data, deployed by deploy/prefect.yaml.

It runs the `pipeline` flow as a subflow, which registers the new model version and moves the
`champion` alias only when the new model's val loss beats the champion's on the same val data.
Unset `source` and `store` fall back to $GPTPIPE_INPUT and $GPTPIPE_STORE (so a worker's
environment can point every run at the team's bucket), then to the pipeline's own defaults.
A `source` URL with `user:password@` is best given as $GPTPIPE_INPUT: Prefect stores this flow's
parameters as given, while the pipeline subflow's `source` is stored without the credentials.

Alerts and limits: a failure, crash or timeout sends one message to the notification target
(``notify``: a webhook or Apprise URL, or ``block:NAME`` of a saved Prefect notification block;
unset: $GPTPIPE_NOTIFY_URL), and so does a run whose model became the champion (flows/alerts.py).
``timeout_seconds`` limits the pipeline subflow, ``train_timeout_seconds`` its training: a hung
training no longer holds the work pool. Both, and the target, are checked before any work. A
URL with a token is best given as $GPTPIPE_NOTIFY_URL or kept in a block: Prefect stores a
deployment's parameters for anyone who can read its API.
"""

from __future__ import annotations

import os

from prefect import flow, get_run_logger

from flows.alerts import Alerter, check_timeout, notify_target
from flows.defaults import DEFAULT_STORE, TINY_SHAKESPEARE_URL
from flows.engines import resolve_task_runner, with_task_runner
from flows.pipeline import new_run_id, pipeline
from model.config import build_config
from model.corpus import DEFAULT_SHARD_BYTES
from storage.tracking import DEFAULT_EXPERIMENT
from tasks.tokenize import source_parameter

# long enough for the lecture preset on one GPU or the cpu preset on a CPU, short of a day
DEFAULT_TIMEOUT_S = 6 * 3600
DEFAULT_TRAIN_TIMEOUT_S = 5 * 3600


def resolve_source_and_store(source: str | None, store: str | None) -> tuple[str, str]:
    """A deployment's unset source and store: $GPTPIPE_INPUT and $GPTPIPE_STORE of the flow
    run's environment, else the defaults; a relative store is taken from the working folder."""
    source = source or os.environ.get("GPTPIPE_INPUT") or TINY_SHAKESPEARE_URL
    store = store or os.environ.get("GPTPIPE_STORE") or DEFAULT_STORE
    if "://" not in store:
        store = os.path.abspath(store)  # relative to the deployment's working directory
    return source, store


@flow(name="nightly-retrain", **Alerter().hooks())
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
    train_engine: str = "torchrun",
    workers: int | None = None,
    shard_bytes: int | None = None,
    val_shards: int = 0,
    notify: str | None = None,
    timeout_seconds: float | None = DEFAULT_TIMEOUT_S,
    train_timeout_seconds: float | None = DEFAULT_TRAIN_TIMEOUT_S,
) -> dict:
    """Retrain on the newest data; `champion` moves only if the new model is better.

    ``task_runner`` "dask" (``dask_address`` of a running scheduler, else a local cluster of
    ``workers`` processes) or "ray" (``ray_address`` of a running cluster, else a local one) maps
    the tokenize stage's shards over that cluster; an address alone implies its runner.
    ``train_engine`` "ray" trains in ``nproc`` Ray Train workers on the cluster at
    ``ray_address`` (else a local one) instead of torchrun ranks on this machine.
    ``notify``, ``timeout_seconds`` and ``train_timeout_seconds``: see the module's docstring
    (null: no limit).
    """
    logger = get_run_logger()
    # bad settings fail here, before any work (the alert hooks read `notify` themselves)
    timeout = check_timeout(timeout_seconds, name="timeout_seconds")
    check_timeout(train_timeout_seconds, name="train_timeout_seconds")
    target = notify_target(notify)
    if target is not None:
        target.check()
    extra = [f"batch_size={batch_size}"] if batch_size is not None else []
    cfg = build_config(preset, None, [*(overrides or []), *extra])
    source, store = resolve_source_and_store(source, store)
    runner, address = resolve_task_runner(task_runner, dask_address, ray_address)
    run_pipeline = with_task_runner(
        pipeline.with_options(timeout_seconds=timeout), runner, address, workers
    )
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
        train_timeout_seconds=train_timeout_seconds,
        train_engine=train_engine,
        ray_address=ray_address if train_engine == "ray" else None,
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
