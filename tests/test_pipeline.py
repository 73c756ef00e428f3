"""End to end through the real `gptpipe` command, Prefect's engine and a real Prefect server."""

from __future__ import annotations

import hashlib
import json
import urllib.request
from pathlib import Path

import pytest

from model.dataset import open_dataset, read_manifest
from tests.conftest import run_cli, seed_preset

TINY = seed_preset(max_iters=60, eval_interval=30, eval_iters=5, batch_size=16, log_interval=20)


def run_pipeline(
    small_corpus: Path, env: dict, cwd: Path, nproc: int, run_id: str = "", extra: tuple | list = ()
):
    run_id = run_id or f"e2e-{nproc}"
    result = run_cli(
        [
            "run",
            "--input",
            str(small_corpus),
            *TINY,
            "--nproc",
            str(nproc),
            "--run-id",
            run_id,
            "--sample-tokens",
            "80",
            "--store",
            str(cwd / "store"),
            *extra,
        ],
        env,
        cwd,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    run_dir = cwd / "store" / "runs" / run_id
    return result, run_dir, json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_gptpipe_run_end_to_end(small_corpus, cli_env, tmp_path, nproc):
    result, run_dir, summary = run_pipeline(small_corpus, cli_env, tmp_path, nproc)
    output = result.stdout + result.stderr

    # every stage wrote its outputs into the store; the run's folder has the samples and summary
    outputs = summary["outputs"]
    for name in ("tokenizer", "tokens", "train", "val", "checkpoint", "samples"):
        assert Path(outputs[name]).is_file(), name
    assert outputs["samples"] == str(run_dir / "samples.txt")
    ids, meta = open_dataset(outputs["tokens"]).ids(), read_manifest(outputs["tokens"])
    assert len(ids) == 60_000 and meta["n_tokens"] == 60_000
    assert meta["vocab_size"] == summary["stages"]["tokenize"]["metadata"]["vocab_size"]
    split_meta = summary["stages"]["split"]["metadata"]
    assert split_meta["n_train_tokens"] == 54_000 and split_meta["n_val_tokens"] == 6_000

    # training ran on the asked ranks, learned something, and the evaluation is eval-mode
    assert summary["world_size"] == nproc
    assert f"training on {nproc} rank(s)" in output
    assert summary["stages"]["train"]["step"] == 60
    assert summary["val_loss"] < 4.0  # ln(vocab) ~ 4.1 before training
    samples = (run_dir / "samples.txt").read_text(encoding="utf-8")
    assert len(samples) > 0 and samples == summary["sample"]

    # the closing summary names the run, the losses and where each output is
    assert f"run e2e-{nproc}:" in result.stdout
    assert f"val {summary['val_loss']:.4f}" in result.stdout
    assert outputs["checkpoint"] in result.stdout
    assert "Traceback" not in output

    # the flow published its report as a Prefect markdown artifact
    request = urllib.request.Request(
        f"{cli_env['PREFECT_API_URL']}/artifacts/filter",
        data=json.dumps({"artifacts": {"key": {"any_": ["gptpipe-run"]}}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        reports = [a["data"] for a in json.load(response) if f"run e2e-{nproc}" in a["data"]]
    assert reports and f"{summary['val_loss']:.4f}" in reports[0]
    assert summary["mlflow"]["run_id"] in reports[0]


@pytest.mark.slow
def test_sample_command_is_deterministic_and_checks_the_prompt(small_corpus, cli_env, tmp_path):
    _, _, summary = run_pipeline(small_corpus, cli_env, tmp_path, 1)
    ckpt = summary["outputs"]["checkpoint"]

    def sample(*extra: str):
        return run_cli(
            ["sample", "--checkpoint", ckpt, "--max-new-tokens", "60", *extra], cli_env, tmp_path
        )

    first, again, other = sample("--seed", "3"), sample("--seed", "3"), sample("--seed", "4")
    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout and first.stdout != other.stdout
    prompted = sample("--prompt", "ROMEO:", "--temperature", "0.8", "--top-k", "5")
    assert prompted.returncode == 0 and prompted.stdout.startswith("ROMEO:")

    unknown = sample("--prompt", "caf\u00e9 \u20ac")
    assert unknown.returncode == 2
    assert "'\u00e9'" in unknown.stderr and "'\u20ac'" in unknown.stderr
    assert unknown.stderr.startswith("error:") and "Traceback" not in unknown.stderr


@pytest.mark.slow
def test_second_run_reuses_cached_stages(small_corpus, cli_env, tmp_path):
    """Stages are keyed on content: the same data and settings re-use the stored results."""
    first, _, one = run_pipeline(small_corpus, cli_env, tmp_path, 1, run_id="a")
    assert one["cached"] == {"tokenize": False, "split": False, "train": False}
    stamps = {
        name: Path(one["outputs"][name]).stat().st_mtime_ns
        for name in ("tokens", "train", "checkpoint")
    }

    second, _, two = run_pipeline(small_corpus, cli_env, tmp_path, 1, run_id="b")
    assert two["cached"] == {"tokenize": True, "split": True, "train": True}
    # the same checkpoint: no new model logged, no new version registered, the run says so
    assert not one["model"]["reused"] and two["model"]["reused"]
    assert two["model"]["version"] == one["model"]["version"]
    assert two["model"]["uri"] == f"models:/{one['model']['name']}/{one['model']['version']}"
    assert f"version {one['model']['version']} is this checkpoint already" in (
        second.stdout + second.stderr
    )
    assert "re-used from cache (same content and settings): tokenize, split, train" in second.stdout
    assert "tokenize: re-using" in second.stdout + second.stderr
    for name, stamp in stamps.items():
        assert two["outputs"][name] == one["outputs"][name]
        assert Path(two["outputs"][name]).stat().st_mtime_ns == stamp, f"{name} was rewritten"

    # a training setting re-runs training only; --refresh re-runs a stage with unchanged inputs
    changed = ["--set", "learning_rate=0.002", "--refresh", "tokenize"]
    _, _, three = run_pipeline(small_corpus, cli_env, tmp_path, 1, run_id="c", extra=changed)
    assert three["cached"] == {"tokenize": False, "split": True, "train": False}
    assert not three["model"]["reused"] and three["model"]["version"] != one["model"]["version"]

    # a re-used training under a model name it has no version of: logged and registered now
    other = ["--model-name", "gptpipe-other"]
    _, _, four = run_pipeline(small_corpus, cli_env, tmp_path, 1, run_id="d", extra=other)
    assert four["cached"]["train"] and not four["model"]["reused"]
    assert (four["model"]["name"], four["model"]["version"]) == ("gptpipe-other", "1")
    from mlflow import MlflowClient

    client = MlflowClient(cli_env["MLFLOW_TRACKING_URI"])
    tags = client.get_run(two["stages"]["train"]["mlflow_run_id"]).data.tags
    linked = f"{one['model']['name']}/{one['model']['version']}"
    assert (tags["gptpipe.model_version"], tags["gptpipe.model_version_reused"]) == (linked, "True")
    version = client.get_model_version("gptpipe-other", "1")
    checkpoint = Path(one["outputs"]["checkpoint"]).read_bytes()
    assert version.tags["checkpoint_sha256"] == hashlib.sha256(checkpoint).hexdigest()
    assert version.source.startswith("models:/m-")  # the model logged now, from that checkpoint
    assert three["outputs"]["checkpoint"] != one["outputs"]["checkpoint"]
    assert three["outputs"]["tokens"] == one["outputs"]["tokens"]  # same content, same key
