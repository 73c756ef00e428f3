"""The sweep flow: tokenize and split once, then train and evaluate trials K at a time, the
search driven by an Optuna study (ask/tell), the best trial's model registered.

Each trial is a `tasks.trial.run_trial` task on the flow's task runner (threads, or a Dask or
Ray cluster's workers) and a training with its own content key: a trial whose config was
trained before is re-used. The study lives with the sweep (`tasks.study`), so running the same
sweep again after it was killed resumes it: finished trials are kept, trials that were running
are run again (a finished training among them is re-used from the store).

MLflow: one parent run for the sweep, one nested run per trial (its searched values as params,
its val loss curve and final val loss, its state), the trial's stages nested under it. The best
trial's model is registered; `champion` moves only if it beats the current champion on the same
val data, as in the pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import as_completed

import storage
from flows.engines import with_task_runner
from flows.pipeline import mlflow_summary, publish_markdown, tokenize_and_split
from flows.request import (
    DEPLOYMENT,
    ComputeSettings,
    DataSettings,
    RunPlan,
    SearchSettings,
    SweepRequest,
    TrackingSettings,
    TrainingSettings,
    check_in_flow,
)
from model.config import config_from_dict
from model.machine import usable_cores
from storage.errors import GptpipeError, first_line
from storage.lease import Lease
from storage.tracking import Tracker, end_status, redact
from tasks.cache import lease_dir
from tasks.register import register_model
from tasks.results import EvaluateResult, Tracking, TrainResult, Workspace
from tasks.space import SweepSpace, parse_space
from tasks.study import StudyRef, study_storage
from tasks.tokenize import SourceURL, reveal
from tasks.trial import COMPLETE, FAILED, Evaluation, TrialOutcome, TrialSpec, record_outcome
from tasks.trial import run_trial as trial_task

SWEEP_TAG = "gptpipe.sweep"
OUTCOME_ATTR = "gptpipe_outcome"  # a finished trial's outcome, kept in the study
RUN_ATTR = "gptpipe_mlflow_run_id"  # a trial's MLflow run, kept so a resumed trial logs there


def sweep_name_for(source: str, space: dict, config: dict, nproc: int) -> str:
    """The default name: the same sweep (input, space, base config, ranks) gets the same name,
    so running the same command again resumes it. --trials is left out: asking for more trials
    continues the same study."""
    shown = {k: v for k, v in space.items() if k != "trials"}
    text = json.dumps([redact(source), shown, config, nproc], sort_keys=True, default=str)
    return "sweep-" + hashlib.sha256(text.encode()).hexdigest()[:10]


@flow(name="gptpipe-sweep")
def sweep(source: str | SourceURL, plan: RunPlan, search: SearchSettings) -> dict:
    """Search ``search.space`` (a space file's mapping, `tasks.space`) on ``source`` with the
    checked ``plan`` (`flows.request.SweepRequest.check`); the sweep's summary (also stored as
    sweeps/NAME/summary.json), its trials ranked by val loss."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logger = get_run_logger()
    cfg = config_from_dict(plan.config)
    url = reveal(source)
    name = search.name or sweep_name_for(url, search.space, cfg.to_dict(), plan.nproc)
    searched = parse_space(search.space, trials=search.trials)
    visible = visible_gpus(cfg.device)
    slots = gpu_slots(search.parallel, plan.nproc, visible)
    base = _base_config(
        cfg.to_dict(), parallel=search.parallel, nproc=plan.nproc, on_gpus=bool(visible)
    )
    # one process per study at a time: a second sweep of the same name waits, then resumes it
    lease = Lease(
        lease_dir(plan.store, "sweep", name),
        owner=f"gptpipe sweep {name} (pid {os.getpid()})",
        what=f"sweep {name}",
        on_wait=logger.info,
    ).acquire()
    try:
        return _search(url, cfg, plan, search, name=name, searched=searched, slots=slots, base=base)
    finally:
        lease.release()


