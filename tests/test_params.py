"""The parameter table of the seed notes, and `gptpipe inspect` through the real console script."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from model.config import GPTConfig
from model.gpt import GPT
from model.params import group_subtotals_flat, parameter_table

GPTPIPE = Path(sys.executable).with_name("gptpipe")
SEED = GPTConfig(vocab_size=65, block_size=8, n_embd=64, n_head=4, n_layer=4, dropout=0.0)

PER_BLOCK = {
    "attention q/k/v": 12_288,  # 3 x 64 x 64, no bias
    "attention proj": 4_160,  # 64 x 64 + 64
    "feed-forward": 33_088,  # 64 x 256 + 256 + 256 x 64 + 64
    "layer norms": 256,  # 2 x (64 + 64)
}


@pytest.fixture(scope="module")
def model() -> GPT:
    return GPT(SEED)


@pytest.fixture(scope="module")
def table(model):
    return parameter_table(model)


def test_total_is_208193(table):
    assert table.total == 208_193


def test_group_subtotals(table):
    expected = {"embeddings": 4_672}  # 65 x 64 + 8 x 64
    for block in range(4):
        for part, count in PER_BLOCK.items():
            expected[f"block {block} {part}"] = count
    expected["ln_f"] = 128
    expected["lm_head"] = 4_225  # 64 x 65 + 65
    totals = table.group_totals()
    assert totals == expected
    assert list(totals) == list(expected)  # in model order: embeddings, blocks, ln_f, lm_head
    assert sum(totals.values()) == 208_193


def test_every_parameter_appears_once(model, table):
    names = [row.name for row in table.rows]
    assert len(names) == len(set(names))
    assert names == [name for name, _ in model.named_parameters()]
    assert "other" not in {row.group for row in table.rows}
    for row, (_, p) in zip(table.rows, model.named_parameters(), strict=True):
        assert row.shape == tuple(p.shape)
        assert row.count == p.numel()


def test_rows_have_the_expected_shapes(table):
    rows = {row.name: row for row in table.rows}
    assert rows["token_embedding_table.weight"].shape == (65, 64)
    assert rows["position_embedding_table.weight"].shape == (8, 64)
    assert rows["blocks.0.sa.qkv.weight"].shape == (192, 64)
    assert rows["blocks.3.ffwd.net.0.weight"].shape == (256, 64)
    assert rows["lm_head.bias"].group == "lm_head"
    assert rows["blocks.2.ln2.bias"].group == "block 2 layer norms"


def test_format_has_the_total_line_and_every_row(table):
    text = table.format()
    lines = text.splitlines()
    assert lines[-1] == "total 208,193 parameters (0.208193 M)"
    assert "# block 3 feed-forward" in lines
    for row in table.rows:
        assert any(line.startswith(row.name + " ") for line in lines), row.name
    assert any(line.split() == ["embeddings", "4,672"] for line in lines)


def test_to_dict_matches_the_table(table):
    d = table.to_dict()
    assert d["total"] == 208_193
    assert d["groups"] == table.group_totals()
    assert len(d["rows"]) == len(table.rows)


def test_group_subtotals_flat_sums_over_blocks(table):
    flat = group_subtotals_flat(table)
    assert flat == {
        "embeddings": 4_672,
        "blocks_attention_qkv": 4 * 12_288,
        "blocks_attention_proj": 4 * 4_160,
        "blocks_feed-forward": 4 * 33_088,
        "blocks_layer_norms": 4 * 256,
        "ln_f": 128,
        "lm_head": 4_225,
    }
    assert sum(flat.values()) == 208_193


def test_table_without_biases_has_no_bias_rows():
    table = parameter_table(GPT(dataclasses.replace(SEED, bias=False)))
    assert not any(row.name.endswith(".bias") for row in table.rows)
    # the seed model's biases: proj 64 + ffwd 256 + 64 + ln 2 x 64, times 4 blocks; ln_f 64; lm_head
    assert table.total == 208_193 - 4 * (64 + 256 + 64 + 128) - 64 - 65


# ----------------------------------------------------------------------------- the console script


def run_gptpipe(*args: str) -> subprocess.CompletedProcess:
    if not GPTPIPE.is_file():
        pytest.skip(f"console script not installed at {GPTPIPE}")
    return subprocess.run(
        [str(GPTPIPE), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_inspect_seed_prints_the_table():
    result = run_gptpipe("inspect", "--preset", "seed")
    assert result.returncode == 0, result.stderr
    assert "vocab_size 65, block_size 8, n_embd 64, n_head 4, n_layer 4" in result.stdout
    assert "208,193" in result.stdout
    assert result.stdout.rstrip().endswith("total 208,193 parameters (0.208193 M)")


def test_inspect_with_a_bad_override_is_a_one_line_error():
    result = run_gptpipe("inspect", "--preset", "seed", "--set", "n_head=5")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "n_embd (64) must be divisible by n_head (5)" in lines[0]
    assert result.stdout == ""
