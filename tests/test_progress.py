"""Rank 0's progress: a bar on a terminal, one plain line per log step elsewhere."""

from __future__ import annotations

import io

from model.plots import loss_curve_png
from model.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_with_loss_and_throughput():
    out = Terminal()
    progress = Progress(total=10, start=0, enabled=True, stream=out)
    for step in range(1, 11):
        progress.update()
        if step % 5 == 0:
            progress.log(step, 2.5, 1e-3, 12_345.0, 0.1)
    progress.close()
    text = out.getvalue()
    assert "\r" in text and "10/10" in text  # tqdm redraws one line
    assert "loss=2.5000" in text and "tok_s=12,345" in text
    assert "iter 5/10" not in text


def test_elsewhere_each_log_step_is_one_line_with_an_eta(capsys):
    progress = Progress(total=10, start=0, enabled=True, stream=io.StringIO())
    for step in range(1, 11):
        progress.update()
        if step % 5 == 0:
            progress.log(step, 2.5, 1e-3, 12_345.0, 0.1)
    progress.write("step 10: train loss 2.5, val loss 2.6")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("iter 5/10: loss 2.5000, lr 1.00e-03, 12,345 tokens/s, mfu 10.0%")
    assert "eta" in lines[0] and lines[1].endswith("eta 0 s")
    assert lines[2] == "step 10: train loss 2.5, val loss 2.6"


def test_other_ranks_print_nothing(capsys):
    terminal = Terminal()  # where a bar would be drawn
    progress = Progress(total=4, start=0, enabled=False, stream=terminal)
    progress.update()
    progress.log(1, 2.0, 1e-3, 1.0, 0.0)
    progress.write("hello")
    progress.close()
    assert capsys.readouterr().out == ""
    assert terminal.getvalue() == ""


def test_loss_curve_is_a_png():
    png = loss_curve_png(
        [
            {"step": 0, "train_loss": 4.1, "val_loss": 4.2},
            {"step": 10, "train_loss": 3.0, "val_loss": 3.1},
        ]
    )
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5_000
