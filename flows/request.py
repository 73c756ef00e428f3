"""A run request: what a run is, as one typed, checked value.

The command line (`gptpipe run`, `tokenize`, `sweep`), the flows and every deployment in
deploy/prefect.yaml describe a run with the same sections: `DataSettings` (where the corpus is,
where outputs go, how it is cut), `ComputeSettings` (ranks, engines, clusters), `TrainingSettings`
(the config: a preset, a YAML file, overrides), `TrackingSettings` (MLflow), `SampleSettings`
and `AlertSettings` (notification target, time limits). A new run option is one field here, one
line in `check`, and one flag in flows/cli.py (see docs/deploy.md "Run requests").

`RunRequest.check` does every pre-flight check once, before any work, and returns a `CheckedRun`
whose `plan` (a `RunPlan`: every value resolved) is what the pipeline flow takes. A bad value is
one line that names the setting as the user wrote it: the flag on the command line
(`--nproc`), the parameter path in a deployment (`compute.nproc`), see `Naming`.

The sections' defaults are the deployments' (``nproc: auto``, a 6 h limit on the whole run):
Prefect replaces a deployment's parameter section by section when a run overrides one, so a
default must be right where a section is given in part. The command line passes every value.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flows.defaults import DEFAULT_STORE, TINY_SHAKESPEARE_URL
from storage.errors import GptpipeError

# long enough for the lecture preset on one GPU or the cpu preset on a CPU, short of a day
DEFAULT_TIMEOUT_S = 6 * 3600.0
DEFAULT_TRAIN_TIMEOUT_S = 5 * 3600.0

# Each setting's flag on the command line, by its path in the request. Messages from the layers
# below name the flag (the first place a user meets a setting); `Naming` puts a deployment's
# parameter path in its place.
FLAGS: dict[str, str] = {
    "data.source": "--input",
    "data.store": "--store",
    "data.shard_size": "--shard-size",
    "data.val_shards": "--val-shards",
    "data.refresh": "--refresh",
    "data.accept_data_change": "--accept-data-change",
    "data.max_corpus_shrink": "--max-corpus-shrink",
    "data.max_new_char_share": "--max-new-char-share",
    "compute.nproc": "--nproc",
    "compute.train_engine": "--train-engine",
    "compute.task_runner": "--task-runner",
    "compute.workers": "--workers",
    "compute.dask_address": "--dask-address",
    "compute.ray_address": "--ray-address",
    "training.preset": "--preset",
    "training.config_file": "--config",
    "training.overrides": "--set",
    "training.resume": "--resume",
    "training.init_from": "--init-from",
    "training.vocab": "--vocab",
    "tracking.tracking_uri": "--tracking-uri",
    "tracking.experiment": "--experiment",
    "tracking.model_name": "--model-name",
    "tracking.min_improvement": "--min-improvement",
    "sampling.prompt": "--prompt",
    "sampling.sample_tokens": "--sample-tokens",
    "alerts.notify": "--notify",
    "alerts.timeout_seconds": "--timeout",
    "alerts.train_timeout_seconds": "--train-timeout",
    "run_id": "--run-id",
}


@dataclass(frozen=True)
class Naming:
    """How the user wrote the settings: as command-line flags, or as a deployment's parameters."""

    deployment: bool = False

    def name(self, path: str) -> str:
        return path if self.deployment else FLAGS.get(path, path)

    def say(self, message: str) -> str:
        """A message of the layers below (which name flags) in the user's own terms."""
        if not self.deployment:
            return message
        for path, flag in sorted(FLAGS.items(), key=lambda item: -len(item[1])):
            message = re.sub(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", path, message)
        return message

    @contextlib.contextmanager
    def speaking(self) -> Iterator[None]:
        """Errors raised inside, re-worded by `say`."""
        try:
            yield
        except GptpipeError as exc:
            if not self.deployment:
                raise
            raise GptpipeError(self.say(str(exc))) from None


COMMAND_LINE = Naming()
DEPLOYMENT = Naming(deployment=True)


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataSettings(Section):
    """Where the corpus comes from, where outputs go, how the corpus is cut."""

    source: str | None = Field(
        None,
        description="a file, folder, glob, http(s) URL or s3:// object or prefix; "
        "null: $GPTPIPE_INPUT, else Tiny Shakespeare's URL",
    )
    store: str | None = Field(
        None,
        description="a folder or s3://bucket/prefix; null: $GPTPIPE_STORE, else ./gptpipe-store",
    )
    shard_size: int | str | None = Field(
        None, description="bytes per shard tokenized in parallel, e.g. 64M (null: 32M)"
    )
    val_shards: int = Field(0, description="validate on the last N whole shards (0: val_fraction)")
    refresh: list[str] = Field(
        default_factory=list, description="cached stages to run again: tokenize, split, train, all"
    )
    # tonight's corpus against the champion's, before tokenizing (tasks/data_check.py)
    accept_data_change: bool = Field(
        False, description="train on a corpus that changed beyond the limits below"
    )
    max_corpus_shrink: float = Field(
        0.5, description="stop a night whose corpus is smaller than the champion's by more"
    )
    max_new_char_share: float = Field(
        0.1, description="stop a night whose corpus has more characters the champion's lacked"
    )


class ComputeSettings(Section):
    """Where and on how many ranks the stages run."""

    nproc: int | str = Field("auto", description="training ranks, or auto: one per visible GPU")
    train_engine: Literal["torchrun", "ray"] = "torchrun"
    task_runner: Literal["default", "dask", "ray"] = "default"
    workers: int | None = Field(None, description="processes of a local Dask or Ray cluster")
    dask_address: str | None = None
    ray_address: str | None = None


class TrainingSettings(Section):
    """The training config: defaults <- preset <- YAML file <- overrides ("key=value")."""

    preset: str | None = Field(None, description="null: lecture on a GPU, cpu otherwise")
    config_file: str | None = None
    overrides: list[str] = Field(default_factory=list, description='e.g. ["max_iters=500"]')
    resume: bool = False
    init_from: str | None = Field(
        None,
        description="start from these weights: champion, models:/NAME/VERSION or a checkpoint "
        "(null: a fresh model)",
    )
    vocab: Literal["keep", "fresh"] = Field(
        "keep",
        description="with init_from: keep its character ids, new ones appended (keep), or a "
        "fresh vocabulary (fresh)",
    )


class TrackingSettings(Section):
    tracking_uri: str | None = Field(None, description="null: $MLFLOW_TRACKING_URI, else sqlite")
    experiment: str = "gptpipe"
    model_name: str | None = Field(None, description="null: gptpipe-<corpus>-<tokenizer>")
    min_improvement: float | None = Field(
        None,
        description="bits per byte a new model must win by to become champion (null: from the "
        "evaluation's noise)",
    )


class SampleSettings(Section):
    prompt: str = ""
    sample_tokens: int = 500


class AlertSettings(Section):
    """Where one message goes when a run fails or moves the champion, and the time limits."""

    notify: str | None = Field(
        None, description="a webhook or Apprise URL, or block:NAME; null: $GPTPIPE_NOTIFY_URL"
    )
    # seconds (null: no limit); a string is checked by `check_timeout`, which says what is wrong
    timeout_seconds: float | str | None = DEFAULT_TIMEOUT_S
    train_timeout_seconds: float | str | None = DEFAULT_TRAIN_TIMEOUT_S


class RunPlan(Section):
    """A checked run, every value resolved: what the pipeline flow takes (Prefect stores it as
    the flow run's parameters, so it holds no secret: the source's credentials travel apart).
    No field has a default: the request's sections hold the defaults, the check sets them all."""

    source: str  # shown: without user:password@
    store: str
    config: dict[str, Any]
    shard_bytes: int
    val_shards: int
    refresh: list[str]
    accept_data_change: bool
    max_corpus_shrink: float
    max_new_char_share: float
    resume: bool
    init_from: str | None
    vocab: str
    min_improvement: float | None
    nproc: int
    train_engine: str
    ray_address: str | None  # the training's cluster, with train_engine ray
    tracking_uri: str
    experiment: str
    model_name: str
    prompt: str
    sample_tokens: int
    run_id: str
    train_timeout_seconds: float | None


@dataclass(frozen=True)
class CheckedRun:
    """What `RunRequest.check` found: the plan, and what the caller needs beside it."""

    plan: RunPlan
    source: Any  # the flows' `source` parameter: a SourceURL when it carries credentials
    task_runner: tuple[str, str | None] = ("default", None)  # (runner, cluster address)
    workers: int | None = None
    timeout_seconds: float | None = None
    notify: Any = field(default=None, repr=False)  # a flows.alerts.NotifyTarget, or None


class RunRequest(Section):
    """A whole run, as the command line and the deployments describe it."""

    data: DataSettings = DataSettings()
    compute: ComputeSettings = ComputeSettings()
    training: TrainingSettings = TrainingSettings()
    tracking: TrackingSettings = TrackingSettings()
    sampling: SampleSettings = SampleSettings()
    alerts: AlertSettings = AlertSettings()
    run_id: str | None = None

    @classmethod
    def of(cls, naming: Naming = COMMAND_LINE, **sections: Any) -> RunRequest:
        """A request from plain values (a flow's parameters, the parsed command line); a value
        of the wrong type is one line naming its setting."""
        try:
            return cls.model_validate(sections)
        except ValidationError as exc:
            raise GptpipeError(validation_line(exc, naming)) from None

    # ------------------------------------------------------------------------------- checks
    def check_settings(self, naming: Naming = COMMAND_LINE) -> SettledSettings:
        """The checks that need nothing outside this process: the config, limits, ranks,
        engines, stage names, sizes (each a one-line error naming the setting)."""
        with naming.speaking():
            return _settle(self)

    def check(self, naming: Naming = COMMAND_LINE, *, settled: SettledSettings | None = None):
        """Every pre-flight check, once, before any work: the settings, then what they point at
        (the input, the store, the tracking server, the notification target). `settled`: the
        result of an earlier `check_settings` (the command line boots Prefect between the two)."""
        settled = settled or self.check_settings(naming)
        with naming.speaking():
            return _check_world(self, settled)

    def check_data(self, naming: Naming = COMMAND_LINE, *, settled: SettledSettings) -> None:
        """The checks a run that only tokenizes needs past `check_settings`: the input and the
        store (no tracking server: tokenizing alone logs nothing to MLflow)."""
        with naming.speaking():
            check_data(self, settled)


@dataclass(frozen=True)
class SettledSettings:
    """The settings checked by `RunRequest.check_settings`, resolved."""

    config: Any  # model.config.TrainConfig
    source: str  # whole, credentials included
    store: str  # absolute when local
    shard_bytes: int
    nproc: int
    task_runner: tuple[str, str | None]
    timeout_seconds: float | None
    train_timeout_seconds: float | None
    refresh: list[str]
    notify: Any  # NotifyTarget | None
    data_limits: Any = None  # model.corpus_check.DataChangeLimits


def validation_line(exc: ValidationError, naming: Naming) -> str:
    """Pydantic's first complaint as one line, naming the setting as the user wrote it."""
    error = exc.errors()[0]
    parts = [str(part) for part in error["loc"] if not isinstance(part, int)]
    path = ".".join(parts)
    if error["type"] == "extra_forbidden":
        return f"{path}: not a setting gptpipe knows (see docs/deploy.md, Run requests)"
    # the setting's own path, without pydantic's names of a union's members (`nproc.int`)
    known = [".".join(parts[:n]) for n in range(len(parts), 0, -1)]
    path = next((p for p in known if p in FLAGS), path)
    return f"{naming.name(path)}: {error['msg'].lower()}, got {error.get('input')!r}"


def _settle(request: RunRequest) -> SettledSettings:
    from flows.alerts import check_timeout, notify_target
    from flows.engines import check_task_runner, resolve_task_runner
    from model.config import build_config
    from model.corpus import DEFAULT_SHARD_BYTES, parse_byte_size
    from model.launch import check_train_engine, resolve_nproc
    from tasks.cache import check_refresh

    data, compute, training = request.data, request.compute, request.training
    cfg = build_config(training.preset, training.config_file, training.overrides)
    timeout = check_timeout(request.alerts.timeout_seconds, name="--timeout")
    train_timeout = check_timeout(request.alerts.train_timeout_seconds, name="--train-timeout")
    target = notify_target(request.alerts.notify)
    nproc = resolve_nproc(compute.nproc, cfg.device)
    check_train_engine(compute.train_engine, compute.ray_address, nproc=nproc, device=cfg.device)
    runner = resolve_task_runner(compute.task_runner, compute.dask_address, compute.ray_address)
    check_task_runner(*runner, compute.workers)
    refresh = sorted(check_refresh(data.refresh))
    if request.sampling.sample_tokens < 0:
        raise GptpipeError(
            f"--sample-tokens must not be negative, got {request.sampling.sample_tokens}"
        )
    gate = request.tracking.min_improvement
    if gate is not None and not (gate >= 0 and math.isfinite(gate)):
        raise GptpipeError(f"--min-improvement must be a number of bits per byte >= 0, got {gate}")
    if training.init_from is not None and not training.init_from.strip():
        raise GptpipeError("--init-from is empty: give champion, models:/NAME/VERSION or a path")
    if training.init_from and compute.train_engine == "ray":
        raise GptpipeError(
            "--init-from trains with --train-engine torchrun only for now: use torchrun, or "
            "train without --init-from"
        )
    if data.val_shards < 0:
        raise GptpipeError(f"--val-shards must be a whole number >= 0, got {data.val_shards}")
    shard_bytes = data.shard_size if data.shard_size is not None else DEFAULT_SHARD_BYTES
    if isinstance(shard_bytes, str):
        try:
            shard_bytes = parse_byte_size(shard_bytes)
        except ValueError as exc:
            raise GptpipeError(f"--shard-size: {exc}") from None
    if shard_bytes < 1:
        raise GptpipeError(f"--shard-size must be a positive number of bytes, got {shard_bytes}")
    from model.corpus_check import DataChangeLimits

    limits = DataChangeLimits(
        max_corpus_shrink=data.max_corpus_shrink, max_new_char_share=data.max_new_char_share
    )
    source = data.source or os.environ.get("GPTPIPE_INPUT") or TINY_SHAKESPEARE_URL
    store = data.store or os.environ.get("GPTPIPE_STORE") or DEFAULT_STORE
    return SettledSettings(
        config=cfg,
        source=source,
        store=store if "://" in store else os.path.abspath(store),
        shard_bytes=shard_bytes,
        nproc=nproc,
        task_runner=runner,
        timeout_seconds=timeout,
        train_timeout_seconds=train_timeout,
        refresh=refresh,
        notify=target,
        data_limits=limits,
    )


def check_data(request: RunRequest, settled: SettledSettings) -> None:
    """What the data settings point at: the input, then the store (and the notification target,
    which is checked first: it is how a failure below would be reported on a schedule)."""
    import storage
    from model.corpus import check_input

    if settled.notify is not None:
        settled.notify.check()
    # the input before the store: a run that cannot start creates nothing
    check_input(settled.source)
    check_val_shards(settled.source, request.data.val_shards, settled.shard_bytes)
    storage.preflight(settled.store)  # an unusable store or input bucket fails here


def _check_world(request: RunRequest, settled: SettledSettings) -> CheckedRun:
    import storage
    from storage.tracking import Tracker, model_name_for, redact
    from tasks.tokenize import source_parameter

    check_data(request, settled)
    run_id = request.run_id
    if run_id:
        finished = storage.join(settled.store, "runs", run_id, "summary.json")  # checks the name
        if storage.exists(finished):
            raise GptpipeError(
                f"--run-id {run_id}: the store already has a finished run of that name "
                f"({finished}); choose another --run-id so that its outputs are kept"
            )
    tracking = request.tracking
    tracker = Tracker(tracking.tracking_uri, tracking.experiment)
    tracker.check()
    _check_init_from(request.training.init_from, tracker)
    cfg, compute = settled.config, request.compute
    plan = RunPlan(
        source=redact(settled.source),
        store=settled.store,
        config=cfg.to_dict(),
        shard_bytes=settled.shard_bytes,
        val_shards=request.data.val_shards,
        refresh=settled.refresh,
        accept_data_change=request.data.accept_data_change,
        max_corpus_shrink=settled.data_limits.max_corpus_shrink,
        max_new_char_share=settled.data_limits.max_new_char_share,
        resume=request.training.resume,
        init_from=request.training.init_from,
        vocab=request.training.vocab,
        min_improvement=request.tracking.min_improvement,
        nproc=settled.nproc,
        train_engine=compute.train_engine,
        ray_address=compute.ray_address if compute.train_engine == "ray" else None,
        tracking_uri=tracker.tracking_uri,
        experiment=tracking.experiment,
        model_name=tracking.model_name or model_name_for(settled.source, cfg.tokenizer),
        prompt=request.sampling.prompt,
        sample_tokens=request.sampling.sample_tokens,
        run_id=run_id or new_run_id(),
        train_timeout_seconds=settled.train_timeout_seconds,
    )
    return CheckedRun(
        plan=plan,
        source=source_parameter(settled.source),
        task_runner=settled.task_runner,
        workers=compute.workers,
        timeout_seconds=settled.timeout_seconds,
        notify=settled.notify,
    )


def _check_init_from(init_from: str | None, tracker) -> None:
    """What a warm start begins from exists: a registered version, or a checkpoint file."""
    if not init_from or init_from == "champion":  # no champion yet: a cold start, said so
        return
    if init_from.startswith("models:/"):
        from tasks.warm_start import registered_version

        registered_version(tracker, init_from)
        return
    import storage

    path = init_from if "://" in init_from else os.path.abspath(init_from)
    if not storage.exists(path):
        raise GptpipeError(
            f"--init-from {init_from}: no such checkpoint; give champion, "
            "models:/NAME/VERSION or the path of a ckpt.pt"
        )


def check_val_shards(source: str, val_shards: int, shard_bytes: int) -> None:
    """`val_shards` leaves at least one shard to train on. The shards of a file, folder or
    s3:// source are planned from the files' sizes now; an http(s) source's are known only once
    it is downloaded (the split stage checks those)."""
    if not val_shards or source.startswith(("http://", "https://")):
        return
    from model.corpus import list_inputs, plan_shards

    n_shards = len(plan_shards(list_inputs(source), shard_bytes))
    if val_shards >= n_shards:
        raise GptpipeError(
            f"--val-shards {val_shards}: the dataset has {n_shards} shard(s) and training "
            "needs at least one; use fewer val shards, a smaller --shard-size, or val_fraction"
        )


def new_run_id() -> str:
    import secrets
    import time

    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


# --------------------------------------------------------------------------------- sweeps
FLAGS.update(
    {
        "search.space": "--space",
        "search.trials": "--trials",
        "search.parallel": "--parallel",
        "search.name": "--name",
        "search.study_storage": "--study-storage",
    }
)


class SearchSettings(Section):
    """What a sweep searches (docs/sweeps.md) and how many trials run at a time."""

    space: dict[str, Any] = Field(description="the search space: a space file's mapping")
    space_file: str | None = Field(None, description="the file it was read from (for errors)")
    trials: int | None = Field(None, description="how many trials (null: the space's)")
    parallel: int = Field(1, description="trials run at a time")
    name: str | None = Field(None, description="the same name resumes the sweep")
    study_storage: str | None = Field(
        None, description="a database URL for the Optuna study (null: a journal in the store)"
    )


class SweepRequest(RunRequest):
    """A sweep: a run request (its data, compute, training, tracking) and what to search."""

    search: SearchSettings

    def check_settings(self, naming: Naming = COMMAND_LINE) -> SettledSettings:
        from tasks.space import parse_space

        settled = super().check_settings(naming)
        search = self.search
        with naming.speaking():
            origin = naming.name("search.space")
            origin = f"{origin} {search.space_file}" if search.space_file else origin
            parse_space(search.space, trials=search.trials, origin=origin)
            if search.parallel < 1:
                raise GptpipeError(f"--parallel must be at least 1, got {search.parallel}")
        if self.compute.nproc == "auto":  # the visible GPUs shared among the parallel trials
            settled = replace(settled, nproc=max(1, settled.nproc // search.parallel))
        return replace(settled, notify=None)  # a sweep sends no alerts

    def check(self, naming: Naming = COMMAND_LINE, *, settled: SettledSettings | None = None):
        from tasks.study import check_study_storage

        settled = settled or self.check_settings(naming)
        with naming.speaking():
            # before the store is touched
            check_study_storage(settled.store, self.search.study_storage)
        checked = super().check(naming, settled=settled)
        runner, address = checked.task_runner
        if runner != "default" and address is None and checked.workers is None:
            # a local cluster of one worker per parallel trial
            checked = replace(checked, workers=self.search.parallel)
        return checked


def check_in_flow(request: RunRequest):
    """`request.check(DEPLOYMENT)` as a Prefect task of the calling flow, named `check-request`:
    a deployment's bad setting fails that task, so the run's alert names it as the stage that
    failed (as it names `train` for a training that failed)."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    checking = task(name="check-request", retries=0, persist_result=False, cache_policy=NO_CACHE)(
        lambda: request.check(DEPLOYMENT)
    )
    return checking()
