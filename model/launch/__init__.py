"""Launching training, apart from the ML library: the launchers, what they and rank 0 say to each
other, and the lifeline that ends a training with the process that started it.

- torchrun: `launch_training` (`python -m model.train` for one rank, torchrun for more),
  `Rendezvous` (several nodes), `Listeners` (who hears rank 0, for either launcher),
  `train_command`, `resolve_nproc`, `check_nproc`
- ray: `launch_ray_training` (Ray Train workers on a cluster), `check_train_engine`
- protocol: the lines rank 0 prints for its launcher: tracking calls (`LineRun`, `parse_line`)
  and evaluations (`Evaluation`, `evaluation_line`, `parse_evaluation`)
- reader: what a launcher does with rank 0's output (`RankOutput`), `TrainingStopped` (an
  ``on_eval`` watcher stopped it), `parse_checkpoint_line`
- sender: `TrainingRun`, the background sender of rank 0's tracking calls to MLflow
- rank: which run rank 0 logs into (`training_run`, `RUN_ID_ENV`)
- lifeline: children that end with their parent (`die_with_parent`)

The names below are imported from their modules on first use: a training process imports
`protocol` and `rank`, the CLI `lifeline`, and neither loads the launchers (nor MLflow) so.
"""

from __future__ import annotations

_TORCHRUN = (
    "Listeners",
    "ONE_NODE",
    "Rendezvous",
    "TO_STDOUT",
    "check_nproc",
    "launch_training",
    "resolve_nproc",
    "train_command",
)
_RAY = ("check_train_engine", "launch_ray_training")
_PROTOCOL = ("Evaluation", "LineRun", "evaluation_line", "parse_evaluation", "parse_line")
_READER = ("RankOutput", "TrainingStopped", "parse_checkpoint_line")
_SENDER = ("CLOSE_TIMEOUT_S", "TrainingRun")
_RANK = ("RUN_ID_ENV", "training_run")
_LIFELINE = ("die_with_parent",)

__all__ = sorted(_TORCHRUN + _RAY + _PROTOCOL + _READER + _SENDER + _RANK + _LIFELINE)


def __getattr__(name: str):
    # the imports are written out (not importlib): the train stage's code version follows them
    # (tasks.cache.code_files), and so does lint-imports
    if name in _TORCHRUN:
        from model.launch import torchrun as module
    elif name in _RAY:
        from model.launch import ray as module
    elif name in _PROTOCOL:
        from model.launch import protocol as module
    elif name in _READER:
        from model.launch import reader as module
    elif name in _SENDER:
        from model.launch import sender as module
    elif name in _RANK:
        from model.launch import rank as module
    elif name in _LIFELINE:
        from model.launch import lifeline as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
