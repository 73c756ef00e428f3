"""The pipeline flow: tokenize -> split -> train -> evaluate -> sample (-> register), passing URIs.

Each stage logs into its own MLflow run nested under the pipeline's run.
"""

from __future__ import annotations

import json
import os

from prefect import flow, get_run_logger

import storage
from flows.alerts import label_flow_run, mlflow_link
from flows.request import RunPlan
from model.config import TrainConfig, config_from_dict
from model.corpus_check import DataChangeLimits
from storage.tracking import Tracker, end_status, redact
from tasks.data_check import DataCheckResult, champion_profile_uri, check_data
from tasks.evaluate import evaluate
from tasks.register import register_model
from tasks.registry import warm_up_in_background
from tasks.results import (
    Artifact,
    SamplingSettings,
    SplitResult,
    TokenizeResult,
    Tracking,
    Workspace,
)
from tasks.sample import sample
from tasks.split import split
from tasks.tokenize import SourceURL, reveal, tokenize
from tasks.train import Placement, train
from tasks.warm_start import (
    CHAMPION_SOURCE,
    WarmStart,
    as_the_champion_started,
    resolve_warm_start,
)


@flow(name="gptpipe-pipeline")
def pipeline(source: str | SourceURL, plan: RunPlan) -> dict:
    """Run every stage once; return (and store) the run's summary.

    ``plan`` is a checked run request (`flows.request.RunRequest.check`); ``source`` is the
    corpus, apart from the plan so that Prefect stores it without credentials (a SourceURL, see
    `source_parameter`). The plan's ``train_timeout_seconds`` stops a training that runs longer
    (and does not retry it); the whole run's limit is the flow's own ``timeout_seconds``
    (`Flow.with_options`), set by the caller with its alert hooks.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warm_up_in_background()  # the model log's slow part, done while the stages run
    cfg = config_from_dict(plan.config)
    url = reveal(source)  # credentials included: the tokenize stage downloads it
    run_id, store = plan.run_id, plan.store
    tracker = Tracker(plan.tracking_uri, plan.experiment)
    run_uri = storage.join(store, "runs", run_id)
    logger = get_run_logger()
    parent_id = tracker.start_run(
        run_id, tags={"gptpipe.run_id": run_id, "gptpipe.store": redact(run_uri)}
    )
    workspace = Workspace(
        store=store,
        tracking=Tracking(
            uri=tracker.tracking_uri, experiment=plan.experiment, parent_id=parent_id
        ),
        refresh=frozenset(plan.refresh),
        owner=f"gptpipe run {run_id}",
    )
    parent = tracker.stage_handle(parent_id)
    shown = {"source": redact(url), "nproc": plan.nproc, "store": redact(run_uri)}
    parent.log_params({**cfg.to_dict(), **shown})
    logger.info("run %s -> %s (MLflow run %s)", run_id, run_uri, parent_id)
    # for the alert hooks of whichever flow encloses this one, and for the Prefect UI
    label_flow_run(
        run_id=run_id,
        mlflow_run=mlflow_link(tracker.run_url(parent_id), parent_id, tracker.tracking_uri),
    )
    try:
        summary = _stages(cfg, url, workspace=workspace, plan=plan)
    except BaseException as exc:  # FAILED; KILLED when interrupted (Ctrl-C, SIGTERM, cancelled)
        tracker.client.set_terminated(parent_id, end_status(exc))
        raise
    summary["mlflow"] = mlflow_summary(tracker, plan.experiment, parent_id)
    losses = {
        k: summary[k] for k in ("train_loss", "val_loss", "val_bpb") if summary[k] is not None
    }
    parent.log_metrics(losses)
    parent.log_params({"n_params": summary["n_params"], "world_size": summary["world_size"]})
    parent.log_dict(summary, "summary.json")
    tracker.client.set_terminated(parent_id, "FINISHED")
    storage.put_bytes(
        storage.join(run_uri, "summary.json"), json.dumps(summary, indent=2).encode("utf-8")
    )
    publish_report(summary)
    return summary


def mlflow_summary(tracker: Tracker, experiment: str, run_id: str) -> dict:
    """Where a summary's MLflow run is: the (redacted) tracking URI, experiment, id, UI link."""
    return {
        "tracking_uri": redact(tracker.tracking_uri),
        "experiment": experiment,
        "run_id": run_id,
        "run_url": tracker.run_url(run_id),
    }


