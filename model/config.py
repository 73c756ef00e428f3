"""Configuration: the model's shape (`GPTConfig`) and a whole training run (`TrainConfig`).

Hyperparameters keep the lecture's names. A run's config is built in layers: the dataclass
defaults, then a preset from `configs/`, then a YAML file, then `--set key=value` overrides; every
layer is checked with a message that says which key is wrong and what it accepts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from storage.errors import GptpipeError

PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"
TOKENIZER_KINDS = ("char", "bpe")
LR_SCHEDULES = ("constant", "cosine", "linear", "wsd")
OPTIMIZERS = ("adamw", "muon")
# which 2-D weights AdamW decays: every matrix, or only the blocks' (not embeddings, lm_head)
WEIGHT_DECAY_PARAMS = ("matrices", "hidden")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# bpe's vocabulary when vocab_size is not set (char's comes from the corpus)
DEFAULT_BPE_VOCAB_SIZE = 1024
# Token files store ids as uint32 at most (model.data.write_tokens), so ids run 0 .. 2**32 - 1.
# A larger vocab_size could never be stored; refusing it here also turns a typo such as
# vocab_size=100000000000 into a clear error rather than a failed multi-terabyte allocation.
MAX_VOCAB_SIZE = 1 << 32


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise GptpipeError(message)


def _check_positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value > 0, f"{name} must be positive, got {value}")


@dataclass(frozen=True)
class GPTConfig:
    """The shape of the model; the defaults are the lecture's full config."""

    vocab_size: int = 65
    block_size: int = 256
    n_embd: int = 384
    n_head: int = 6
    n_layer: int = 6
    dropout: float = 0.2
    bias: bool = True  # biases of proj, feed-forward, layer norms and lm_head (the lecture: True)

    def __post_init__(self) -> None:
        _check_positive(self, "vocab_size", "block_size", "n_embd", "n_head", "n_layer")
        _require(
            self.n_embd % self.n_head == 0,
            f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
            "each head gets n_embd // n_head channels",
        )
        _require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a pipeline run needs; the defaults are the lecture's hyperparameters."""

    # data
    tokenizer: str = "char"
    # bpe: vocabulary to learn (DEFAULT_BPE_VOCAB_SIZE when unset); char: pad up to this
    vocab_size: int | None = None
    val_fraction: float = 0.1
    # model: every GPTConfig field but vocab_size, with GPTConfig's defaults
    block_size: int = GPTConfig.block_size
    n_embd: int = GPTConfig.n_embd
    n_head: int = GPTConfig.n_head
    n_layer: int = GPTConfig.n_layer
    dropout: float = GPTConfig.dropout
    bias: bool = GPTConfig.bias
    # optimisation
    batch_size: int = 64  # per rank and micro-step
    grad_accum_steps: int = 1
    max_iters: int = 5000
    learning_rate: float = 3e-4
    lr_schedule: str = "constant"
    warmup_iters: int = 0
    min_lr: float = 0.0
    weight_decay: float = 0.01  # torch's AdamW default, which the lecture used
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 0.0  # 0 = off
    # the recipe's other choices (model/recipe.py); the defaults are what the loop always did
    decay_fraction: float = 0.2  # wsd: the share of max_iters spent decaying to min_lr
    weight_decay_params: str = "matrices"
    optimizer: str = "adamw"  # muon: torch.optim.Muon for the blocks' matrices, AdamW for the rest
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    init_std: float = 0.02  # the std of the N(0, std) initial weights of every linear and embedding
    # evaluation, logging, checkpoints
    eval_interval: int = 500
    eval_iters: int = 200
    log_interval: int = 100
    checkpoint_interval: int = 500  # 0 = only at the end
    seed: int = 1337
    device: str = "auto"
    # the forward's autocast precision (weights and optimizer stay float32). auto: the fastest
    # that keeps the loss curve on this machine and model (model/precision.py): bf16 on GPUs that
    # have it (else float16 with a GradScaler); on a CPU, bf16 only where it has native bf16
    # matmuls (AMX, AVX512-BF16) and a short probe finds it faster, else float32
    dtype: str = "auto"
    compile: bool = False
    # intra-op threads per rank; 0: the cores this process may use (affinity, cgroup quota)
    # split among the ranks on this machine
    threads: int = 0

    def __post_init__(self) -> None:
        _require(
            self.tokenizer in TOKENIZER_KINDS,
            f"tokenizer must be one of {', '.join(TOKENIZER_KINDS)}, got {self.tokenizer!r}",
        )
        if self.tokenizer == "bpe" and self.vocab_size is None:
            # resolved here, not in the tokenize task, so that the resolved config (and the
            # MLflow params logged from it) shows the vocabulary the run will learn
            object.__setattr__(self, "vocab_size", DEFAULT_BPE_VOCAB_SIZE)
        _require(
            self.lr_schedule in LR_SCHEDULES,
            f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}",
        )
        for name, choices in (
            ("optimizer", OPTIMIZERS),
            ("weight_decay_params", WEIGHT_DECAY_PARAMS),
        ):
            value = getattr(self, name)
            _require(value in choices, f"{name} must be one of {', '.join(choices)}, got {value!r}")
        _require(
            0.0 < self.decay_fraction <= 1.0,
            f"decay_fraction must be in (0, 1], got {self.decay_fraction}",
        )
        _require(
            0.0 <= self.muon_momentum < 1.0,
            f"muon_momentum must be in [0, 1), got {self.muon_momentum}",
        )
        _require(self.device in DEVICES, f"device must be one of {', '.join(DEVICES)}")
        _require(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}")
        _require(-(2**63) <= self.seed < 2**64, f"seed must fit in 64 bits, got {self.seed}")
        for name in ("beta1", "beta2"):  # AdamW's own check would fail only inside training
            value = getattr(self, name)
            _require(0.0 <= value < 1.0, f"{name} must be in [0, 1), got {value}")
        _require(
            0.0 < self.val_fraction < 1.0,
            f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}",
        )
        _check_positive(
            self,
            "batch_size",
            "grad_accum_steps",
            "max_iters",
            "learning_rate",
            "muon_lr",
            "init_std",
            "eval_interval",
            "eval_iters",
            "log_interval",
        )
        for name in (
            "warmup_iters",
            "checkpoint_interval",
            "min_lr",
            "weight_decay",
            "grad_clip",
            "threads",
        ):
            _require(getattr(self, name) >= 0, f"{name} must not be negative")
        if self.vocab_size is not None:
            _require(self.vocab_size > 0, f"vocab_size must be positive, got {self.vocab_size}")
            _require(
                self.vocab_size <= MAX_VOCAB_SIZE,
                f"vocab_size must be at most {MAX_VOCAB_SIZE} (2**32: token ids are stored as "
                f"uint32), got {self.vocab_size}",
            )
            if self.tokenizer == "bpe":
                _require(self.vocab_size >= 257, "vocab_size for bpe must be at least 257")
        # the model's shape is checked by GPTConfig itself (n_embd divisible by n_head, ...)
        self.model_config(self.vocab_size or 1)

    def model_config(self, vocab_size: int) -> GPTConfig:
        shape = {f.name: getattr(self, f.name) for f in fields(GPTConfig) if f.name != "vocab_size"}
        return GPTConfig(vocab_size=vocab_size, **shape)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- building configs

