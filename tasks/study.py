"""A sweep's Optuna study: where its state lives, and how a trial reports to it from any worker.

The study is the sweep's memory. Its state lives with the sweep, so that a sweep that is killed
resumes with its finished trials kept: in the store (a journal file beside the sweep's summary,
Optuna's `JournalFileBackend`, safe for several processes on one machine or a shared folder), or
in a database at an RDB URL (``sqlite:///...``, ``postgresql://...``) that workers on other
machines reach too. The flow asks and tells (Optuna's ask/tell interface); a trial, wherever its
task runs, opens the same study to report its evaluations to the pruner.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import storage
from model.launch.protocol import Evaluation
from storage.errors import GptpipeError, first_line
from storage.tracking import redact
from tasks.space import Pruner

JOURNAL_NAME = "study.journal"


@dataclass(frozen=True)
class StudyRef:
    """Where a sweep's study is: its name, its storage (an RDB URL or a journal file's path) and
    the pruner every process opens it with."""

    name: str
    storage: str
    pruner: Pruner = Pruner()

    def open(self, sampler=None, *, create: bool = False):
        """The study, created if ``create`` and not there yet (a resumed sweep loads it)."""
        import optuna

        optuna.logging.set_verbosity(logging.WARNING)
        backend = _storage(self.storage)
        if create:
            return optuna.create_study(
                study_name=self.name,
                storage=backend,
                sampler=sampler,
                pruner=self.pruner.make(),
                direction="minimize",
                load_if_exists=True,
            )
        return optuna.load_study(
            study_name=self.name, storage=backend, sampler=sampler, pruner=self.pruner.make()
        )

    def shown(self) -> str:
        return redact(self.storage)


@dataclass(frozen=True)
class TrialRef:
    """One trial of a study, as a task on any worker can find it again."""

    study: StudyRef
    number: int
    trial_id: int

    def reporter(self) -> TrialReporter:
        return TrialReporter(self)


class TrialReporter:
    """Reports a training's evaluations to its trial; says when the pruner wants it stopped.

    Called as ``launch_training(listeners=Listeners(on_eval=...))`` with each of rank 0's
    evaluation messages (`model.launch.protocol.Evaluation`): stop?
    """

    def __init__(self, ref: TrialRef):
        import optuna

        self._trial = optuna.trial.Trial(ref.study.open(), ref.trial_id)

    def __call__(self, evaluation: Evaluation) -> bool:
        step = evaluation.step
        # a trial run again after a kill reaches the steps it reported before: reported once
        if step not in self._trial.storage.get_trial(self._trial._trial_id).intermediate_values:
            self._trial.report(evaluation.val_loss, step)
        return self._trial.should_prune()


def study_storage(store: str, sweep_name: str, url: str | None = None) -> str:
    """The study's storage: ``url`` if given, else a journal file in the store's
    sweeps/NAME/ folder (made here); both checked first (`check_study_storage`)."""
    check_study_storage(store, url)
    if url:
        return url
    folder = storage.local_path(storage.join(store, "sweeps", sweep_name))
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / JOURNAL_NAME)


def check_study_storage(store: str, url: str | None = None) -> None:
    """One-line errors, touching nothing: a ``url`` that does not open, or no url with a store
    that is not a folder (an s3:// store needs a database URL for the study)."""
    if url:
        _check_rdb(url)
        return
    try:
        storage.local_path(store)
    except GptpipeError:
        raise GptpipeError(
            f"a sweep's study lives in the store only when the store is a local or shared "
            f"folder; for {redact(store)} pass --study-storage with a database URL the trials "
            "can reach (e.g. postgresql://user:password@host/optuna or sqlite:////shared/s.db)"
        ) from None


def _storage(spec: str):
    """An Optuna storage for an RDB URL or a journal file path."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if "://" in spec:
        return RDBStorage(spec, engine_kwargs=_engine_kwargs(spec))
    return JournalStorage(JournalFileBackend(spec, lock_obj=JournalFileOpenLock(spec)))


def _engine_kwargs(url: str) -> dict:
    # several processes (the flow and each trial's worker) write to one sqlite file
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}


def _check_rdb(url: str) -> None:
    try:
        _storage(url)
    except ImportError as exc:
        raise GptpipeError(
            f"--study-storage {redact(url)}: its database driver is not installed "
            f"({first_line(exc.__cause__ or exc)}): pip install it beside gptpipe"
        ) from None
    except Exception as exc:  # sqlalchemy's errors: a bad URL, a refused connection
        detail = " ".join(str(exc).split())[:200]
        raise GptpipeError(f"--study-storage {redact(url)}: cannot open it: {detail}") from None
