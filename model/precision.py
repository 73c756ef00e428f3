"""The training precision: `dtype: auto` resolved for this machine and this model.

- CUDA: bf16 autocast where the GPU supports it, else float16 autocast with a GradScaler, else
  float32.
- CPU: bf16 autocast only where the CPU has native bf16 matmuls (AMX or AVX512-BF16) *and* a short
  probe of this config (a few forward/backward steps in each precision, before the timed loop)
  shows it faster; otherwise float32. On a CPU without native bf16 (AVX2 only) a bf16 matmul is
  about 50x slower than a float32 one, and even with AMX a tiny model is faster in float32 (the
  autocast casts cost more than its matmuls save). The probe's verdict is cached per machine and
  config shape (`model.machine.MachineCache`), so repeated runs skip it.

An explicit dtype is used as asked; bf16 on a CPU without native bf16 comes with a warning.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.config import GPTConfig, TrainConfig
from model.gpt import GPT
from model.machine import MachineCache, cpu_bf16_units, machine_key, peak_flops
from storage.errors import GptpipeError

# The probe may cost at most this, and at most PROBE_SHARE of the run's planned training time
PROBE_MAX_S = 1.0
PROBE_SHARE = 0.02
# rounds of one step in each precision: at least PROBE_ROUNDS, more while they take less than
# PROBE_AIM_S in all (millisecond steps are noisy), within the budget and PROBE_MAX_ROUNDS
PROBE_ROUNDS = 3
PROBE_AIM_S = 0.25
PROBE_MAX_ROUNDS = 25
# rows of the first probe step: about this many tokens (a larger model is probed on fewer rows)
PROBE_TOKENS = 512
# a forward/backward step takes about this many times its FLOPs at the float32 matmul peak
STEP_OVER_PEAK = 2.0
# bf16 must beat float32 by this much in the probe: closer than that is noise, and float32 is
# the precision that never surprises
PROBE_MARGIN = 0.05


@dataclass(frozen=True)
class Precision:
    """How the training's forward runs: `dtype` for the autocast (float32: none), and why."""

    dtype: str  # float32 | bfloat16 | float16
    reason: str
    warning: str | None = None

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(self.dtype)

    @property
    def needs_grad_scaler(self) -> bool:
        """float16's small range underflows gradients without loss scaling."""
        return self.dtype == "float16"

    def autocast(self, device_type: str):
        """The context a forward runs in: autocast to dtype, or nothing for float32."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        """`float32 (this CPU has no native bf16 matmul)`, for the training's start line."""
        name = self.dtype if self.dtype == "float32" else f"{self.dtype} autocast"
        return f"{name} ({self.reason})"


@dataclass(frozen=True)
class ProbeResult:
    """Median seconds of one forward/backward step in each precision, at probe_batch rows, over
    `rounds` rounds of one step each."""

    float32_s: float
    bfloat16_s: float
    probe_batch: int
    rounds: int = PROBE_ROUNDS


# ----------------------------------------------------------------------------- resolution


def resolve_precision(
    cfg: TrainConfig,
    model_config: GPTConfig,
    device: torch.device,
    *,
    planned_steps: int,
    probe: Callable[..., ProbeResult] | None = None,
    cache: MachineCache | None = None,
) -> Precision:
    """The precision a training of cfg on device runs at (see the module's docstring).

    planned_steps: the optimizer steps still to run (bounds the probe's cost); probe: measures
    the two precisions (`probe_speeds`; tests pass their own where the hardware is absent).
    Only the probe's verdict is cached, keyed on the machine, the config's shape and the rows
    it probed.
    """
    if device.type == "cuda":
        return _cuda_precision(cfg.dtype, device)
    if cfg.dtype == "float16":
        raise GptpipeError(
            "dtype=float16 is for CUDA GPUs (with a GradScaler); on the CPU use auto, float32 or "
            "bfloat16"
        )
    units = cpu_bf16_units()
    if cfg.dtype == "float32":
        return Precision("float32", "dtype=float32 was set")
    if cfg.dtype == "bfloat16":
        if units:
            return Precision("bfloat16", f"dtype=bfloat16 was set; this CPU has {units}")
        return Precision(
            "bfloat16",
            "dtype=bfloat16 was set",
            warning="dtype=bfloat16 on a CPU without native bf16 matmuls (no AMX or "
            "AVX512-BF16): training will be many times slower than float32; use --set "
            "dtype=auto",
        )
    if units is None:
        return Precision("float32", "this CPU has no native bf16 matmul (no AMX or AVX512-BF16)")
    cache = cache or MachineCache()
    plan = plan_probe(
        model_config,
        cfg.batch_size,
        planned_steps=planned_steps * cfg.grad_accum_steps,
        float32_peak=peak_flops(device, "float32", cache).flops,
    )
    if plan is None:
        return Precision(
            "float32",
            f"this CPU has {units}, but probing bf16's speed would cost more than "
            f"{PROBE_SHARE:.0%} of this run's training",
        )
    # v2: verdicts of fewer than PROBE_ROUNDS rounds, which v1 cached, are not read
    key = machine_key(
        device, "precision probe v2", _shape_key(cfg, model_config), f"rows {plan.rows}"
    )
    entry = cache.get(key)
    if entry is not None and entry.get("dtype") in ("float32", "bfloat16"):
        return Precision(entry["dtype"], f"{entry['reason']}; cached")
    result = (probe or probe_speeds)(model_config, plan, device)
    if result.rounds < PROBE_ROUNDS:
        # one millisecond step of each is noise (a float32 step measured at twice its time
        # picked bf16 for a model it slowed by a quarter): no verdict, and none cached
        return Precision(
            "float32",
            f"this CPU has {units}, but only {result.rounds} of the probe's {PROBE_ROUNDS} "
            f"rounds fit in {PROBE_SHARE:.0%} of this run's training: too few to tell",
        )
    faster = result.bfloat16_s < result.float32_s * (1 - PROBE_MARGIN)
    dtype = "bfloat16" if faster else "float32"
    times = f"{result.bfloat16_s * 1e3:.1f} vs {result.float32_s * 1e3:.1f} ms a step"
    if faster:
        ratio = result.float32_s / result.bfloat16_s
        reason = f"{units}, and bf16 was {ratio:.2f}x faster than float32 in a probe ({times})"
    else:
        reason = f"{units}, but bf16 was not faster than float32 in a probe ({times})"
    cache.put(key, {"dtype": dtype, "reason": reason})
    return Precision(dtype, reason)


