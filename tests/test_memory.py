"""The training process keeps freed memory for its next step instead of faulting it in again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from model.memory import keep_freed_memory

# A "training step" that allocates and frees large tensors, as a real one does; the page faults
# of each of 12 steps
PROBE = """
import json, resource, sys, torch
from model.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():
    x = torch.ones(1 << 24)  # 64 MiB of float32
    z = torch.cat([x * 2, x])  # 128 MiB
    return float(z[-1])
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps([faults() for _ in range(12)]))
"""


def _faults(mode: str) -> list[int]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def test_freed_blocks_are_reused_without_page_faults():
    if not keep_freed_memory():
        pytest.skip("not glibc: mallopt is not available here")
    default, keep = _faults("default"), _faults("keep")
    # glibc maps and unmaps these blocks: every step faults its pages in again
    assert min(default[1:]) > (64 + 64 << 20) // 4096
    # kept in the heap: once it has settled, most steps touch only resident pages
    assert sum(keep[4:]) < sum(default[4:]) / 4
    assert sorted(keep[4:])[4] == 0  # the median step: no fault at all
