"""build_config: presets, YAML files and --set overrides in layers, and one-line error messages."""

from pathlib import Path

import pytest

from model.config import (
    DEFAULT_BPE_VOCAB_SIZE,
    MAX_VOCAB_SIZE,
    TrainConfig,
    available_presets,
    build_config,
    config_from_dict,
)
from storage.errors import GptpipeError


def config_error(*args, **kwargs) -> str:
    """The message of the GptpipeError build_config raises; it must fit on one line."""
    with pytest.raises(GptpipeError) as info:
        build_config(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def yaml_file(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "run.yaml"
        path.write_text(text, encoding="utf-8")
        return str(path)

    return write


# ----------------------------------------------------------------------------- presets


def test_the_three_presets_are_available():
    assert available_presets() == ["cpu", "fast", "lecture", "seed"]


@pytest.mark.parametrize("preset", ["cpu", "lecture", "seed"])
def test_each_preset_loads(preset):
    assert isinstance(build_config(preset), TrainConfig)


def test_cpu_preset_values():
    cfg = build_config("cpu")
    assert (cfg.block_size, cfg.batch_size, cfg.n_layer, cfg.n_head, cfg.n_embd) == (
        64,
        12,
        4,
        4,
        128,
    )
    assert cfg.dropout == 0.0
    assert cfg.max_iters == 2000
    assert cfg.learning_rate == 1e-3
    assert cfg.eval_iters == 20
    assert isinstance(cfg.max_iters, int) and isinstance(cfg.learning_rate, float)


def test_lecture_preset_is_the_lecture():
    cfg = build_config("lecture")
    assert (cfg.block_size, cfg.batch_size, cfg.n_layer, cfg.n_head, cfg.n_embd) == (
        256,
        64,
        6,
        6,
        384,
    )
    assert (cfg.dropout, cfg.learning_rate, cfg.max_iters) == (0.2, 3e-4, 5000)
    assert (cfg.eval_interval, cfg.eval_iters) == (500, 200)


def test_seed_preset_is_the_tiny_model():
    cfg = build_config("seed")
    assert (cfg.block_size, cfg.n_embd, cfg.n_head, cfg.n_layer) == (8, 64, 4, 4)


def test_unknown_preset():
    message = config_error("gigantic")
    assert "unknown preset 'gigantic'" in message
    assert "cpu, fast, lecture, seed" in message


def test_no_preset_means_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert build_config() == build_config("cpu")


# ----------------------------------------------------------------------------- layering


def test_yaml_overrides_the_preset_and_set_overrides_the_yaml(yaml_file):
    path = yaml_file("max_iters: 300\nn_layer: 2\nlearning_rate: 5.0e-4\n")
    cfg = build_config("cpu", path, ["max_iters=40", "dropout=0.1"])
    assert cfg.max_iters == 40  # --set beats the file
    assert cfg.n_layer == 2  # the file beats the preset
    assert cfg.learning_rate == 5e-4
    assert cfg.dropout == 0.1  # --set beats the preset
    assert cfg.block_size == 64 and cfg.eval_iters == 20  # the rest is the preset's


def test_later_set_wins():
    assert build_config("cpu", overrides=["max_iters=10", "max_iters=20"]).max_iters == 20


def test_keys_the_preset_does_not_set_keep_the_defaults():
    cfg = build_config("seed")
    assert cfg.tokenizer == TrainConfig.tokenizer == "char"
    assert cfg.val_fraction == 0.1


def test_set_values_are_coerced_to_the_declared_types():
    cfg = build_config(
        "cpu",
        overrides=[
            "max_iters=2e3",
            "learning_rate=3e-4",
            "compile=yes",
            "bias=off",
            "vocab_size=none",
            "tokenizer= bpe ",
        ],
    )
    assert cfg.max_iters == 2000 and isinstance(cfg.max_iters, int)
    assert cfg.learning_rate == 3e-4
    assert cfg.compile is True and cfg.bias is False
    assert cfg.vocab_size == DEFAULT_BPE_VOCAB_SIZE  # 'none' is unset, so bpe's default
    assert cfg.tokenizer == "bpe"


def test_bpe_without_a_vocab_size_gets_the_default_in_the_resolved_config():
    """The README's default 1024 is in the config itself (and so in the MLflow params), not
    supplied later by the tokenize task."""
    cfg = build_config("seed", None, ["tokenizer=bpe"])
    assert DEFAULT_BPE_VOCAB_SIZE == 1024
    assert cfg.vocab_size == 1024 and cfg.to_dict()["vocab_size"] == 1024
    assert config_from_dict({"tokenizer": "bpe"}).vocab_size == 1024  # a flow given a dict
    assert build_config("seed", None, ["tokenizer=bpe", "vocab_size=512"]).vocab_size == 512
    assert build_config("seed").vocab_size is None  # char: the vocabulary comes from the corpus


def test_an_empty_yaml_file_changes_nothing(yaml_file):
    assert build_config("cpu", yaml_file("# nothing here\n")) == build_config("cpu")


def test_config_round_trips_through_to_dict():
    cfg = build_config("seed", overrides=["tokenizer=bpe", "vocab_size=512"])
    assert config_from_dict({**cfg.to_dict(), "retired_key": 1}) == cfg


# ----------------------------------------------------------------------------- errors


def test_unknown_set_key_lists_the_known_keys():
    message = config_error("cpu", overrides=["max_iter=5"])
    assert "unknown key 'max_iter'" in message
    assert "known keys:" in message
    for key in ("max_iters", "learning_rate", "n_embd", "val_fraction"):
        assert key in message


def test_unknown_yaml_key_names_the_file(yaml_file):
    path = yaml_file("lr: 0.1\n")
    message = config_error("cpu", path)
    assert path in message and "unknown key 'lr'" in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("max_iters=abc", "expected an integer"),
        ("max_iters=2.5", "expected an integer"),
        ("max_iters=true", "expected an integer"),
        ("learning_rate=fast", "expected a number"),
        ("compile=maybe", "expected true or false"),
        ("vocab_size=lots", "expected an integer"),
    ],
)
def test_wrong_type(override, expected):
    message = config_error("cpu", overrides=[override])
    key, _, value = override.partition("=")
    assert f"{key}={value!r} is not valid" in message
    assert expected in message