def _search(
    url: str,
    cfg,
    plan: RunPlan,
    search: SearchSettings,
    *,
    name: str,
    searched: SweepSpace,
    slots: list[str | None],
    base: dict,
) -> dict:
    """The sweep's study, run to its number of trials under its lease; the summary."""
    logger = get_run_logger()
    tracker = Tracker(plan.tracking_uri, plan.experiment)
    study_ref = StudyRef(
        name, study_storage(plan.store, name, search.study_storage), searched.pruner
    )
    study = _open_study(study_ref, searched)
    parent_id = _parent_run(tracker, study, name=name, searched=searched, base=base, url=url)
    tracked = Tracking(uri=tracker.tracking_uri, experiment=plan.experiment, parent_id=parent_id)
    workspace = Workspace(store=plan.store, tracking=tracked, owner=f"gptpipe sweep {name}")
    how = f"{searched.trials} trial(s), {searched.sampler} sampler, {search.parallel} at a time"
    logger.info("sweep %s: %s; study at %s", name, how, study_ref.shown())
    try:
        tokenized, splits = tokenize_and_split(url, cfg, plan, workspace)
        # every trial's final model is measured on the same val batches: the base config's
        evaluation = Evaluation(eval_iters=cfg.eval_iters, batch_size=cfg.batch_size, seed=cfg.seed)
        _TrialRunner(
            study,
            searched,
            base=base,
            tracker=tracker,
            parent_id=parent_id,
            slots=slots,
            submit=lambda spec: trial_task.submit(
                spec,
                splits,
                workspace=workspace,
                tokenizer=tokenized.tokenizer,
                study=study_ref,
                evaluation=evaluation,
                nproc=plan.nproc,
            ),
            study_ref=study_ref,
        ).run(search.parallel)
        outcomes = _outcomes(study)
        best = _best(outcomes, name)
        registered = register_model(
            workspace,
            plan.model_name,
            trained=TrainResult.from_dict(best.trained),
            evaluated=EvaluateResult(**best.evaluated),
            splits=splits,
            tokenizer=tokenized.tokenizer,
            run_id=f"{name}-trial-{best.number}",
        )
        summary = {
            "sweep": name,
            "prefect_flow_run_id": _flow_run_id(),
            "source": redact(url),
            "study_storage": study_ref.shown(),
            "space": searched.to_dict(),
            "parallel": search.parallel,
            "best": best.to_dict(),
            "trials": [o.to_dict() for o in _ranked(outcomes)],
            "model": registered.to_dict(),
            "mlflow": mlflow_summary(tracker, plan.experiment, parent_id),
            "outputs": {
                "tokens": tokenized.tokens.uri,
                "train": splits.train.uri,
                "val": splits.val.uri,
            },
        }
        return _finish(summary, tracker, parent_id, store=plan.store, n_trials=len(outcomes))
    except BaseException as exc:  # FAILED; KILLED when interrupted (Ctrl-C, SIGTERM)
        tracker.client.set_terminated(parent_id, end_status(exc))
        raise


def _finish(summary: dict, tracker: Tracker, parent_id: str, *, store: str, n_trials: int) -> dict:
    """The sweep's parent run, its stored summary and its Prefect report; the summary."""
    best = summary["best"]
    parent = tracker.stage_handle(parent_id)
    parent.log_metrics({"best_val_loss": best["val_loss"], "trials_done": n_trials})
    parent.set_tags(
        {"gptpipe.best_trial": best["number"], "gptpipe.best_run_id": best["mlflow_run_id"]}
    )
    parent.log_dict(summary, "sweep.json")
    tracker.client.set_terminated(parent_id, "FINISHED")
    summary_uri = storage.join(store, "sweeps", summary["sweep"], "summary.json")
    storage.put_bytes(summary_uri, json.dumps(summary, indent=2).encode("utf-8"))
    summary["summary_uri"] = summary_uri
    publish_markdown(sweep_report(summary), key="gptpipe-sweep", description="sweep trials")
    return summary


def _best(outcomes: list[TrialOutcome], name: str) -> TrialOutcome:
    """The completed trial of lowest val loss; none completed is the sweep's failure."""
    completed = [o for o in outcomes if o.state == COMPLETE]
    if not completed:
        first_error = next((o.error for o in outcomes if o.error), "no trial completed")
        raise GptpipeError(f"every trial of sweep {name} failed or was pruned: {first_error}")
    return min(completed, key=lambda o: (o.val_loss, o.number))


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return flow_run.id


def visible_gpus(device: str) -> list[str]:
    """The GPUs trials may use here (their CUDA_VISIBLE_DEVICES ids); none on a CPU."""
    if device == "cpu":
        return []
    import torch

    count = torch.cuda.device_count()
    named = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return named[:count] if named else [str(i) for i in range(count)]


