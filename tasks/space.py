"""A sweep's search space: the space file (`gptpipe sweep --space sweep.yaml`), checked whole
before any work, and how a trial's values are drawn from it through Optuna.

The file (every part but ``params`` optional)::

    sampler: grid          # grid (every key a list), random or tpe; default: grid if it can be
    trials: 4              # default: the grid's size; random and tpe: 10
    seed: 1337             # the sampler's seed
    budget:                # the same for every trial, so that trials compare fairly
      max_iters: 300       # or tokens: 2000000 (max_iters = tokens / tokens per step)
    pruner:                # median (the default) or none
      median: {startup_trials: 2, warmup_steps: 1}
    params:                # keys are --set names; their values are checked like --set
      learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}   # a range
      n_layer: [2, 4]                                          # a list: the grid's values
      n_embd: {choice: [32, 64]}                               # a choice

Grid trials run in the order the file lists them (the first key varies slowest).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from model.config import TrainConfig, coerce_setting, setting_kind
from storage.errors import GptpipeError

SAMPLERS = ("grid", "random", "tpe")
DEFAULT_TRIALS = 10
_TOP_KEYS = ("sampler", "trials", "seed", "budget", "pruner", "params")
# what the budget fixes: a trial may not search over it, or trials would not compare fairly
_BUDGET_KEYS = ("max_iters",)
# what the data depends on: tokenized and split once for every trial
_DATA_KEYS = ("tokenizer", "vocab_size", "val_fraction")


@dataclass(frozen=True)
class Param:
    """One searched key: a grid's or a choice's values, or a numeric range."""

    name: str
    values: tuple[Any, ...] | None = None  # a list (grid) or a choice
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    @property
    def is_range(self) -> bool:
        return self.values is None

    def suggest(self, trial) -> Any:
        """This key's value for an Optuna trial (an enqueued grid trial gets its fixed value)."""
        if not self.is_range:
            return trial.suggest_categorical(self.name, list(self.values))
        if setting_kind(self.name) == "int":
            step = int(self.step or 1)
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=step, log=self.log
            )
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def to_dict(self) -> dict[str, Any]:
        if not self.is_range:
            return {"values": list(self.values)}
        return {"low": self.low, "high": self.high, "log": self.log, "step": self.step}


@dataclass(frozen=True)
class Pruner:
    """The median pruner's settings (Optuna's MedianPruner), or no pruning.

    A trial is stopped at an evaluation when its val loss there is worse than the median of the
    earlier trials' at the same step, once ``startup_trials`` trials have finished and after
    ``warmup_steps`` training steps (step 0, the untrained model, never prunes by default).
    """

    kind: str = "median"
    startup_trials: int = 2
    warmup_steps: int = 1

    def make(self):
        import optuna

        if self.kind == "none":
            return optuna.pruners.NopPruner()
        return optuna.pruners.MedianPruner(
            n_startup_trials=self.startup_trials, n_warmup_steps=self.warmup_steps
        )


