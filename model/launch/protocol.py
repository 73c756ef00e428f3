"""The lines rank 0 prints for its launcher: one message a line, a mark and then JSON.

The launcher reads rank 0's output anyway (torchrun's stdout, or the Ray relay), so that output
is also how rank 0 tells it what it must know in structured form:

- tracking calls, ``gptpipe.mlflow [name, *args]``: when a launcher logs for rank 0
  (``--track-stdout``), rank 0's `LineRun` prints each call and the launcher's
  `model.launch.sender.TrainingRun` sends it, so the training processes never import MLflow
  (about 1.5 s of CPU at start-up on these machines) nor wait on it;
- evaluations, ``gptpipe.eval {"step": N, "train_loss": X, "val_loss": Y}``: printed at every
  evaluation, tracked or not (`evaluation_line`); the launcher hands them to its ``on_eval``
  watcher (a sweep's pruner). The line ``step N: train loss X, val loss Y``
  (`model.progress.eval_line`) is printed beside it for people; nothing parses that one.

A line with a mark that is not a well-formed message is no message (`parse_line`,
`parse_evaluation` return None): the launcher shows it as it shows any other line, and a
training never dies of its tracking.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any

LINE_MARK = "gptpipe.mlflow "
# The calls a LineRun prints, and the JSON types of their arguments after the name: a line
# whose arguments differ is no call of ours (float: any JSON number; bool is no number)
LINE_CALLS: dict[str, tuple[type, ...]] = {
    "log_params": (dict,),
    "log_text": (str, str),
    "log_dict": (dict, str),
    "log_artifact_bytes": (str, str),  # the bytes in base64, the artifact's path
    "log_metrics": (dict, int, int),  # {name: number}, step, epoch ms
}
EVAL_MARK = "gptpipe.eval "
EVAL_FIELDS = ("step", "train_loss", "val_loss")


def _fits(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def _payload(line: str, mark: str) -> Any:
    """The JSON after mark, or None if line has no such mark or no JSON after it."""
    if not line.startswith(mark):
        return None
    try:
        return json.loads(line[len(mark) :])
    except ValueError:
        return None


# ----------------------------------------------------------------------------- tracking calls


def parse_line(line: str) -> tuple[str, list] | None:
    """The call a `LineRun` printed as line, as (name, arguments); None if it is no such call."""
    call = _payload(line, LINE_MARK)
    if not isinstance(call, list) or not call or not isinstance(call[0], str):
        return None
    name, args = call[0], call[1:]
    kinds = LINE_CALLS.get(name)
    if kinds is None or len(args) != len(kinds):
        return None
    if not all(_fits(arg, kind) for arg, kind in zip(args, kinds, strict=True)):
        return None
    if name == "log_metrics" and not all(_fits(v, float) for v in args[0].values()):
        return None
    if name == "log_artifact_bytes":
        try:
            args[0] = base64.b64decode(args[0], validate=True)
        except ValueError:  # binascii.Error is one
            return None
    return name, args


class LineRun:
    """Rank 0's run when its launcher logs for it (`model.train --track-stdout`): each call is
    printed as one line, LINE_MARK + JSON, which the launcher reads anyway and hands to its own
    `TrainingRun.log_line`."""

    run_id = None

    def _print(self, *call: Any) -> None:
        print(LINE_MARK + json.dumps(call, default=str), flush=True)

    def log_params(self, params: dict[str, Any]) -> None:
        self._print("log_params", params)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._print("log_text", text, artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self._print("log_dict", data, artifact_file)

    def log_artifact_bytes(self, data: bytes, artifact_file: str) -> None:
        self._print("log_artifact_bytes", base64.b64encode(data).decode("ascii"), artifact_file)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        values = {key: float(value) for key, value in metrics.items()}
        self._print("log_metrics", values, step, int(time.time() * 1e3))

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- evaluations


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of a training: the mean losses on train and val batches at a step."""

    step: int
    train_loss: float
    val_loss: float


def evaluation_line(step: int, train_loss: float, val_loss: float) -> str:
    """The line rank 0 prints at each evaluation for its launcher (`parse_evaluation`): the
    losses as they are, not rounded as the line for people is."""
    values = (int(step), float(train_loss), float(val_loss))
    return EVAL_MARK + json.dumps(dict(zip(EVAL_FIELDS, values, strict=True)))


def parse_evaluation(line: str) -> Evaluation | None:
    """The evaluation an `evaluation_line` says; None for any other line."""
    data = _payload(line, EVAL_MARK)
    if not isinstance(data, dict) or set(data) != set(EVAL_FIELDS):
        return None
    step, train_loss, val_loss = (data[name] for name in EVAL_FIELDS)
    if not _fits(step, int) or not _fits(train_loss, float) or not _fits(val_loss, float):
        return None
    return Evaluation(step, float(train_loss), float(val_loss))