def _cuda_precision(dtype: str, device: torch.device) -> Precision:
    name = torch.cuda.get_device_name(device)
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if dtype in ("float32", "float16"):
        return Precision(dtype, f"dtype={dtype} was set")
    if dtype == "bfloat16":
        warning = None if bf16 else f"dtype=bfloat16 on {name}, which has no native bf16"
        return Precision("bfloat16", "dtype=bfloat16 was set", warning=warning)
    if bf16:
        return Precision("bfloat16", f"{name} supports bf16")
    if torch.cuda.get_device_capability(device) >= (5, 3):
        return Precision("float16", f"{name} has no bf16; float16 with a GradScaler")
    return Precision("float32", f"{name} has neither bf16 nor fast float16")


def _shape_key(cfg: TrainConfig, model_config: GPTConfig) -> str:
    """What the probe's verdict depends on: the model's shape and the batch (not the values)."""
    c = model_config
    return (
        f"vocab {c.vocab_size} block {c.block_size} embd {c.n_embd} heads {c.n_head} layers "
        f"{c.n_layer} bias {c.bias} dropout {c.dropout > 0} batch {cfg.batch_size} "
        f"compile {cfg.compile}"
    )


# ----------------------------------------------------------------------------- the probe


@dataclass(frozen=True)
class ProbePlan:
    """The probe's steps run on `rows` sequences of block_size and stop once budget_s passed."""

    rows: int
    budget_s: float


def plan_probe(
    model_config: GPTConfig, batch_size: int, *, planned_steps: int, float32_peak: float
) -> ProbePlan | None:
    """The probe's rows and time budget, or None where a probe would not pay.

    The budget is min(PROBE_MAX_S, PROBE_SHARE of the planned training time); the rows,
    min(batch_size, PROBE_TOKENS // block_size), fewer where a warm-up and one round in each
    precision (each costing at most a float32 step) would not fit it. Step times are estimated
    from the model's FLOPs at the machine's float32 matmul peak, before anything runs. The
    per-token cost is what differs between the precisions, so fewer rows still tell them apart.
    None when even one row does not fit: the run is too short for a probe to pay.
    """
    c = model_config
    # the matrices' parameters (attention 4 C^2 + feed-forward 8 C^2 a block, embedding and
    # lm_head V C each): close enough for a budget, and free (building even a meta-device
    # model costs a second on first use)
    n = 12 * c.n_layer * c.n_embd**2 + 2 * c.vocab_size * c.n_embd
    row_flops = (6 * n + 12 * c.n_layer * c.n_embd * c.block_size) * c.block_size
    row_s = STEP_OVER_PEAK * row_flops / float32_peak  # one row's forward/backward
    budget = min(PROBE_MAX_S, PROBE_SHARE * planned_steps * batch_size * row_s)
    rows = min(batch_size, max(1, PROBE_TOKENS // model_config.block_size))
    rows = min(rows, int(budget / (4 * row_s)))
    return ProbePlan(rows, budget) if rows >= 1 else None


def probe_speeds(model_config: GPTConfig, plan: ProbePlan, device: torch.device) -> ProbeResult:
    """Median seconds of forward/backward steps of this model on plan.rows random rows, in
    float32 and under bf16 autocast, alternating, after a warm-up of each (see PROBE_ROUNDS);
    never past plan.budget_s after the first round. Leaves the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT(model_config).to(device).train()
        shape = (plan.rows, model_config.block_size)
        idx = torch.randint(model_config.vocab_size, shape, device=device)

        def step(dtype: str) -> float:
            start = time.perf_counter()
            with Precision(dtype, "probe").autocast(device.type):
                _, loss = model(idx, idx)
            loss.backward()
            model.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        start = time.perf_counter()
        times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
        for dtype in times:
            step(dtype)  # warm-up: kernel selection, first-touch of buffers
        for done in range(1, PROBE_MAX_ROUNDS + 1):
            for dtype, seconds in times.items():
                seconds.append(step(dtype))
            elapsed = time.perf_counter() - start
            if elapsed > plan.budget_s or (done >= PROBE_ROUNDS and elapsed > PROBE_AIM_S):
                break
    return ProbeResult(
        statistics.median(times["float32"]),
        statistics.median(times["bfloat16"]),
        plan.rows,
        rounds=done,
    )