@dataclass(frozen=True)
class SweepSpace:
    params: tuple[Param, ...]
    sampler: str
    trials: int
    seed: int = 1337
    budget: Mapping[str, int] | None = None  # {"max_iters": N} or {"tokens": N}
    pruner: Pruner = Pruner()

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the lists, in the file's order (the first key slowest)."""
        names = [p.name for p in self.params]
        combos = itertools.product(*(p.values for p in self.params))
        return [dict(zip(names, combo, strict=True)) for combo in combos]

    def make_sampler(self):
        import optuna

        if self.sampler == "grid":
            grid = {p.name: list(p.values) for p in self.params}
            return optuna.samplers.GridSampler(grid, seed=self.seed)
        if self.sampler == "random":
            return optuna.samplers.RandomSampler(seed=self.seed)
        return optuna.samplers.TPESampler(seed=self.seed)

    def suggest(self, trial) -> dict[str, Any]:
        return {p.name: p.suggest(trial) for p in self.params}

    def trial_config(self, base: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
        """The config a trial trains: the base with the trial's values and the budget applied.

        A combination that does not fit together (n_embd not divisible by n_head, say) raises
        the config's own GptpipeError: that trial fails, the sweep goes on.
        """
        values = {**base, **params}
        if self.budget and "max_iters" in self.budget:
            values["max_iters"] = self.budget["max_iters"]
        elif self.budget and "tokens" in self.budget:
            per_step = values["batch_size"] * values["block_size"] * values["grad_accum_steps"]
            values["max_iters"] = max(1, math.ceil(self.budget["tokens"] / per_step))
        return TrainConfig(**values).to_dict()

    def to_dict(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler,
            "trials": self.trials,
            "seed": self.seed,
            "budget": dict(self.budget) if self.budget else None,
            "pruner": {
                "kind": self.pruner.kind,
                "startup_trials": self.pruner.startup_trials,
                "warmup_steps": self.pruner.warmup_steps,
            },
            "params": {p.name: p.to_dict() for p in self.params},
        }


def parse_space(
    data: Mapping[str, Any], *, trials: int | None = None, origin: str = "--space"
) -> SweepSpace:
    """The space file's mapping, checked whole: the first problem is a one-line error naming the
    key and what it accepts. ``trials`` (--trials) overrides the file's."""

    def fail(message: str):
        raise GptpipeError(f"{origin}: {message}")

    unknown = sorted(set(map(str, data)) - set(_TOP_KEYS))
    if unknown:
        fail(f"unknown section {unknown[0]!r}; the sections are {', '.join(_TOP_KEYS)}")
    raw_params = data.get("params")
    if not isinstance(raw_params, dict) or not raw_params:
        fail("params: must map at least one --set key to a list, a range or a choice")
    params = tuple(_parse_param(str(k), v, fail, origin) for k, v in raw_params.items())
    all_lists = all(p.values is not None and not _is_choice(raw_params[p.name]) for p in params)
    sampler = data.get("sampler") or ("grid" if all_lists else "tpe")
    if sampler not in SAMPLERS:
        fail(f"sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if sampler == "grid":
        ranges = [p.name for p in params if p.is_range]
        if ranges:
            fail(
                f"{ranges[0]} is a range, and the grid sampler takes lists: give its values as "
                "a list, or use sampler: random or tpe"
            )
    grid_size = math.prod(len(p.values) for p in params) if sampler == "grid" else None
    count = trials if trials is not None else data.get("trials")
    if count is None:
        count = grid_size or DEFAULT_TRIALS
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        fail(f"trials must be a whole number of at least 1, got {count!r}")
    if grid_size is not None:
        count = min(count, grid_size)
    seed = data.get("seed", 1337)
    if isinstance(seed, bool) or not isinstance(seed, int):
        fail(f"seed must be a whole number, got {seed!r}")
    return SweepSpace(
        params=params,
        sampler=sampler,
        trials=count,
        seed=seed,
        budget=_parse_budget(data.get("budget"), fail),
        pruner=_parse_pruner(data.get("pruner", "median"), fail),
    )


def _is_choice(raw: Any) -> bool:
    return isinstance(raw, dict) and "choice" in raw


def _parse_param(name: str, raw: Any, fail, origin: str) -> Param:
    if name in _BUDGET_KEYS:
        fail(f"params: {name} is the trials' budget, the same for all: set it under budget:")
    if name in _DATA_KEYS:
        fail(
            f"params: {name} shapes the data, which a sweep tokenizes and splits once: set it "
            "with --set"
        )
    where = f"params: {name}"
    known = f"{origin}: {where}"  # where a value's own error (coerce_setting's) points
    if isinstance(raw, list):
        return Param(name, values=_values(name, raw, where, fail, known))
    if _is_choice(raw):
        if set(raw) != {"choice"} or not isinstance(raw["choice"], list):
            fail(f"{where}: a choice is {{choice: [A, B, ...]}}")
        return Param(name, values=_values(name, raw["choice"], where, fail, known))
    if isinstance(raw, dict) and {"low", "high"} <= set(raw):
        extra = sorted(set(raw) - {"low", "high", "log", "step"})
        if extra:
            fail(f"{where}: unknown range key {extra[0]!r}; a range has low, high, log, step")
        kind = _kind(name, fail)
        if kind not in ("int", "float"):
            fail(f"{where}: a range needs a numeric setting, {name} is {kind}: give a list")
        low, high = (coerce_setting(name, raw[k], f"{known}.{k}") for k in ("low", "high"))
        log = raw.get("log", False)
        if not isinstance(log, bool):
            fail(f"{where}.log must be true or false, got {log!r}")
        if not low < high:
            fail(f"{where}: low ({low}) must be less than high ({high})")
        if log and low <= 0:
            fail(f"{where}: a log range needs low > 0, got {low}")
        step = raw.get("step")
        if step is not None:
            step = coerce_setting(name, step, f"{known}.step")
            if step <= 0:
                fail(f"{where}.step must be positive, got {step}")
            if log:
                fail(f"{where}: a log range cannot have a step")
        _check_value(name, low, where, fail)
        _check_value(name, high, where, fail)
        return Param(name, low=low, high=high, log=log, step=step)
    fail(
        f"{where}: expected a list [A, B], a range {{low: A, high: B, log: true}} "
        "or a choice {choice: [A, B]}"
    )


def _kind(name: str, fail) -> str:
    try:
        return setting_kind(name)
    except GptpipeError as exc:
        fail(str(exc))


def _values(name: str, raw: list, where: str, fail, known: str) -> tuple[Any, ...]:
    if not raw:
        fail(f"{where}: the list is empty")
    values = tuple(coerce_setting(name, v, known) for v in raw)
    if len(set(values)) != len(values):
        fail(f"{where}: the list repeats a value")
    for value in values:
        _check_value(name, value, where, fail)
    return values


def _check_value(name: str, value: Any, where: str, fail) -> None:
    """One value on its own, checked by the config (the defaults with it set): a value no
    config could take (a negative learning rate) is an error before any work. A rule about the
    key's fit with others ("n_embd (100) must be divisible by n_head") is left to the trial."""
    try:
        TrainConfig(**{name: value})
    except GptpipeError as exc:
        if str(exc).startswith(f"{name} must"):  # the key's own rule
            fail(f"{where}: {exc}")


def _parse_budget(raw: Any, fail) -> dict[str, int] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in ("max_iters", "tokens"):
        fail("budget: give one of max_iters: N or tokens: N")
    key, value = next(iter(raw.items()))
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        fail(f"budget: {key} must be a whole number of at least 1, got {value!r}")
    return {key: value}


def _parse_pruner(raw: Any, fail) -> Pruner:
    if raw in ("none", None, False):
        return Pruner(kind="none")
    if raw == "median":
        return Pruner()
    if isinstance(raw, dict) and set(raw) == {"median"}:
        settings = raw["median"] or {}
        if not isinstance(settings, dict):
            fail("pruner: median: takes {startup_trials: N, warmup_steps: N}")
        extra = sorted(set(settings) - {"startup_trials", "warmup_steps"})
        if extra:
            fail(
                f"pruner: unknown median setting {extra[0]!r}; "
                "it takes startup_trials and warmup_steps"
            )
        values = {}
        for key in ("startup_trials", "warmup_steps"):
            value = settings.get(key, getattr(Pruner, key))
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                fail(f"pruner: {key} must be a whole number of at least 0, got {value!r}")
            values[key] = value
        return Pruner(**values)
    fail(f"pruner: expected median, none or {{median: {{startup_trials: N}}}}, got {raw!r}")
