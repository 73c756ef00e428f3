"""`dtype: auto` resolves to the fastest precision this machine runs the model at.

The capability checks and the probe are replaced only where a test needs hardware this machine
may lack (no native bf16, a faster or slower probe, a CUDA GPU); where it has the hardware, the
real probe runs.
"""

from __future__ import annotations

import pytest
import torch

import model.precision as precision
from model.config import build_config
from model.launch import Listeners
from model.machine import MachineCache, Peak, cpu_bf16_units
from model.precision import ProbeResult, plan_probe, probe_speeds, resolve_precision
from storage.errors import GptpipeError
from tests.conftest import launch_on

CPU = torch.device("cpu")
TINY = ["block_size=8", "n_embd=64", "n_head=4", "n_layer=4", "batch_size=32"]


class FakeProbe:
    """A probe that reports given step times and counts its calls."""

    def __init__(self, float32_s: float, bfloat16_s: float):
        self.times, self.calls = (float32_s, bfloat16_s), 0

    def __call__(self, model_config, plan, device):
        self.calls += 1
        return ProbeResult(*self.times, plan.rows)


def never_probe(*args):
    raise AssertionError("the probe ran where it must not")


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> MachineCache:
    """A cache of the test's own, with the matmul peak already 'measured' (200 GFLOP/s)."""
    cache = MachineCache(tmp_path / "machine.json")
    monkeypatch.setattr(precision, "peak_flops", lambda *a: Peak(200e9, "test"))
    return cache


def resolve(cfg, cache, probe=never_probe, planned_steps=None):
    return resolve_precision(
        cfg,
        cfg.model_config(65),
        CPU,
        planned_steps=cfg.max_iters if planned_steps is None else planned_steps,
        probe=probe,
        cache=cache,
    )


@pytest.fixture()
def native_bf16(monkeypatch) -> str:
    units = cpu_bf16_units() or "AMX"  # this CPU's, or AMX where it has none
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: units)
    return units


@pytest.fixture()
def no_native_bf16(monkeypatch) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: None)


def test_every_preset_asks_for_auto():
    for preset in ("cpu", "lecture", "seed"):
        assert build_config(preset).dtype == "auto", preset


def test_a_cpu_without_native_bf16_trains_in_float32_without_a_probe(no_native_bf16, cache):
    chosen = resolve(build_config("cpu"), cache)
    assert chosen.dtype == "float32" and chosen.autocast_dtype is None
    assert chosen.reason == "this CPU has no native bf16 matmul (no AMX or AVX512-BF16)"
    assert chosen.describe().startswith("float32 (this CPU has no native bf16")
    assert chosen.warning is None


def test_native_bf16_and_a_faster_probe_pick_bf16_and_cache_the_verdict(native_bf16, cache):
    probe = FakeProbe(float32_s=0.030, bfloat16_s=0.015)
    chosen = resolve(build_config("cpu"), cache, probe)
    assert chosen.dtype == "bfloat16" and chosen.autocast_dtype is torch.bfloat16
    assert chosen.reason == (
        f"{native_bf16}, and bf16 was 2.00x faster than float32 in a probe (15.0 vs 30.0 ms a step)"
    )
    assert not chosen.needs_grad_scaler
    again = resolve(build_config("cpu"), cache, probe)
    assert probe.calls == 1, "a repeated run must re-use the cached verdict"
    assert again.dtype == "bfloat16" and again.reason.endswith("; cached")
    # another shape is another verdict
    resolve(build_config("cpu", None, ["n_embd=64"]), cache, probe)
    assert probe.calls == 2


@pytest.mark.parametrize("bfloat16_s", [0.012, 0.0098], ids=["slower", "within-noise"])
def test_native_bf16_that_is_not_faster_keeps_float32(native_bf16, cache, bfloat16_s):
    chosen = resolve(build_config("cpu", None, TINY), cache, FakeProbe(0.010, bfloat16_s))
    assert chosen.dtype == "float32"
    assert "bf16 was not faster than float32 in a probe" in chosen.reason


def test_a_run_too_short_to_pay_for_a_probe_stays_float32_and_caches_nothing(native_bf16, cache):
    chosen = resolve(build_config("seed", None, ["max_iters=4"]), cache)
    assert chosen.dtype == "float32"
    assert "probing bf16's speed would cost more than 2% of this run's training" in chosen.reason
    assert not cache.path.exists()


