"""The stdout line protocol between rank 0 and its launcher: LINE_MARK + JSON, one call a line.

When a launcher logs for rank 0, rank 0's `LineRun` prints each tracking call as one line; the
launcher, which reads the ranks' output anyway, hands each line to `parse_line` (through
`TrainingRun.log_line`). So the training process never imports MLflow (about 1.5 s of CPU at
start-up on these machines) nor waits on it.
"""

from __future__ import annotations

import base64
import json
import time
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


def _fits(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def parse_line(line: str) -> tuple[str, list] | None:
    """The call a `LineRun` printed as line, as (name, arguments); None if it is no such call."""
    if not line.startswith(LINE_MARK):
        return None
    try:
        call = json.loads(line[len(LINE_MARK) :])
    except ValueError:
        return None
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
