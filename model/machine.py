"""What this machine can do, for choices that must not depend on the machine a default was tuned
on: the cores this process may use, whether the CPU has native bf16 matmuls, the matmul peak of a
precision (for MFU), and a small per-user cache of what was measured.

Machines of the same size come on different CPUs: Xeons with AMX (bf16 matmuls several times
faster than float32), AMD EPYCs with AVX512-BF16, others with AVX2 only (bf16 about 50x slower
than float32). Nothing here assumes one of them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from storage.errors import GptpipeError
from storage.local import atomic_write, cache_dir

# ----------------------------------------------------------------------------- cores


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup"):
    """The CPU quota of this process's cgroup in cores (e.g. 1.5), or None where none is set.

    cgroup v2: `cpu.max` ("max 100000" or "150000 100000"); v1: `cpu/cpu.cfs_quota_us` (-1 for
    none) over `cpu.cfs_period_us`. A container started with `--cpus=1` sees its quota here while
    `os.sched_getaffinity` still lists every core of the host.
    """
    v2, v1 = "", ""
    try:
        for line in Path(proc_cgroup).read_text().splitlines():
            hierarchy, controllers, path = line.split(":", 2)
            if hierarchy == "0" and not controllers:
                v2 = path
            elif "cpu" in controllers.split(","):
                v1 = path
    except (OSError, ValueError):
        pass
    candidates = [Path(root, v2.lstrip("/"), "cpu.max"), Path(root, "cpu.max")]
    for cpu_max in candidates:
        try:
            quota, period = cpu_max.read_text().split()[:2]
        except (OSError, ValueError):
            continue
        return None if quota == "max" else int(quota) / int(period)
    for folder in (Path(root, "cpu", v1.lstrip("/")), Path(root, "cpu")):
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota <= 0 else quota / period
    return None


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by its cgroup's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def threads_per_rank(local_ranks: int, cores: int | None = None, requested: int = 0) -> int:
    """Intra-op threads for one of local_ranks ranks on this machine: the usable cores split
    evenly, so ranks x threads never exceed the cores (one thread each when there are more ranks
    than cores). requested > 0 (the `threads` setting) wins."""
    if requested > 0:
        return requested
    cores = usable_cores() if cores is None else cores
    return max(1, cores // max(1, local_ranks))


# ----------------------------------------------------------------------------- the CPU


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo (and lscpu) gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _torch_check(name: str) -> bool:
    check = getattr(torch.cpu, name, None)  # torch's own CPU feature checks (private, stable)
    return check is not None and bool(check())


def cpu_bf16_units() -> str | None:
    """The CPU's native bf16 matmul units ("AMX" or "AVX512-BF16"), or None where it has none."""
    if _torch_check("_is_amx_tile_supported"):
        return "AMX"
    if _torch_check("_is_avx512_bf16_supported"):
        return "AVX512-BF16"
    return None


def cpu_description() -> str:
    """The CPU model and the instruction set torch uses on it, e.g. `AMD EPYC (AVX512, ...)`."""
    isa = torch.backends.cpu.get_cpu_capability()
    units = cpu_bf16_units()
    return f"{cpu_name()} ({isa}, {units or 'no native bf16'})"


# ----------------------------------------------------------------------------- the cache


class MachineCache:
    """A JSON file of measured facts (peaks, precision verdicts), one entry per string key.

    Keys name everything the fact depends on (CPU model, threads, torch version, config shape),
    so a copied home folder or another torch never gets a stale answer. A cache that cannot be
    read or written is ignored: the fact is measured again next time.
    """

    def __init__(self, path: Path | None = None):
        self.path = path or cache_dir() / "machine.json"

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> dict[str, Any] | None:
        entry = self._load().get(key)
        return entry if isinstance(entry, dict) else None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        data = {**self._load(), key: entry}
        text = json.dumps(data, indent=1, sort_keys=True)
        with contextlib.suppress(GptpipeError), atomic_write(self.path) as f:
            f.write(text.encode("utf-8"))  # readers see the old file or the new one


def machine_key(device: torch.device, *parts: object) -> str:
    """A cache key: the device's model, torch's version, this process's threads, then parts."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{cpu_description()} x{torch.get_num_threads()} threads"
    return " | ".join(str(p) for p in (where, f"torch {torch.__version__}", *parts))


# ----------------------------------------------------------------------------- peaks for MFU

# Dense matmul peaks of known GPUs (vendors' figures, no sparsity); float32 is TF32, which the
# training loop allows on CUDA.
GPU_PEAKS = {
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "L40S": {"bfloat16": 362e12, "float16": 362e12, "float32": 183e12},
    "A10G": {"bfloat16": 70e12, "float16": 70e12, "float32": 35e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12},
}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Peak:
    """A device's dense matmul throughput in one precision, and where the figure came from."""

    flops: float
    source: str


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, max_n: int = 1024) -> float:
    """Best FLOP/s of square matmuls on this device and thread count; n grows from 512 until a
    call takes a few ms (so a slow precision is measured small), at most max_n. Never below 512:
    a smaller matmul measures call overhead, and a busy machine would cache a tiny peak."""
    n, best = 512, 0.0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        while True:
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            a @ b  # warm: kernel selection, first-touch of the output
            sync()
            times = []
            for _ in range(5):
                start = time.perf_counter()
                a @ b
                sync()
                times.append(time.perf_counter() - start)
            best = max(best, 2 * n**3 / min(times))
            if min(times) > 4e-3 or n >= max_n:
                return best
            n *= 2


def peak_flops(device: torch.device, dtype: str, cache: MachineCache | None = None) -> Peak:
    """The peak that MFU is measured against, for the precision the training actually uses."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for model, peaks in GPU_PEAKS.items():
            if model in name:
                return Peak(peaks[dtype], f"table: {name}, dense {dtype}")
    cache = cache or MachineCache()
    entry = cache.get(peak_key(device, dtype))
    return _measured_peak(device, dtype, entry) if entry else _measure_peak(device, dtype, cache)


def corrected_peak(
    device: torch.device,
    dtype: str,
    peak: Peak,
    *,
    reached_flops: float,
    cache: MachineCache | None = None,
) -> Peak:
    """The peak again where a training ran faster than it (MFU over 100%): a measured peak is
    too low when the machine was busy while it was measured, and every later run would read
    MFU against it. Measures again and caches the larger of that and what the training reached.
    A table's peak, or one the training did not beat, is returned as it is."""
    if reached_flops <= peak.flops or peak.source.startswith("table"):
        return peak
    return _measure_peak(device, dtype, cache or MachineCache(), at_least=reached_flops)


def peak_key(device: torch.device, dtype: str) -> str:
    """The cache key of the matmul peak in one precision, at this process's thread count."""
    return machine_key(device, "matmul peak", dtype)


def _measure_peak(
    device: torch.device, dtype: str, cache: MachineCache, *, at_least: float = 0.0
) -> Peak:
    max_n = 8192 if device.type == "cuda" else 1024
    flops = max(measure_matmul_flops(device, TORCH_DTYPES[dtype], max_n), at_least)
    entry = {"flops": flops, "measured": time.strftime("%Y-%m-%d")}
    cache.put(peak_key(device, dtype), entry)
    return _measured_peak(device, dtype, entry)


def _measured_peak(device: torch.device, dtype: str, entry: dict[str, Any]) -> Peak:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{torch.get_num_threads()} thread(s) of {cpu_description()}"
    return Peak(
        float(entry["flops"]), f"measured: {dtype} matmul on {where}, {entry.get('measured')}"
    )
