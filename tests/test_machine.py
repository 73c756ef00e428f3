"""The machine's facts that defaults depend on: usable cores, the thread split, measured peaks."""

from __future__ import annotations

import pytest
import torch

import model.machine as machine
from model.machine import (
    MachineCache,
    cgroup_cpu_limit,
    corrected_peak,
    peak_flops,
    peak_key,
    threads_per_rank,
    usable_cores,
)


@pytest.mark.parametrize(
    "cores, ranks, threads",
    [(2, 1, 2), (2, 2, 1), (2, 3, 1), (16, 2, 8), (16, 3, 5), (1, 1, 1)],
)
def test_ranks_split_the_cores_and_never_oversubscribe_them(cores, ranks, threads):
    assert threads_per_rank(ranks, cores=cores) == threads
    assert ranks * threads <= max(cores, ranks)


def test_an_explicit_thread_count_wins():
    assert threads_per_rank(2, cores=16, requested=3) == 3


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    "files, limit",
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
        ({}, None),
    ],
    ids=["v2-none", "v2-1.5", "v1-none", "v1-0.5", "absent"],
)
def test_the_cgroup_cpu_quota_is_read_for_v1_and_v2(tmp_path, files, limit):
    for name, text in files.items():
        write(tmp_path / "fs" / name, text)
    write(tmp_path / "self-cgroup", "1:cpu,cpuacct:/\n0::/\n")
    assert cgroup_cpu_limit(str(tmp_path / "fs"), str(tmp_path / "self-cgroup")) == limit


def test_a_nested_v2_cgroup_is_found_by_its_path(tmp_path):
    write(tmp_path / "fs" / "job" / "cpu.max", "200000 100000\n")
    write(tmp_path / "self-cgroup", "0::/job\n")
    assert cgroup_cpu_limit(str(tmp_path / "fs"), str(tmp_path / "self-cgroup")) == 2.0


def test_usable_cores_are_the_affinity_capped_by_the_quota(monkeypatch):
    affinity = len(machine.os.sched_getaffinity(0))
    monkeypatch.setattr(machine, "cgroup_cpu_limit", lambda: None)
    assert usable_cores() == affinity
    monkeypatch.setattr(machine, "cgroup_cpu_limit", lambda: 0.5)  # half a core: one thread
    assert usable_cores() == 1
    monkeypatch.setattr(machine, "cgroup_cpu_limit", lambda: affinity + 8.0)
    assert usable_cores() == affinity


def test_the_cpu_peak_is_measured_once_per_precision_and_cached(tmp_path, monkeypatch):
    cache = MachineCache(tmp_path / "machine.json")
    calls = []
    real = machine.measure_matmul_flops
    monkeypatch.setattr(machine, "measure_matmul_flops", lambda *a: calls.append(a[1]) or real(*a))
    first = peak_flops(torch.device("cpu"), "float32", cache)
    again = peak_flops(torch.device("cpu"), "float32", cache)
    assert calls == [torch.float32] and again == first
    assert first.flops > 1e9 and first.source.startswith("measured: float32 matmul on ")
    assert machine.cpu_name() in first.source
    peak_flops(torch.device("cpu"), "bfloat16", cache)
    assert calls == [torch.float32, torch.bfloat16]


def test_a_peak_a_training_beat_is_measured_again_and_the_larger_cached(tmp_path, monkeypatch):
    """A peak measured while the machine was busy (here: an absurd 1 MFLOP/s in the cache)."""
    cpu = torch.device("cpu")
    cache = MachineCache(tmp_path / "machine.json")
    cache.put(peak_key(cpu, "float32"), {"flops": 1e6, "measured": "2026-01-01"})
    low = peak_flops(cpu, "float32", cache)
    assert low.flops == 1e6
    fixed = corrected_peak(cpu, "float32", low, reached_flops=2e6, cache=cache)
    assert fixed.flops > 1e9 and fixed.source.startswith("measured: float32 matmul on ")
    assert "2026-01-01" not in fixed.source
    assert peak_flops(cpu, "float32", cache) == fixed  # later runs read the new one
    # a training cannot beat the matmul peak: what it reached is kept where a busy machine
    # measures less again
    monkeypatch.setattr(machine, "measure_matmul_flops", lambda *a: 3e6)
    assert corrected_peak(cpu, "float32", low, reached_flops=5e6, cache=cache).flops == 5e6


def test_a_peak_not_beaten_or_from_the_table_is_kept(tmp_path, monkeypatch):
    def never(*args):
        raise AssertionError("measured again")

    monkeypatch.setattr(machine, "measure_matmul_flops", never)
    cache = MachineCache(tmp_path / "machine.json")
    measured = machine.Peak(100e9, "measured: float32 matmul on ...")
    cpu = torch.device("cpu")
    assert corrected_peak(cpu, "float32", measured, reached_flops=60e9, cache=cache) is measured
    table = machine.Peak(989e12, "table: NVIDIA H100 80GB HBM3, dense bfloat16")
    gpu = torch.device("cuda", 0)
    assert corrected_peak(gpu, "bfloat16", table, reached_flops=1e15, cache=cache) is table
    assert not cache.path.exists()


def test_a_known_gpu_takes_its_peak_from_the_table(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    peak = peak_flops(torch.device("cuda", 0), "bfloat16")
    assert peak.flops == 989e12 and peak.source == "table: NVIDIA H100 80GB HBM3, dense bfloat16"
    assert peak_flops(torch.device("cuda", 0), "float32").flops == 494e12  # TF32


def test_an_unreadable_cache_is_measured_again(tmp_path):
    cache = MachineCache(tmp_path / "machine.json")
    cache.path.write_text("{not json")
    assert cache.get("k") is None
    cache.put("k", {"v": 1})
    assert cache.get("k") == {"v": 1}