def test_a_probe_of_too_few_rounds_decides_nothing_and_caches_nothing(native_bf16, cache):
    """One round of each precision once measured float32 at twice its time (14.9 vs 7.6 ms) and
    picked bf16 for a tiny model it slowed by a quarter; the verdict was cached for good."""

    def one_round(model_config, plan, device):
        return ProbeResult(0.0149, 0.0106, plan.rows, rounds=1)

    chosen = resolve(build_config("cpu", None, TINY), cache, one_round)
    assert chosen.dtype == "float32"
    assert "only 1 of the probe's 3 rounds fit in 2% of this run's training" in chosen.reason
    assert not cache.path.exists()
    # the same times over enough rounds are a verdict, and it is cached
    rounds = FakeProbe(0.0149, 0.0106)
    assert resolve(build_config("cpu", None, TINY), cache, rounds).dtype == "bfloat16"
    assert cache.path.exists()


def test_the_real_probe_counts_its_rounds_within_the_budget():
    seed = build_config("seed").model_config(65)
    tight = precision.ProbePlan(rows=32, budget_s=1e-4)  # less than one step: one round
    assert probe_speeds(seed, tight, CPU).rounds == 1
    enough = precision.ProbePlan(rows=32, budget_s=1.0)
    assert probe_speeds(seed, enough, CPU).rounds >= precision.PROBE_ROUNDS


def test_the_probe_plan_fits_its_budget():
    peak = 200e9
    cpu = build_config("cpu").model_config(65)
    plan = plan_probe(cpu, 12, planned_steps=2000, float32_peak=peak)
    assert plan.rows == 8 and plan.budget_s == precision.PROBE_MAX_S  # 512 tokens of 64
    # a shorter run gets a smaller budget, at most 2% of its estimated training time
    short = plan_probe(cpu, 12, planned_steps=100, float32_peak=peak)
    assert short.budget_s < plan.budget_s and short.rows < plan.rows
    row_s = short.budget_s / (precision.PROBE_SHARE * 100 * 12)  # the plan's own estimate
    assert 4 * short.rows * row_s <= short.budget_s * (1 + 1e-9)
    # the lecture's model is probed on one row of 256; a ten times slower machine cannot
    lecture = build_config("lecture").model_config(65)
    assert plan_probe(lecture, 64, planned_steps=5000, float32_peak=peak).rows == 1
    assert plan_probe(lecture, 64, planned_steps=5000, float32_peak=peak / 10) is None


@pytest.mark.skipif(cpu_bf16_units() is None, reason="this CPU has no native bf16 matmuls")
def test_the_real_probe_times_both_precisions(cache):
    cfg = build_config("cpu")
    plan = plan_probe(cfg.model_config(65), 12, planned_steps=2000, float32_peak=200e9)
    state = torch.get_rng_state()
    result = probe_speeds(cfg.model_config(65), plan, CPU)
    assert result.probe_batch == plan.rows and result.float32_s > 0 and result.bfloat16_s > 0
    assert torch.equal(torch.get_rng_state(), state), "the probe must not move the global RNG"
    chosen = resolve(cfg, cache, probe=probe_speeds)
    assert chosen.dtype in ("float32", "bfloat16") and "in a probe" in chosen.reason


def test_forced_bf16_on_a_cpu_without_it_runs_with_a_warning(no_native_bf16, cache):
    chosen = resolve(build_config("cpu", None, ["dtype=bfloat16"]), cache)
    assert chosen.dtype == "bfloat16"
    assert chosen.warning.startswith("dtype=bfloat16 on a CPU without native bf16 matmuls")
    assert "many times slower than float32" in chosen.warning


def test_forced_precisions_are_kept(native_bf16, cache):
    assert resolve(build_config("cpu", None, ["dtype=bfloat16"]), cache).warning is None
    kept = resolve(build_config("cpu", None, ["dtype=float32"]), cache)
    assert kept.dtype == "float32" and kept.reason == "dtype=float32 was set"
    with pytest.raises(GptpipeError, match="dtype=float16 is for CUDA GPUs"):
        resolve(build_config("cpu", None, ["dtype=float16"]), cache)


@pytest.fixture()
def fake_gpu(monkeypatch):
    """A CUDA GPU's answers, for machines without one: (bf16 supported, capability)."""

    def install(bf16: bool, capability: tuple[int, int]):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **k: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)

    return install


