"""The pipeline against real servers: S3 (moto over HTTP) for the store, an `mlflow server`."""

from __future__ import annotations

import json
import os
import socket
import urllib.request
from pathlib import Path

import boto3
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import MLFLOW_SERVER_SECRET, run_cli, seed_preset

TINY = seed_preset(max_iters=60, eval_interval=30, eval_iters=5, batch_size=16, log_interval=20)
STAGES = {"data_check", "tokenize", "split", "train", "evaluate", "sample"}


def _env(cli_env: dict[str, str]) -> dict[str, str]:
    """The CLI's environment plus the AWS settings s3_env put into this process."""
    env = {k: v for k, v in cli_env.items() if k != "MLFLOW_TRACKING_URI"}
    env.update({k: v for k, v in os.environ.items() if k.startswith("AWS_")})
    return env


def _all_text_in_mlflow(client: MlflowClient, run_ids: list[str], tmp: Path) -> str:
    """Params, tags, metric names and every artifact's bytes of the runs, as one string."""
    chunks = []
    for run_id in run_ids:
        run = client.get_run(run_id)
        chunks += [json.dumps(run.data.params), json.dumps(run.data.tags)]
        chunks += list(run.data.metrics)
        local = client.download_artifacts(run_id, "", str(tmp / run_id))
        for path in Path(local).rglob("*"):
            if path.is_file():
                chunks.append(path.read_bytes().decode("utf-8", errors="replace"))
    return "\n".join(chunks)


