"""Which run rank 0 of a training logs into, chosen from explicit arguments (never os.environ).

`model.train` parses `--track-stdout` (set by the launchers, whose process sends the calls) and
`--mlflow-run-id ID` (rank 0 connects itself, e.g. multi-node by hand) and hands them here.
"""

from __future__ import annotations

from model.launch.protocol import LineRun
from model.launch.sender import TrainingRun
from storage.tracking import NullRun

# Read by `model.train`'s argument parser only, as the default of --mlflow-run-id, so that
# torchrun commands that set it on every node keep working
RUN_ID_ENV = "GPTPIPE_MLFLOW_RUN_ID"


def training_run(
    is_main: bool,
    track_stdout: bool = False,
    run_id: str | None = None,
    tracking_uri: str | None = None,
) -> TrainingRun | LineRun | NullRun:
    """Rank 0's run: printed for the launcher (track_stdout), or its own connection to run_id on
    tracking_uri (None: MLflow's own, $MLFLOW_TRACKING_URI); other ranks, and runs with
    neither, log nothing."""
    if not is_main:
        return NullRun()
    if track_stdout:
        return LineRun()
    if not run_id:
        return NullRun()
    return TrainingRun(tracking_uri, run_id)