@pytest.mark.parametrize(
    "bf16, capability, dtype, scaler",
    [
        (True, (9, 0), "bfloat16", False),
        (False, (7, 5), "float16", True),
        (False, (5, 0), "float32", False),
    ],
    ids=["bf16-gpu", "fp16-gpu", "old-gpu"],
)
def test_cuda_picks_bf16_then_float16_with_a_scaler_then_float32(
    fake_gpu, cache, bf16, capability, dtype, scaler
):
    fake_gpu(bf16, capability)
    cfg = build_config("lecture")
    chosen = resolve_precision(
        cfg, cfg.model_config(65), torch.device("cuda", 0), planned_steps=5000, probe=never_probe
    )
    assert chosen.dtype == dtype and chosen.needs_grad_scaler is scaler
    assert "Test GPU" in chosen.reason


# ----------------------------------------------------------------------------- in the training


SHORT = {
    "block_size": 8,
    "n_embd": 32,
    "n_head": 4,
    "n_layer": 2,
    "batch_size": 4,
    "max_iters": 3,
    "eval_interval": 100,
    "eval_iters": 1,
    "log_interval": 1,
    "checkpoint_interval": 0,
    "device": "cpu",
}


def test_a_forced_slow_precision_warns_in_the_training_log(
    char_dataset, tmp_path, no_native_bf16, capsys
):
    from bench.common import prepared
    from model import dist
    from model.config import config_from_dict
    from model.train import train

    cfg = config_from_dict({**SHORT, "dtype": "bfloat16"})
    info = dist.DistInfo(rank=0, local_rank=0, world_size=1, device=CPU)
    summary = train(cfg, str(tmp_path / "out"), inputs=prepared(char_dataset), info=info)
    out = capsys.readouterr().out
    assert "bfloat16 autocast (dtype=bfloat16 was set)" in out
    assert "warning: dtype=bfloat16 on a CPU without native bf16 matmuls" in out
    assert summary["dtype_resolved"] == "bfloat16"


def test_the_resolved_precision_and_the_mfu_peak_reach_mlflow(char_dataset, tmp_path):
    """A real training process logging into a real (sqlite) MLflow run, as the train task does."""
    from mlflow import MlflowClient

    from storage.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = Tracker(uri, "precision").start_run("train")
    lines: list[str] = []
    summary = launch_on(
        char_dataset,
        tmp_path / "out",
        SHORT,
        listeners=Listeners(on_line=lines.append, mlflow_run=(uri, run_id)),
    )
    params = MlflowClient(uri).get_run(run_id).data.params
    # 3 steps never pay for a probe: float32 on every CPU, with the reason why
    assert summary["dtype_resolved"] == params["dtype_resolved"] == "float32"
    assert params["dtype_reason"] == summary["dtype_reason"] != ""
    assert any(f"float32 ({summary['dtype_reason']})" in line for line in lines)
    # a peak this training beat (measured while the machine was busy) is corrected at its end
    final_peak = params.get("mfu_peak_corrected_flops", params["mfu_peak_flops"])
    assert float(final_peak) == pytest.approx(summary["mfu_peak_flops"])
    assert summary["mfu_peak_flops"] > 1e9  # a measured matmul peak, not a constant
    assert params["mfu_peak_source"].startswith("1 x measured: float32 matmul on ")
    assert params["threads_per_rank"] == str(summary["threads_per_rank"])
    # mfu is against that peak: tokens/s x FLOPs per token / peak
    assert 0 < summary["mfu"] < 1


def test_a_training_faster_than_its_cached_peak_corrects_the_peak(
    char_dataset, tmp_path, monkeypatch, capsys
):
    """The cached float32 peak was 'measured on a busy machine' (1 MFLOP/s): the training's MFU
    would read thousands of percent. It ends against a peak measured again, cached for later."""
    from bench.common import prepared
    from model import dist
    from model.config import config_from_dict
    from model.machine import peak_key, threads_per_rank
    from model.train import train

    monkeypatch.setenv("GPTPIPE_CACHE_DIR", str(tmp_path / "cache"))
    torch.set_num_threads(threads_per_rank(1))  # the key holds the thread count train() sets
    cache = MachineCache()
    cache.put(peak_key(CPU, "float32"), {"flops": 1e6, "measured": "2026-01-01"})
    info = dist.DistInfo(rank=0, local_rank=0, world_size=1, device=CPU)
    summary = train(
        config_from_dict(SHORT), str(tmp_path / "out"), inputs=prepared(char_dataset), info=info
    )
    assert (
        "MFU read over 100% against the cached float32 peak (0.0 GFLOP/s" in capsys.readouterr().out
    )
    assert summary["mfu_peak_flops"] > 1e9 and "2026-01-01" not in summary["mfu_peak_source"]
    assert 0 < summary["mfu"] <= 1
    assert cache.get(peak_key(CPU, "float32"))["flops"] == summary["mfu_peak_flops"]
