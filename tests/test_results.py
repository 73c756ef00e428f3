"""The stages' typed results: what they record, and that Prefect carries them between processes.

The Prefect check is for real: a flow on the session's Prefect server, its tasks on a Dask cluster
of worker processes, each task's result persisted by Prefect's result store and read back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tasks.results import (
    Artifact,
    EvaluateResult,
    RegisterResult,
    SampleResult,
    SamplingSettings,
    SplitResult,
    TokenizeResult,
    Tracking,
    TrainResult,
    Workspace,
)


def test_an_artifact_is_measured_from_the_store(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_bytes(b'{"shards": []}')
    artifact = Artifact.of(str(path))
    assert artifact.sha256 == hashlib.sha256(b'{"shards": []}').hexdigest()
    assert artifact.size == 14
    # the stored manifests' shape, both ways
    assert artifact.to_dict() == {"uri": str(path), "sha256": artifact.sha256, "bytes": 14}
    assert Artifact.from_dict(artifact.to_dict()) == artifact
    with pytest.raises(dataclasses.FrozenInstanceError):
        artifact.uri = "elsewhere"  # type: ignore[misc]


def test_results_keep_the_summary_json_shape():
    tokens, tokenizer = Artifact("s3://b/d.json", "a" * 64, 10), Artifact("t.json", "b" * 64, 5)
    manifest = {
        "metadata": {"n_tokens": 100, "vocab_size": 65},
        "outputs": {"tokens": tokens.to_dict(), "tokenizer": tokenizer.to_dict()},
        "source": "corpus.txt",
    }
    tokenized = TokenizeResult.from_manifest(manifest, cached=True, mlflow_run_id="r1")
    assert tokenized.tokens == tokens and tokenized.tokenizer == tokenizer
    assert tokenized.to_dict() == {**manifest, "cached": True, "mlflow_run_id": "r1"}
    splits = SplitResult.from_manifest(
        {
            "metadata": {"val_shards": 1},
            "outputs": {"train": tokens.to_dict(), "val": tokens.to_dict()},
        },
        cached=False,
        mlflow_run_id=None,
    )
    assert splits.train == splits.val == tokens and splits.metadata == {"val_shards": 1}
    assert set(splits.to_dict()) == {"metadata", "outputs", "cached", "mlflow_run_id"}
    summary = {"step": 20, "n_params": 7, "world_size": 2, "history": [{"step": 0}]}
    trained = TrainResult(
        checkpoint=tokens,
        step=20,
        n_params=7,
        world_size=2,
        cached=False,
        model_uri="models:/m-1",
        mlflow_run_id="r2",
        summary=summary,
    )
    assert trained.to_dict()["history"] == [{"step": 0}]
    shown = trained.to_dict(history=False)
    assert "history" not in shown and shown["step"] == 20
    assert shown["outputs"] == {"checkpoint": tokens.to_dict()}
    json.dumps([tokenized.to_dict(), shown])  # summary.json stays JSON


def test_the_workspace_says_which_stages_run_again():
    workspace = Workspace(store="s3://bucket/team", refresh=frozenset({"split"}))
    assert workspace.refreshes("split") and not workspace.refreshes("train")
    assert workspace.tracking is None  # no tracking: the stages log nowhere
    assert Tracking(uri=None).experiment == "gptpipe"


# Every result type, built in a Dask worker process, persisted by Prefect and handed to a task in
# (possibly) another worker, then returned to the flow.
FLOW = textwrap.dedent(
    """
    import json, sys
    from distributed import LocalCluster
    from prefect import flow, task
    from prefect_dask import DaskTaskRunner
    from tasks import results as r

    def build():
        art = r.Artifact("file:///x", "0" * 64, 3)
        settings = r.SamplingSettings(prompt="O", max_new_tokens=5, top_k=3)
        return [
            art,
            r.Tracking(uri="http://mlflow:5000", experiment="e", parent_id="p"),
            r.Workspace(store="s", tracking=r.Tracking(uri=None), refresh=frozenset({"train"})),
            settings,
            r.TokenizeResult(
                tokens=art, tokenizer=art, metadata={"n_tokens": 3}, cached=False, source="src"
            ),
            r.SplitResult(train=art, val=art, metadata={"val_shards": 0}, cached=True),
            r.TrainResult(art, 1, 2, 1, False, None, None, {"history": [{"step": 0}]}),
            r.EvaluateResult(1.5, 1.6, 2, 4, 1337, "e"),
            r.SampleResult("ROMEO", ("a note",), settings, art, None),
            r.RegisterResult("m", "3", True, "3", None, "no champion yet"),
        ]

    @task(persist_result=True)
    def make(i: int):
        return build()[i]

    @task(persist_result=True)
    def check(value, i: int):
        assert value == build()[i] and type(value) is type(build()[i]), (i, value)
        return value

    @flow(persist_result=True)
    def carry():
        made = [make.submit(i) for i in range(len(build()))]
        return [check.submit(m, i).result() for i, m in enumerate(made)]

    if __name__ == "__main__":
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster:
            runner = DaskTaskRunner(address=cluster.scheduler_address)
            values = carry.with_options(task_runner=runner)()
        assert values == build(), values
        print(json.dumps([type(v).__name__ for v in values]))
    """
)


@pytest.mark.slow
def test_prefect_persists_and_carries_every_result_across_dask_workers(cli_env, tmp_path):
    pytest.importorskip("prefect_dask", reason="needs the dask extra")
    script = tmp_path / "carry.py"
    script.write_text(FLOW, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)],
        env={**cli_env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    names = json.loads(done.stdout.strip().splitlines()[-1])
    expected = [Artifact, Tracking, Workspace, SamplingSettings, TokenizeResult, SplitResult]
    expected += [TrainResult, EvaluateResult, SampleResult, RegisterResult]
    assert names == [t.__name__ for t in expected]
    # Prefect wrote each task's result into its result store (pickled), and the flow's
    stored = list((tmp_path / "prefect-home" / "storage").iterdir())
    assert len(stored) >= 2 * len(expected)
