"""`--nproc auto` and the deployments' default: one rank per visible GPU, else 1.

The GPU cases replace torch's CUDA answers (this machine may have no GPU); the CPU case is real.
"""

from __future__ import annotations

import pytest
import torch

from model.launch import resolve_nproc
from storage.errors import GptpipeError


def test_auto_without_a_gpu_is_one_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_nproc("auto") == 1
    assert resolve_nproc("auto", "cpu") == 1


def test_auto_is_one_rank_per_visible_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_nproc("auto") == 4
    assert resolve_nproc("auto", "cuda") == 4
    assert resolve_nproc("auto", "cpu") == 1  # training on the CPU: GPUs do not count


def test_on_this_machine_auto_follows_torch():
    expected = torch.cuda.device_count() if torch.cuda.is_available() else 1
    assert resolve_nproc("auto") == expected


@pytest.mark.parametrize(("given", "ranks"), [(2, 2), ("3", 3), (" 1", 1)])
def test_numbers_pass(given, ranks, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_nproc(given) == ranks


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("two", "--nproc must be a whole number or auto, got 'two'"),
        ("", "--nproc must be a whole number or auto"),
        (1.5, "--nproc must be a whole number or auto, got 1.5"),
        (True, "--nproc must be a whole number or auto"),
        ("0", "--nproc must be at least 1, got 0"),
        (-2, "--nproc must be at least 1, got -2"),
    ],
)
def test_bad_values_are_one_line_errors(given, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GptpipeError, match="^" + message.replace("(", r"\(")):
        resolve_nproc(given)
