"""Bad input through the real CLI: one `error:` line, exit status 2, no traceback, no work done."""

from __future__ import annotations

import os

import pytest

from tests.conftest import free_port, run_cli


def assert_clean_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.stdout + result.stderr


def test_unreachable_tracking_server_fails_before_any_work(small_corpus, cli_env, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    result = run_cli(
        [
            "run",
            "--input",
            str(small_corpus),
            "--preset",
            "seed",
            "--store",
            str(tmp_path / "store"),
            "--tracking-uri",
            dead,
        ],
        cli_env,
        tmp_path,
        timeout=60,
    )
    assert_clean_error(result, "cannot reach the MLflow tracking server", dead)
    assert not (tmp_path / "store" / "runs").exists()


def test_missing_bucket_fails_before_any_work(s3_env, small_corpus, cli_env, tmp_path):
    env = {**cli_env, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}
    args = ["run", "--input", str(small_corpus), "--store", "s3://no-such-bucket-here/store"]
    result = run_cli(args, env, tmp_path, timeout=60)
    assert_clean_error(result, "no-such-bucket-here", "does not exist")
    assert s3_env.secret not in result.stdout + result.stderr


@pytest.mark.parametrize("uri", ["bogus://x", "mem://user:s3cret@host/db"])
def test_a_tracking_uri_mlflow_cannot_use_is_one_line(uri, small_corpus, cli_env, tmp_path):
    args = ["run", "--input", str(small_corpus), "--store", str(tmp_path / "store")]
    result = run_cli([*args, "--tracking-uri", uri], cli_env, tmp_path, timeout=60)
    scheme = uri.partition("://")[0]
    assert_clean_error(result, "MLflow cannot use the tracking URI", f"no {scheme}:// store")
    assert "s3cret" not in result.stderr  # credentials in the URI are not shown


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set", "n_head=5"], "divisible by n_head"),
        (["--set", "nope=1"], "unknown key 'nope'"),
        (["--set", "max_iters=many"], "max_iters='many'"),
        (["--nproc", "0"], "--nproc must be at least 1"),
        (["--nproc", "two"], "--nproc must be a whole number or auto, got 'two'"),
    ],
)
def test_bad_config_fails_before_any_work(args, fragment, small_corpus, cli_env, tmp_path):
    result = run_cli(
        ["run", "--input", str(small_corpus), "--store", str(tmp_path / "store"), *args],
        cli_env,
        tmp_path,
        timeout=60,
    )
    assert_clean_error(result, fragment)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("command", [[], ["run"], ["sample"], ["inspect"]])
def test_help_shows_examples(command, cli_env, tmp_path):
    result = run_cli([*command, "--help"], cli_env, tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "examples:" in result.stdout
    assert f"gptpipe {command[0] if command else 'run'} " in result.stdout.split("examples:")[1]


@pytest.mark.parametrize("size", ["inf", "1e400", "1e308G"])
def test_a_shard_size_too_big_for_a_number_is_a_usage_error(size, small_corpus, tmp_path):
    """float() gives infinity for these, which int() refuses with an OverflowError."""
    result = run_cli(
        [
            "tokenize",
            "--input",
            str(small_corpus),
            "--store",
            str(tmp_path / "s"),
            "--shard-size",
            size,
        ],
        dict(os.environ),
        tmp_path,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == [
        f"gptpipe tokenize: error: argument --shard-size: not a size: '{size}' "
        "(e.g. 65536, 64K, 32M)"
    ], result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "s").exists()


def test_inspect_refuses_a_vocab_size_no_token_file_can_hold(tmp_path):
    """Was a RuntimeError traceback from allocating a 25 TB embedding table."""
    result = run_cli(
        ["inspect", "--preset", "seed", "--set", "vocab_size=100000000000"],
        dict(os.environ),
        tmp_path,
        timeout=60,
    )
    assert_clean_error(result, f"vocab_size must be at most {2**32}", "got 100000000000")


def test_inspect_counts_a_model_too_large_to_allocate(tmp_path):
    """inspect builds the model on the meta device: shapes and counts, no memory.

    At vocab_size 2e9 the seed model's embedding and head hold 256e9 parameters (1 TB in
    float32); allocating them was a "can't allocate memory" traceback.
    """
    result = run_cli(
        ["inspect", "--preset", "seed", "--set", "vocab_size=2000000000"],
        dict(os.environ),
        tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # the seed model's 208,193 parameters, with 2e9 tokens instead of 65 in its embedding
    # (64 each) and in lm_head (64 weights and 1 bias each)
    total = 208_193 + (2_000_000_000 - 65) * (64 + 65)
    assert f"total {total:,} parameters" in result.stdout
