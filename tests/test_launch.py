"""Rank 0's evaluations reach the launcher as protocol messages (`model.launch.protocol`), and the
sweep's pruner is driven by them, never by the line printed for people."""

from __future__ import annotations

import os

import pytest

from model.launch import (
    Evaluation,
    Listeners,
    RankOutput,
    TrainingStopped,
    evaluation_line,
    parse_evaluation,
)
from tests.conftest import launch_on

CONFIG = {
    "block_size": 8,
    "n_embd": 16,
    "n_head": 2,
    "n_layer": 1,
    "batch_size": 4,
    "max_iters": 30,
    "eval_interval": 10,
    "eval_iters": 1,
    "log_interval": 10,
    "checkpoint_interval": 0,
    "device": "cpu",
}


def test_an_evaluation_line_reads_back_exactly_and_nothing_else_is_one():
    line = evaluation_line(20, 2.123456789, 3.5)
    assert line.startswith("gptpipe.eval ")
    assert parse_evaluation(line) == Evaluation(20, 2.123456789, 3.5)  # not rounded
    assert parse_evaluation(evaluation_line(0, float("inf"), 4)).train_loss == float("inf")
    for not_one in (
        "step 20: train loss 2.1235, val loss 3.5000",  # the line for people
        "gptpipe.eval {not json",
        "gptpipe.eval []",
        'gptpipe.eval {"step": 1, "train_loss": 1.0}',
        'gptpipe.eval {"step": 1, "train_loss": 1.0, "val_loss": 2.0, "x": 0}',
        'gptpipe.eval {"step": 1.5, "train_loss": 1.0, "val_loss": 2.0}',
        'gptpipe.eval {"step": true, "train_loss": 1.0, "val_loss": 2.0}',
        'gptpipe.eval {"step": 1, "train_loss": "low", "val_loss": 2.0}',
        'gptpipe.eval {"step": 1, "train_loss": 1.0, "val_loss": false}',
        'gptpipe.mlflow ["log_metrics", {"val_loss": 2.0}, 1, 0]',
    ):
        assert parse_evaluation(not_one) is None, not_one


def test_the_reader_hands_evaluations_to_on_eval_and_the_rest_to_on_line():
    shown: list[str] = []
    seen: list[Evaluation] = []
    output = RankOutput(None, shown.append, lambda e: seen.append(e) or e.step >= 20)
    people = "step 10: train loss 9.9999, val loss 9.9999"  # says other numbers: not read
    output.read([people + "\n", evaluation_line(10, 2.5, 2.75) + "\n", "error: boom\n"])
    assert seen == [Evaluation(10, 2.5, 2.75)]
    assert shown == [people, "error: boom"]
    assert output.errors == ["error: boom"]
    with pytest.raises(TrainingStopped) as stopped:
        output.read([evaluation_line(20, 2.0, 2.25)])
    assert (stopped.value.step, stopped.value.val_loss) == (20, 2.25)
    assert "gptpipe.eval" not in " ".join(shown)


def test_on_eval_gets_every_evaluation_of_the_summary_as_it_is(char_dataset, tmp_path):
    lines: list[str] = []
    seen: list[Evaluation] = []
    summary = launch_on(
        char_dataset,
        tmp_path / "out",
        CONFIG,
        listeners=Listeners(on_line=lines.append, on_eval=lambda e: seen.append(e) or False),
    )
    history = [Evaluation(h["step"], h["train_loss"], h["val_loss"]) for h in summary["history"]]
    assert [e.step for e in history] == [0, 10, 20, 30]
    assert seen == history  # the floats themselves, not the 4 decimals of the log line
    assert [line for line in lines if line.startswith("step ")] == [
        f"step {e.step}: train loss {e.train_loss:.4f}, val loss {e.val_loss:.4f}" for e in history
    ]
    assert not [line for line in lines if line.startswith("gptpipe.")]


def test_the_pruner_stops_a_training_whose_log_line_says_no_loss(char_dataset, tmp_path):
    """The sweep's pruner (tasks.study.TrialReporter) as the train task hands it to the launcher,
    on a training whose line for people is replaced by one without numbers: still pruned."""
    from tasks.space import Pruner
    from tasks.study import StudyRef, TrialRef

    ref = StudyRef("prune", str(tmp_path / "study.journal"), Pruner("median", 1, 1))
    study = ref.open(create=True)
    better = study.ask()
    for step in (0, 10, 20, 30):
        better.report(0.0, step)
    study.tell(better, 0.0)
    trial = study.ask()

    shim = tmp_path / "shim"  # rank 0's line for people, changed in the training process
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import model.progress\n"
        "model.progress.eval_line = lambda step, train, val: f'evaluated at step {step}'\n"
    )
    path = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH")) if p)
    lines: list[str] = []
    with pytest.raises(TrainingStopped) as stopped:
        launch_on(
            char_dataset,
            tmp_path / "out",
            CONFIG,
            listeners=Listeners(
                on_line=lines.append,
                on_eval=TrialRef(ref, trial.number, trial._trial_id).reporter(),
            ),
            extra_env={"PYTHONPATH": path},
        )
    assert "evaluated at step 0" in lines and not [x for x in lines if "val loss" in x], lines
    assert stopped.value.step == 10  # the first step after the warmup
    reported = ref.open().trials[trial.number]
    assert sorted(reported.intermediate_values) == [0, 10]
    assert reported.intermediate_values[10] == stopped.value.val_loss > 0.0
