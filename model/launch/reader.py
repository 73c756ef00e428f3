"""What a launcher does with rank 0's output: protocol messages to their receivers, the rest shown.

Both launchers read rank 0's lines here (torchrun's stdout, `model.launch.torchrun`; the Ray
relay, `model.launch.ray`): tracking calls go to the launcher's `TrainingRun`, evaluations to its
``on_eval`` watcher, which may stop the training (`TrainingStopped`), and every other line to
``on_line``, the last ones kept for the error of a failed training.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Iterable

from model.launch.protocol import Evaluation, parse_evaluation
from model.launch.sender import TrainingRun
from storage.errors import GptpipeError

# How many of the last lines a failed training's error shows
TAIL_LINES = 40


class TrainingStopped(Exception):
    """The training was stopped early because its `on_eval` watcher asked for it (a sweep's
    pruner): not an error, and nothing to retry."""

    mlflow_status = "KILLED"  # the train stage's MLflow run: stopped, not failed

    def __init__(self, step: int, val_loss: float):
        super().__init__(f"stopped on purpose at step {step} (val loss {val_loss:.4f})")
        self.step, self.val_loss = step, val_loss


class RankOutput:
    """Rank 0's output as its launcher reads it, line by line (`read`).

    run: where tracking calls go (None: they are shown like other lines, as nothing asked for
    them). on_eval(evaluation) is called at each of the training's evaluations; when it returns
    True, `TrainingStopped` is raised (the launcher then stops the training). Evaluations are
    never shown: rank 0 prints a line for people beside each.
    """

    def __init__(
        self,
        run: TrainingRun | None,
        on_line: Callable[[str], None],
        on_eval: Callable[[Evaluation], bool] | None = None,
    ):
        self.run, self.on_line, self.on_eval = run, on_line, on_eval
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.errors: list[str] = []  # the `error: ` lines, each once, in order

    def read(self, lines: Iterable[str]) -> None:
        for line in lines:
            self._take(line.rstrip("\n"))

    def _take(self, line: str) -> None:
        evaluation = parse_evaluation(line)
        if evaluation is not None:
            if self.on_eval is not None and self.on_eval(evaluation):
                raise TrainingStopped(evaluation.step, evaluation.val_loss)
            return
        if self.run is not None and self.run.log_line(line):
            return
        self.tail.append(line)
        if line.startswith("error: ") and line not in self.errors:
            self.errors.append(line)
        self.on_line(line)

    def failure(self, what: str) -> Exception:
        """The error of a training that failed: its first `error: ` line (a one-line
        GptpipeError), else a RuntimeError saying what happened, with the last lines."""
        if self.errors:
            return GptpipeError(self.errors[0].removeprefix("error: "))
        return RuntimeError(f"{what}; last output:\n" + "\n".join(self.tail))


# the lines model.train prints when a checkpoint is written, and when it resumes from one
_CHECKPOINT_LINE = re.compile(r"^(?:checkpoint at|resumed from) step (\d+)\b")


def parse_checkpoint_line(line: str) -> int | None:
    """The step of the checkpoint a training line says is stored (written, or resumed from);
    None for any other line: what an interrupted run can be continued from."""
    match = _CHECKPOINT_LINE.match(line)
    return int(match[1]) if match else None