def _all_text_in_prefect(api: str) -> str:
    """Every flow run's parameters and every artifact on the Prefect server, as one string."""
    chunks = []
    for path in ("flow_runs/filter", "artifacts/filter", "task_runs/filter"):
        request = urllib.request.Request(
            f"{api}/{path}", data=b"{}", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            chunks.append(response.read().decode())
    return "\n".join(chunks)


def test_printed_tracking_calls_reach_the_run(tmp_path, capsys):
    """What rank 0's LineRun prints, TrainingRun.log_line sends; other lines are left alone."""
    from model.launch import LineRun, TrainingRun
    from storage.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = Tracker(uri, "lines").start_run("train")
    printer = LineRun()
    printer.log_params({"n_embd": 64, "nested": {"a": 1}})
    printer.log_metrics({"loss": 2.5}, step=7)
    printer.log_artifact_bytes(b"\x89PNG\x00\xff", "plots/curve.png")
    printer.log_text("a table", "table.txt")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(line.startswith("gptpipe.mlflow ") for line in lines)

    receiver = TrainingRun(uri, run_id)
    assert all(receiver.log_line(line) for line in lines)
    for not_ours in (
        "step 7: loss 2.5",
        "gptpipe.mlflow {not json",
        'gptpipe.mlflow ["rm", "-rf"]',
        'gptpipe.mlflow ["log_params"]',
        'gptpipe.mlflow ["log_artifact_bytes", "%%", "x"]',
        # well-formed JSON, wrong shapes: refused before they reach the queue
        'gptpipe.mlflow ["log_metrics", 5]',
        'gptpipe.mlflow ["log_metrics", [1]]',
        'gptpipe.mlflow ["log_metrics", {"loss": 1.0}, 3]',
        'gptpipe.mlflow ["log_metrics", {"loss": "low"}, 3, 0]',
        'gptpipe.mlflow ["log_metrics", {"loss": 1.0}, true, 0]',
        'gptpipe.mlflow ["log_metrics", {"loss": 1.0}, 1.5, 0]',
        'gptpipe.mlflow ["log_params", ["n_embd", 64]]',
        'gptpipe.mlflow ["log_text", "a table", 3]',
        'gptpipe.mlflow ["log_dict", "{}", "d.json"]',
        'gptpipe.mlflow ["log_artifact_bytes", 7, "x.png"]',
        'gptpipe.mlflow [["log_params"], {}]',
        "gptpipe.mlflow [5]",
        "gptpipe.mlflow []",
        'gptpipe.mlflow {"log_params": {}}',
    ):
        assert not receiver.log_line(not_ours), not_ours
    receiver.close()

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.params["n_embd"] == "64" and run.data.params["nested.a"] == "1"
    [loss] = client.get_metric_history(run_id, "loss")
    assert (loss.step, loss.value) == (7, 2.5)
    curve = client.download_artifacts(run_id, "plots/curve.png", str(tmp_path))
    assert Path(curve).read_bytes() == b"\x89PNG\x00\xff"
    assert (
        Path(client.download_artifacts(run_id, "table.txt", str(tmp_path))).read_text() == "a table"
    )


def test_training_run_gives_up_sooner_only_while_open(tmp_path, monkeypatch):
    """MLflow reads its retry settings from the environment: a TrainingRun puts the shorter
    ones there while it is open, leaves a value the user set alone, and takes them out after."""
    from model.launch import TrainingRun
    from storage.tracking import MLFLOW_CLIENT_DEFAULTS, Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = Tracker(uri, "defaults").start_run("train")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    first, second = TrainingRun(uri, run_id), TrainingRun(uri, run_id)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"  # the user's setting wins
    first.close()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"  # the second run is still open
    second.close()
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert MLFLOW_CLIENT_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"


def test_closing_a_run_waits_on_a_dead_server_a_bounded_time(capfd):
    """A server that never answers: close() gives up after its timeout, with a warning, instead
    of waiting out MLflow's retries of every call still queued."""
    import time

    from model.launch import TrainingRun

    with socket.socket() as listener:  # accepts connections (the backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        run = TrainingRun(f"http://127.0.0.1:{listener.getsockname()[1]}", "0" * 32)
        for step in range(3):
            run.log_params({"step": step})
            run.log_metrics({"loss": 1.0}, step)
        start = time.monotonic()
        run.close(timeout=3)
        waited = time.monotonic() - start
    assert 2.5 < waited < 6
    assert "did not take the last tracking calls within 3 s" in capfd.readouterr().err


def _inputs(run) -> set[tuple[str, str]]:
    """(dataset name, context) of each of the run's MLflow dataset inputs."""
    return {
        (d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"])
        for d in run.inputs.dataset_inputs
    }


@pytest.mark.slow
def test_pipeline_on_s3_tracked_in_mlflow_server(
    s3_env, mlflow_server, cli_env, small_corpus, tmp_path
):
    s3 = boto3.client("s3", endpoint_url=s3_env.endpoint)
    s3.put_object(Bucket=s3_env.bucket, Key="corpus/small.txt", Body=small_corpus.read_bytes())
    store = f"s3://{s3_env.bucket}/store"
    env = _env(cli_env) | {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}

    def run(run_id: str, *extra: str):
        result = run_cli(
            [
                "run",
                "--input",
                f"s3://{s3_env.bucket}/corpus/small.txt",
                "--store",
                store,
                "--tracking-uri",
                mlflow_server,
                "--run-id",
                run_id,
                "--sample-tokens",
                "60",
                *TINY,
                *extra,
            ],
            env,
            tmp_path,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    first = run("first")

    # every stage's objects are in the bucket
    summary = json.loads(
        s3.get_object(Bucket=s3_env.bucket, Key="store/runs/first/summary.json")["Body"].read()
    )
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_env.bucket)["Contents"]}
    prefix = f"s3://{s3_env.bucket}/"
    for name in ("tokenizer", "tokens", "train", "val", "checkpoint", "samples"):
        uri = summary["outputs"][name]
        assert uri.startswith(f"{store}/") and uri.removeprefix(prefix) in keys, name
    assert "store/runs/first/samples.txt" in keys

    # one parent run, one nested run per stage
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("gptpipe")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parent = next(r for r in runs if r.info.run_name == "first")
    assert parent.info.run_id == summary["mlflow"]["run_id"]
    assert parent.info.status == "FINISHED"
    children = {
        r.info.run_name: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == STAGES
    assert all(r.info.status == "FINISHED" for r in children.values())

    # each stage records its inputs and outputs with sha256 and size, and its duration
    tok = children["tokenize"].data
    assert tok.params["tokenizer"] == "char" and tok.params["n_tokens"] == "60000"
    assert tok.params["output.tokens.uri"] == summary["outputs"]["tokens"]
    assert len(tok.params["output.tokens.sha256"]) == 64
    assert int(tok.params["output.tokens.bytes"]) > 0
    assert "duration_s" in tok.metrics
    assert children["tokenize"].inputs.dataset_inputs, "the corpus is logged as an MLflow input"
    assert children["split"].data.params["n_train_tokens"] == "54000"

    train = children["train"]
    assert train.data.params["n_params"] == str(summary["n_params"])
    assert train.data.params["world_size"] == "1" and train.data.params["device"] == "cpu"
    assert train.data.params["n_embd"] == "64" and train.data.params["max_iters"] == "60"
    assert "n_params_by_group.blocks_attention_qkv" in train.data.params
    val_history = client.get_metric_history(train.info.run_id, "val_loss")
    assert sorted(m.step for m in val_history) == [0, 30, 60]
    assert val_history[-1].value < val_history[0].value
    for name in ("lr", "tokens_per_sec", "mfu"):
        assert {m.step for m in client.get_metric_history(train.info.run_id, name)} == {20, 40, 60}
    # the splits are the train and evaluate runs' dataset inputs, in the contexts they serve
    assert _inputs(train) == {("train", "training"), ("val", "evaluation")}
    assert _inputs(children["evaluate"]) == {("train", "evaluation"), ("val", "evaluation")}
    for d in train.inputs.dataset_inputs:
        assert json.loads(d.dataset.source)["uri"] == summary["outputs"][d.dataset.name]
    # MLflow's system metrics were sampled while the training ran
    for name in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        assert client.get_metric_history(train.info.run_id, name), name
    train_artifacts = {a.path for a in client.list_artifacts(train.info.run_id)}
    assert {"parameter_table.txt", "parameter_table.json", "loss_curve.png"} <= train_artifacts
    # rank 0 prints its calls and the train task sends them: binary artifacts arrive whole
    curve = Path(client.download_artifacts(train.info.run_id, "loss_curve.png", str(tmp_path)))
    folder = summary["outputs"]["checkpoint"].removeprefix(f"s3://{s3_env.bucket}/")
    stored = s3.get_object(Bucket=s3_env.bucket, Key=folder.rsplit("/", 1)[0] + "/loss_curve.png")
    assert curve.read_bytes() == stored["Body"].read() and curve.read_bytes().startswith(b"\x89PNG")

    evaluate = children["evaluate"].data.metrics
    assert evaluate["val_loss"] == pytest.approx(summary["val_loss"])
    assert "samples.txt" in {a.path for a in client.list_artifacts(children["sample"].info.run_id)}

    # the model is registered and holds the champion alias
    name = summary["model"]["name"]
    assert name == "gptpipe-small-char"
    assert client.get_model_version_by_alias(name, "champion").version == "1"

    # a worse model (fewer iterations) is registered but does not take the alias; measured the
    # same way (val data, tokenizer, batches, device), the champion's recorded loss is used
    second = run("second", "--set", "max_iters=5", "--set", "eval_interval=5")
    assert "champion unchanged" in second.stdout
    assert "as recorded on the same val data" in second.stdout
    versions = client.search_model_versions(f"name = '{name}'")
    assert {v.version for v in versions} == {"1", "2"}
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert client.get_model_version_by_alias(name, "challenger").version == "2"  # it lost
    # evaluated with other batches (eval_iters), the champion is evaluated afresh on them
    third = run(
        "third", "--set", "max_iters=5", "--set", "eval_interval=5", "--set", "eval_iters=3"
    )
    assert "champion unchanged" in third.stdout and "as recorded" not in third.stdout
    assert "on the same val data" in third.stdout
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert client.get_model_version_by_alias(name, "challenger").version == "3"  # the latest
    # each version's logged model carries its training's final val loss (not the untrained
    # step 0's), and MLflow ranks the models by it
    sources = {v.source for v in client.search_model_versions(f"name = '{name}'")}
    ranked = [
        model
        for model in client.search_logged_models(
            experiment_ids=[experiment.experiment_id],
            order_by=[{"field_name": "metrics.val_loss", "ascending": True}],
        )
        if f"models:/{model.model_id}" in sources  # other tests' models may share the experiment
    ]
    val_losses = [[m.value for m in model.metrics if m.key == "val_loss"] for model in ranked]
    assert [len(losses) for losses in val_losses] == [1, 1, 1], [
        [(m.value, m.run_id, m.step, m.timestamp) for m in model.metrics if m.key == "val_loss"]
        for model in ranked
    ]
    assert val_losses[0] == [val_history[-1].value]  # the champion's, the best
    assert val_losses == sorted(val_losses)

    # sampling from the registry works
    sampled = run_cli(
        [
            "sample",
            "--model",
            f"models:/{name}@champion",
            "--tracking-uri",
            mlflow_server,
            "--max-new-tokens",
            "30",
            "--prompt",
            "ROMEO:",
        ],
        env,
        tmp_path,
    )
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("ROMEO:")

    # no secret anywhere in MLflow or in what the runs printed
    run_ids = [r.info.run_id for r in client.search_runs([experiment.experiment_id])]
    everything = _all_text_in_mlflow(client, run_ids, tmp_path / "artifacts")
    printed = "".join(r.stdout + r.stderr for r in (first, second, third))
    in_prefect = _all_text_in_prefect(cli_env["PREFECT_API_URL"])
    assert "first" in in_prefect  # the flow runs' parameters and artifacts were really read
    for secret in (s3_env.secret, MLFLOW_SERVER_SECRET):
        assert secret not in everything
        assert secret not in printed
        assert secret not in in_prefect
    assert summary["outputs"]["tokens"] in everything  # the search looked at real content


def test_mlflow_client_settings_restore_the_environment(monkeypatch):
    """The one place MLflow's client settings are applied: inside the block MLflow reads them,
    a value the user set wins, and after it the process environment is what it was."""
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    from storage.tracking import mlflow_client_settings

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")  # the user's
    before = dict(os.environ)
    with mlflow_client_settings(
        {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "9"}
    ):
        assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 2
        assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 7  # the user's setting wins
    assert dict(os.environ) == before
    with pytest.raises(RuntimeError), mlflow_client_settings():  # the defaults; restored on errors
        assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 3
        raise RuntimeError
    assert dict(os.environ) == before

    # blocks that overlap, closed first-opened-first (two TrainingRuns): the last one restores
    first, second = mlflow_client_settings(), mlflow_client_settings()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 3
    second.__exit__(None, None, None)
    assert dict(os.environ) == before


def test_rank_zero_tracking_is_chosen_by_arguments_not_the_environment(monkeypatch):
    """model.train's --track-stdout / --mlflow-run-id pick rank 0's run; the tracking factory
    itself never reads os.environ ($GPTPIPE_MLFLOW_RUN_ID is only --mlflow-run-id's default)."""
    from model.launch import RUN_ID_ENV, LineRun, TrainingRun, training_run
    from model.train import parse_args
    from storage.tracking import NullRun

    required = ["--train", "t", "--val", "v", "--tokenizer", "k", "--out", "o"]
    monkeypatch.delenv(RUN_ID_ENV, raising=False)
    monkeypatch.setenv("GPTPIPE_TRACK_STDOUT", "1")  # no longer a way in
    args = parse_args(required)
    assert (args.track_stdout, args.mlflow_run_id) == (False, None)
    assert isinstance(training_run(True), NullRun)
    args = parse_args([*required, "--track-stdout", "--mlflow-run-id", "abc"])
    assert (args.track_stdout, args.mlflow_run_id) == (True, "abc")
    assert isinstance(training_run(True, track_stdout=True, run_id="abc"), LineRun)
    assert isinstance(training_run(False, track_stdout=True, run_id="abc"), NullRun)

    monkeypatch.setenv(RUN_ID_ENV, "from-env")  # torchrun by hand, the variable on every node
    assert parse_args(required).mlflow_run_id == "from-env"
    assert parse_args([*required, "--mlflow-run-id", "given"]).mlflow_run_id == "given"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")  # never contacted: not used
    run = training_run(True, run_id="0" * 32, tracking_uri="sqlite:///:memory:")
    try:
        assert isinstance(run, TrainingRun) and run.run_id == "0" * 32
        assert run._tracking_uri == "sqlite:///:memory:"
    finally:
        run.close(timeout=5)