def publish_markdown(text: str, *, key: str, description: str) -> None:
    """A Prefect markdown artifact of the flow run, shown in the Prefect UI."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(text, key=key, description=description)


def publish_report(summary: dict) -> None:
    """A Prefect markdown artifact: what a user watching the Prefect UI wants to see."""
    mlflow_info, model = summary["mlflow"], summary["model"]
    run_link = mlflow_info["run_url"] or f"{mlflow_info['run_id']} at {mlflow_info['tracking_uri']}"
    reused = ", ".join(k for k, v in summary["cached"].items() if v) or "nothing"
    fence = "`" * 3
    lines = [
        f"# gptpipe run {summary['run_id']}",
        "",
        "| | |",
        "|---|---|",
        f"| final train loss (eval mode) | {summary['train_loss']:.4f} |",
        f"| final val loss (eval mode) | {summary['val_loss']:.4f} |",
        f"| val bits per byte | {_bpb(summary['val_bpb'])} |",
        f"| parameters | {summary['n_params']:,} |",
        f"| ranks | {summary['world_size']} |",
        f"| MLflow run | {run_link} |",
        f"| registered model | {model['name']} version {model['version']} |",
        f"| re-used from cache | {reused} |",
        "",
        "| output | URI |",
        "|---|---|",
        *[f"| {name} | `{uri}` |" for name, uri in summary["outputs"].items()],
        "",
        "Sample:",
        "",
        fence,
        summary["sample"][:400].replace(fence, fence.replace("`", "'")),
        fence,
    ]
    publish_markdown("\n".join(lines), key="gptpipe-run", description="pipeline run")


def _bpb(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _check_prompt(prompt: str, tokenizer_uri: str) -> None:
    from model.tokenizer import tokenizer_from_json
    from storage.errors import GptpipeError

    unknown = tokenizer_from_json(storage.get_bytes(tokenizer_uri).decode()).unknown_chars(prompt)
    if unknown:
        shown = ", ".join(repr(c) for c in unknown)
        raise GptpipeError(f"--prompt has characters the tokenizer does not know: {shown}")


def train_task(limit_seconds: float | None):
    """The train task, under this time limit if there is one (a training that ran out of time
    is not retried: tasks.common.retry_unless_user_error)."""
    if limit_seconds is None:
        return train
    return train.with_options(timeout_seconds=limit_seconds)


def tokenize_and_split(
    source: str,
    cfg: TrainConfig,
    plan: RunPlan,
    workspace: Workspace,
    *,
    base_tokenizer: Artifact | None = None,
) -> tuple[TokenizeResult, SplitResult]:
    """The data stages, as the pipeline and the sweep run them (``base_tokenizer``: a warm
    start's, whose character ids the new tokenizer keeps)."""
    tokenized = tokenize(
        source,
        workspace,
        tokenizer=cfg.tokenizer,
        vocab_size=cfg.vocab_size,
        shard_bytes=plan.shard_bytes,
        base_tokenizer=base_tokenizer,
    )
    splits = split(
        tokenized.tokens,
        workspace,
        val_fraction=cfg.val_fraction,
        block_size=cfg.block_size,
        val_shards=plan.val_shards,
    )
    return tokenized, splits


def check_tonights_data(source: str, plan: RunPlan, workspace: Workspace) -> DataCheckResult:
    """Tonight's corpus against the one the champion was trained on, before tokenizing: a corpus
    that shrank, is empty, is not text or is mostly new characters stops the run (one line)."""
    limits = DataChangeLimits(
        max_corpus_shrink=plan.max_corpus_shrink, max_new_char_share=plan.max_new_char_share
    )
    return check_data(
        source,
        workspace,
        champion_profile=champion_profile_uri(workspace, plan.model_name),
        limits=limits,
        accept=plan.accept_data_change,
    )


def warm_start(
    plan: RunPlan, cfg: TrainConfig, workspace: Workspace, data: DataCheckResult
) -> WarmStart | None:
    """The weights (and tokenizer) tonight's training starts from; None: a fresh model. From
    the champion on the champion's own corpus: as the champion started (its results re-used)."""
    if plan.init_from is None:
        return None
    if plan.init_from == CHAMPION_SOURCE and data.unchanged_since_champion:
        same = as_the_champion_started(
            workspace, plan.model_name, config=cfg.to_dict(), nproc=plan.nproc
        )
        if same is not None:
            get_run_logger().info("warm start: %s", same.note)
            return same
    return resolve_warm_start(
        workspace,
        plan.model_name,
        init_from=plan.init_from,
        vocab=plan.vocab,
        tokenizer=cfg.tokenizer,
    )


def _stages(cfg: TrainConfig, source: str, *, workspace: Workspace, plan: RunPlan) -> dict:
    """Every stage in order; the run's summary (summary.json's shape)."""
    run_id = plan.run_id
    sampling = SamplingSettings(
        prompt=plan.prompt, max_new_tokens=plan.sample_tokens, seed=cfg.seed
    )
    checked = check_tonights_data(source, plan, workspace)
    warm = warm_start(plan, cfg, workspace, checked)
    tokenized, splits = tokenize_and_split(
        source, cfg, plan, workspace, base_tokenizer=warm.base_tokenizer if warm else None
    )
    _check_prompt(sampling.prompt, tokenized.tokenizer.uri)  # before training, not after it
    trained = train_task(plan.train_timeout_seconds)(
        cfg.to_dict(),
        splits,
        workspace=workspace,
        tokenizer=tokenized.tokenizer,
        placement=Placement(
            nproc=plan.nproc, engine=plan.train_engine, ray_address=plan.ray_address
        ),
        resume=plan.resume,
        init_from=warm.init_from if warm else None,
    )
    evaluated = evaluate(
        trained.checkpoint,
        splits,
        workspace=workspace,
        eval_iters=cfg.eval_iters,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    run_uri = storage.join(workspace.store, "runs", run_id)
    sampled = sample(trained.checkpoint, run_uri, workspace=workspace, settings=sampling)
    registered = register_model(
        workspace,
        plan.model_name,
        trained=trained,
        evaluated=evaluated,
        splits=splits,
        tokenizer=tokenized.tokenizer,
        run_id=run_id,
        min_improvement=plan.min_improvement,
    )
    return {
        "run_id": run_id,
        "run_uri": run_uri,
        "source": redact(source),
        "config": cfg.to_dict(),
        "world_size": trained.world_size,
        "n_params": trained.n_params,
        "train_loss": evaluated.train_loss,
        "val_loss": evaluated.val_loss,
        "val_bpb": evaluated.val_bpb,  # bits per byte: comparable across tokenizers
        "outputs": {
            "tokenizer": tokenized.tokenizer.uri,
            "tokens": tokenized.tokens.uri,
            "train": splits.train.uri,
            "val": splits.val.uri,
            "checkpoint": trained.checkpoint.uri,
            "samples": sampled.samples.uri,
        },
        "sample": sampled.text,
        "cached": {"tokenize": tokenized.cached, "split": splits.cached, "train": trained.cached},
        "model": {
            **registered.to_dict(),
            "uri": trained.model_uri or f"models:/{registered.name}/{registered.version}",
        },
        "warm_start": warm.to_dict() if warm else None,
        "stages": {
            "data_check": checked.to_dict(),
            "tokenize": tokenized.to_dict(),
            "split": splits.to_dict(),
            "train": trained.to_dict(history=False),
            "evaluate": evaluated.to_dict(),
            "sample": sampled.to_dict(text=False),
        },
    }