def gpu_slots(parallel: int, nproc: int, visible: list[str]) -> list[str | None]:
    """Each of the K trial slots' GPUs: K disjoint sets of nproc GPUs (a CUDA_VISIBLE_DEVICES
    value each), so parallel trials never share one; None for every slot without GPUs."""
    if not visible:
        return [None] * parallel
    if parallel * nproc > len(visible):
        raise GptpipeError(
            f"--parallel {parallel} trials of --nproc {nproc} need {parallel * nproc} GPUs, and "
            f"{len(visible)} are visible: lower --parallel or --nproc"
        )
    return [",".join(visible[k * nproc : (k + 1) * nproc]) for k in range(parallel)]


@flow(name="hyperparameter-sweep")
def deployed_sweep(
    search: SearchSettings,
    data: DataSettings = DataSettings(),
    compute: ComputeSettings = ComputeSettings(nproc=1),
    training: TrainingSettings = TrainingSettings(),
    tracking: TrackingSettings = TrackingSettings(),
) -> dict:
    """The sweep as a deployment runs it (deploy/prefect.yaml): a sweep request's sections as
    parameters, checked before any work (a bad value is one line naming its parameter, e.g.
    ``search.parallel``); unset ``data.source`` and ``data.store`` from $GPTPIPE_INPUT and
    $GPTPIPE_STORE like the nightly flow; the trials on the task runner named (a local Dask or
    Ray cluster of ``compute.workers``, default one per parallel trial, or the one at the
    address)."""
    request = SweepRequest.of(
        DEPLOYMENT,
        search=search,
        data=data,
        compute=compute,
        training=training,
        tracking=tracking,
    )
    checked = check_in_flow(request)
    return with_task_runner(sweep, *checked.task_runner, checked.workers)(
        source=checked.source, plan=checked.plan, search=request.search
    )