def test_wrong_type_in_yaml(yaml_file):
    message = config_error("cpu", yaml_file("n_layer: [1, 2]\n"))
    assert "n_layer=" in message and "expected an integer" in message


@pytest.mark.parametrize("override", ["max_iters", "=5", ""])
def test_set_without_key_value(override):
    assert "expected key=value" in config_error("cpu", overrides=[override])


def test_bad_yaml(yaml_file):
    path = yaml_file("max_iters: [1, 2\nn_layer: 3\n")
    message = config_error("cpu", path)
    assert path in message and "is not valid YAML" in message


def test_yaml_that_is_not_a_mapping(yaml_file):
    path = yaml_file("- max_iters\n- 200\n")
    message = config_error("cpu", path)
    assert path in message and "must be a mapping" in message


def test_yaml_file_not_found(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert f"file not found: {missing}" in config_error("cpu", str(missing))


def test_yaml_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00max_iters")
    assert "is not valid YAML" in config_error("cpu", str(path))


def test_yaml_path_that_is_a_directory(tmp_path):
    assert str(tmp_path) in config_error("cpu", str(tmp_path))


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1"])
def test_val_fraction_outside_zero_one(value):
    message = config_error("cpu", overrides=[f"val_fraction={value}"])
    assert "val_fraction must be between 0 and 1 (exclusive)" in message


@pytest.mark.parametrize(
    "key", ["block_size", "n_embd", "n_head", "n_layer", "batch_size", "max_iters", "eval_iters"]
)
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_sizes(key, value):
    message = config_error("cpu", overrides=[f"{key}={value}"])
    assert f"{key} must be positive, got {value}" in message


def test_n_embd_not_divisible_by_n_head():
    assert "must be divisible by n_head (3)" in config_error("seed", overrides=["n_head=3"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("tokenizer=word", "tokenizer must be one of char, bpe"),
        ("lr_schedule=step", "lr_schedule must be one of constant, cosine, linear, wsd"),
        ("optimizer=sgd", "optimizer must be one of adamw, muon, got 'sgd'"),
        ("weight_decay_params=all", "weight_decay_params must be one of matrices, hidden"),
        ("decay_fraction=0", "decay_fraction must be in (0, 1], got 0.0"),
        ("decay_fraction=1.5", "decay_fraction must be in (0, 1], got 1.5"),
        ("muon_momentum=1", "muon_momentum must be in [0, 1), got 1.0"),
        ("muon_lr=0", "muon_lr must be positive"),
        ("init_std=-0.02", "init_std must be positive"),
        ("device=tpu", "device must be one of auto, cpu, cuda"),
        ("dropout=1", "dropout must be in [0, 1)"),
        ("weight_decay=-0.1", "weight_decay must not be negative"),
        ("vocab_size=0", "vocab_size must be positive"),
    ],
)
def test_other_invalid_values(override, expected):
    message = config_error("cpu", overrides=["tokenizer=char", override])
    assert expected in message


def test_bpe_vocab_must_cover_the_bytes():
    message = config_error("cpu", overrides=["tokenizer=bpe", "vocab_size=100"])
    assert "vocab_size for bpe must be at least 257" in message


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_vocab_size_is_at_most_what_a_token_file_holds(tokenizer):
    assert MAX_VOCAB_SIZE == 2**32  # ids are stored as uint32
    cfg = build_config("seed", overrides=[f"tokenizer={tokenizer}", f"vocab_size={2**32}"])
    assert cfg.vocab_size == 2**32
    message = config_error("seed", overrides=[f"tokenizer={tokenizer}", f"vocab_size={2**32 + 1}"])
    assert message == (
        f"vocab_size must be at most {2**32} (2**32: token ids are stored as uint32), "
        f"got {2**32 + 1}"
    )


# ----------------------------------------------------------------------------- integer parsing


def test_exponent_form_that_is_not_an_integer_is_refused():
    assert "expected an integer" in config_error("cpu", overrides=["max_iters=1.5e0"])


def test_integral_float_in_yaml_is_an_integer(yaml_file):
    assert build_config("cpu", yaml_file("max_iters: 2.0e3\n")).max_iters == 2000  # works today
    assert build_config("cpu", yaml_file("max_iters: 2000.0\n")).max_iters == 2000


def test_presets_dir_holds_the_yaml_files():
    from model.config import PRESETS_DIR

    assert {p.name for p in Path(PRESETS_DIR).glob("*.yaml")} == {
        "cpu.yaml",
        "fast.yaml",
        "lecture.yaml",
        "seed.yaml",
    }
