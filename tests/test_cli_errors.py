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
    result = run_cli(["run", "--input", str(small_corpus), "--preset", "seed",
                      "--store", str(tmp_path / "store"), "--tracking-uri", dead],
                     cli_env, tmp_path, timeout=60)  # fmt: skip
    assert_clean_error(result, "cannot reach the MLflow tracking server", dead)
    assert not (tmp_path / "store" / "runs").exists()


def test_missing_bucket_fails_before_any_work(s3_env, small_corpus, cli_env, tmp_path):
    env = {**cli_env, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}
    args = ["run", "--input", str(small_corpus), "--store", "s3://no-such-bucket-here/store"]
    result = run_cli(args, env, tmp_path, timeout=60)
    assert_clean_error(result, "no-such-bucket-here", "does not exist")
    assert s3_env.secret not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set", "n_head=5"], "divisible by n_head"),
        (["--set", "nope=1"], "unknown key 'nope'"),
        (["--set", "max_iters=many"], "max_iters='many'"),
        (["--nproc", "0"], "--nproc must be at least 1"),
    ],
)
def test_bad_config_fails_before_any_work(args, fragment, small_corpus, cli_env, tmp_path):
    result = run_cli(["run", "--input", str(small_corpus), "--store", str(tmp_path / "store"),
                      *args], cli_env, tmp_path, timeout=60)  # fmt: skip
    assert_clean_error(result, fragment)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("command", [[], ["run"], ["sample"], ["inspect"]])
def test_help_shows_examples(command, cli_env, tmp_path):
    result = run_cli([*command, "--help"], cli_env, tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "examples:" in result.stdout
    assert f"gptpipe {command[0] if command else 'run'} " in result.stdout.split("examples:")[1]