def _base_config(config: dict, *, parallel: int, nproc: int, on_gpus: bool) -> dict:
    """The trials' base config: K trials at a time on a CPU share its cores (each training
    would otherwise take them all, and K of them would fight over them)."""
    if parallel > 1 and config["threads"] == 0 and not on_gpus:
        return {**config, "threads": max(1, usable_cores() // (parallel * nproc))}
    return config


def _open_study(ref: StudyRef, searched: SweepSpace):
    study = ref.open(searched.make_sampler(), create=True)
    if searched.sampler == "grid" and not study.trials:
        for point in searched.grid_points():  # grid trials in the file's order
            study.enqueue_trial(point)
    return study


def _parent_run(tracker: Tracker, study, *, name: str, searched, base: dict, url: str) -> str:
    """The sweep's MLflow run: the one a resumed sweep started with, if the server has it."""
    known = study.user_attrs.get(RUN_ATTR)
    if known:
        try:
            tracker.client.get_run(known)
            tracker.client.update_run(known, status="RUNNING")
            return known
        except Exception:
            pass  # another tracking server: a new parent run there
    parent_id = tracker.start_run(name, tags={SWEEP_TAG: name})
    run = tracker.stage_handle(parent_id)
    run.log_params(
        {
            "sampler": searched.sampler,
            "trials": searched.trials,
            "searched": ",".join(p.name for p in searched.params),
            "budget": json.dumps(searched.budget),
            "pruner": searched.pruner.kind,
            "source": redact(url),
            **{k: v for k, v in base.items() if k not in {p.name for p in searched.params}},
        }
    )
    study.set_user_attr(RUN_ATTR, parent_id)
    return parent_id


class _TrialRunner:
    """Keeps K trials in flight: asks the study for the next, submits it, tells the study each
    outcome as it arrives, until the study has its number of finished trials."""

    def __init__(self, study, searched, *, base, tracker, parent_id, slots, submit, study_ref):
        self.study, self.searched, self.base = study, searched, base
        self.slots = slots  # each slot's GPUs (None on a CPU): a trial runs in a free slot
        self.tracker, self.parent_id, self.submit = tracker, parent_id, submit
        self.study_ref = study_ref
        self.logger = get_run_logger()
        # trials left running by a sweep that was killed: run again under the same number
        self.resumed = [t for t in study.trials if t.state.name == "RUNNING"]

    def finished(self) -> int:
        return sum(1 for t in self.study.trials if t.state.is_finished())

    def run(self, parallel: int) -> None:
        pending: dict = {}  # future -> (spec, slot)
        free = list(range(parallel))
        while True:
            while free and self.finished() + len(pending) < self.searched.trials:
                slot = free[0]
                spec = self._next_spec(self.slots[slot])
                if spec is None:
                    continue  # its config did not fit: recorded as failed, ask again
                pending[self.submit(spec)] = (spec, free.pop(0))
            if not pending:
                return
            done = next(as_completed(list(pending)))
            spec, slot = pending.pop(done)
            free.append(slot)
            try:
                outcome = done.result()
            except Exception as exc:  # the trial task itself crashed (a lost worker, say)
                outcome = TrialOutcome(
                    number=spec.number,
                    state=FAILED,
                    params=spec.params,
                    error=first_line(exc, limit=300),
                    mlflow_run_id=spec.mlflow_run_id,
                )
                record_outcome(self.tracker, outcome, study=self.study_ref)
            self._tell(outcome)

    def _next_spec(self, gpus: str | None) -> TrialSpec | None:
        if self.resumed:
            frozen = self.resumed.pop(0)
            trial, params = _trial_of(self.study, frozen), dict(frozen.params)
            self.logger.info("trial %d: left running by an earlier sweep, run again", trial.number)
        else:
            trial = self.study.ask()
            params = self.searched.suggest(trial)
        run_id = trial.user_attrs.get(RUN_ATTR) or self._trial_run(trial.number, params)
        trial.set_user_attr(RUN_ATTR, run_id)
        try:
            config = self.searched.trial_config(self.base, params)
        except GptpipeError as exc:
            outcome = TrialOutcome(
                number=trial.number,
                state=FAILED,
                params=params,
                error=str(exc),
                mlflow_run_id=run_id,
            )
            self.logger.warning("trial %d failed: %s", trial.number, exc)
            record_outcome(self.tracker, outcome, study=self.study_ref)
            self._tell(outcome)
            return None
        self.logger.info("trial %d: %s", trial.number, params)
        return TrialSpec(trial.number, trial._trial_id, params, config, run_id, gpus)

    def _trial_run(self, number: int, params: dict[str, Any]) -> str:
        run_id = self.tracker.start_run(
            f"trial-{number}", self.parent_id, tags={SWEEP_TAG: self.study.study_name}
        )
        self.tracker.stage_handle(run_id).log_params({**params, "trial": number})
        return run_id

    def _tell(self, outcome: TrialOutcome) -> None:
        from optuna.trial import TrialState

        state = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED}.get(
            outcome.state, TrialState.FAIL
        )
        trial = _trial_of(self.study, self.study.trials[outcome.number])
        trial.set_user_attr(OUTCOME_ATTR, outcome.to_dict())
        values = outcome.val_loss if state == TrialState.COMPLETE else None
        self.study.tell(outcome.number, values, state=state, skip_if_finished=True)
        shown = f"val loss {outcome.val_loss:.4f}" if outcome.val_loss is not None else ""
        self.logger.info(
            "trial %d %s %s%s", outcome.number, outcome.state, shown, outcome.error or ""
        )


def _trial_of(study, frozen):
    import optuna

    return optuna.trial.Trial(study, frozen._trial_id)


def _outcomes(study) -> list[TrialOutcome]:
    """The finished trials' outcomes, as the study keeps them."""
    outcomes = []
    for trial in study.trials:
        kept = trial.user_attrs.get(OUTCOME_ATTR)
        if trial.state.is_finished() and kept:
            outcomes.append(TrialOutcome(**kept))
    return outcomes


def _ranked(outcomes: list[TrialOutcome]) -> list[TrialOutcome]:
    order = {"complete": 0, "pruned": 1, "failed": 2}
    return sorted(
        outcomes,
        key=lambda o: (order[o.state], o.val_loss if o.val_loss is not None else 0.0, o.number),
    )


def sweep_report(summary: dict) -> str:
    """The ranked table: what a user watching the Prefect UI wants to see of a sweep."""
    names = list(summary["space"]["params"])
    header = ["rank", "trial", "state", "val loss", *names]
    lines = [
        f"# gptpipe sweep {summary['sweep']}",
        "",
        f"Best: trial {summary['best']['number']}, val loss {summary['best']['val_loss']:.4f}; "
        f"model {summary['model']['name']} version {summary['model']['version']} "
        f"({summary['model']['reason']})",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for rank, trial in enumerate(summary["trials"], start=1):
        loss = f"{trial['val_loss']:.4f}" if trial["val_loss"] is not None else "-"
        values = [str(trial["params"].get(n, "")) for n in names]
        lines.append(
            "| "
            + " | ".join([str(rank), str(trial["number"]), trial["state"], loss, *values])
            + " |"
        )
    return "\n".join(lines)


__all__ = ["deployed_sweep", "sweep", "sweep_name_for", "sweep_report"]
