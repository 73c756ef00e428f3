"""The nightly retrain: the whole pipeline on the newest data, deployed by deploy/prefect.yaml.

It runs the `pipeline` flow as a subflow, which registers the new model version and moves the
`champion` alias only when the new model's val loss beats the champion's on the same val data.
Unset `data.source` and `data.store` fall back to $GPTPIPE_INPUT and $GPTPIPE_STORE (so a worker's
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

from prefect import flow, get_run_logger

from flows.alerts import Alerter
from flows.engines import with_task_runner
from flows.pipeline import pipeline
from flows.request import (
    DEPLOYMENT,
    AlertSettings,
    ComputeSettings,
    DataSettings,
    RunRequest,
    SampleSettings,
    TrackingSettings,
    TrainingSettings,
    check_in_flow,
    new_run_id,
)


@flow(name="nightly-retrain", **Alerter().hooks())
def nightly_retrain(
    data: DataSettings = DataSettings(),
    compute: ComputeSettings = ComputeSettings(),
    training: TrainingSettings = TrainingSettings(),
    tracking: TrackingSettings = TrackingSettings(),
    sampling: SampleSettings = SampleSettings(),
    alerts: AlertSettings = AlertSettings(),
    run_id: str | None = None,
) -> dict:
    """Retrain on the newest data; `champion` moves only if the new model is better.

    The parameters are a run request's sections (`flows.request`), checked before any work: a
    bad value is one line naming its parameter (e.g. ``compute.nproc``). ``compute.task_runner``
    "dask" (``compute.dask_address`` of a running scheduler, else a local cluster of
    ``compute.workers`` processes) or "ray" maps the tokenize stage's shards over that cluster;
    ``compute.train_engine`` "ray" trains in Ray Train workers instead of torchrun ranks.
    ``alerts``: see the module's docstring (null limits: none).
    """
    logger = get_run_logger()
    request = RunRequest.of(
        DEPLOYMENT,
        data=data,
        compute=compute,
        training=training,
        tracking=tracking,
        sampling=sampling,
        alerts=alerts,
        run_id=run_id or f"nightly-{new_run_id()}",
    )
    checked = check_in_flow(request)  # the alert hooks read `alerts.notify` themselves
    run_pipeline = with_task_runner(
        pipeline.with_options(timeout_seconds=checked.timeout_seconds),
        *checked.task_runner,
        checked.workers,
    )
    # the subflow's `source` is stored without user:password@
    summary = run_pipeline(source=checked.source, plan=checked.plan)
    model = summary["model"]
    logger.info(
        "%s version %s: %s (%s)",
        model["name"],
        model["version"],
        "now champion" if model["champion"] else "champion unchanged",
        model["reason"],
    )
    return summary