_FIELDS = {f.name: f for f in fields(TrainConfig)}
_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def _coerce(key: str, value: Any, origin: str) -> Any:
    """Turn a YAML value or a `--set` string into the type the field declares."""
    if key not in _FIELDS:
        raise GptpipeError(
            f"{origin}: unknown key {key!r}; known keys: {', '.join(sorted(_FIELDS))}"
        )
    kind = str(_FIELDS[key].type)
    text = str(value).strip()
    try:
        if "None" in kind and text.lower() in {"none", "null", ""}:
            return None
        if kind.startswith("int"):
            if isinstance(value, bool):
                raise ValueError
            number = float(text)  # accepts 2000, 2000.0 and 2e3 alike
            if not number.is_integer():
                raise ValueError
            return int(number)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            number = float(text)
            if not math.isfinite(number):  # inf and nan parse, but no setting takes them
                raise GptpipeError(
                    f"{origin}: {key}={text!r} is not valid, expected a finite number"
                )
            return number
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError
        return text
    except ValueError:
        expected = kind.split(" |")[0].replace("int", "an integer").replace("float", "a number")
        expected = expected.replace("bool", "true or false")
        raise GptpipeError(f"{origin}: {key}={text!r} is not valid, expected {expected}") from None


def coerce_setting(key: str, value: Any, origin: str) -> Any:
    """A value for setting ``key`` from YAML or text, as `--set` takes it; one-line errors name
    ``origin``, the key and what it accepts (an unknown key lists the known ones)."""
    return _coerce(key, value, origin)


def setting_kind(key: str) -> str:
    """The type a setting takes: "int", "float", "bool" or "str" (an unknown key: --set's error)."""
    if key not in _FIELDS:
        _coerce(key, None, "--set")  # raises the unknown-key error
    return str(_FIELDS[key].type).split(" |")[0]


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def read_yaml_mapping(path: Path, origin: str) -> dict[str, Any]:
    """A YAML file of key: value lines (a preset, --config, a sweep's --space), with one-line
    errors naming ``origin`` for a missing, unreadable or malformed file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptpipeError(f"{origin}: file not found: {path}") from None
    except OSError as exc:
        raise GptpipeError(f"{origin}: cannot read {path}: {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        if isinstance(exc, yaml.MarkedYAMLError) and mark is not None and exc.problem:
            detail = f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
        else:
            detail = " ".join(str(exc).split())
        raise GptpipeError(f"{origin}: {path} is not valid YAML: {detail}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GptpipeError(f"{origin}: {path} must be a mapping of key: value lines")
    return data


def default_preset() -> str:
    import torch

    return "lecture" if torch.cuda.is_available() else "cpu"


def build_config(
    preset: str | None = None,
    config_file: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> TrainConfig:
    """Defaults <- preset (default: `lecture` on a GPU, `cpu` otherwise) <- YAML file <- --set."""
    preset = preset or default_preset()
    if preset not in available_presets():
        raise GptpipeError(
            f"unknown preset {preset!r}; available: {', '.join(available_presets())}"
        )
    values: dict[str, Any] = {}
    layers = [(f"preset {preset}", read_yaml_mapping(PRESETS_DIR / f"{preset}.yaml", "--preset"))]
    if config_file:
        layers.append((f"--config {config_file}", read_yaml_mapping(Path(config_file), "--config")))
    for origin, mapping in layers:
        for key, value in mapping.items():
            values[key] = _coerce(str(key), value, origin)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise GptpipeError(f"--set {item!r}: expected key=value, e.g. --set max_iters=200")
        values[key.strip()] = _coerce(key.strip(), value, f"--set {item}")
    return TrainConfig(**values)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig saved with `to_dict` (in a checkpoint or a run's metadata)."""
    return TrainConfig(**{k: v for k, v in values.items() if k in _FIELDS})


__all__ = [
    "GPTConfig",
    "TrainConfig",
    "available_presets",
    "build_config",
    "coerce_setting",
    "config_from_dict",
    "default_preset",
    "read_yaml_mapping",
    "setting_kind",
]
