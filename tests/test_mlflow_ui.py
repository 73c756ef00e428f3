"""The MLflow UI of a real `mlflow server` after a pipeline run, in headless Chromium.

One pipeline run is tracked in the session's MLflow server (artifacts proxied to S3); then the
browser checks what a person would look for: the pipeline run and its stage runs nested under it,
the train run's train/val loss charts, and the sample run's samples.txt shown as text. A
screenshot of each view is saved in the test's tmp folder, and copied to $GPTPIPE_SCREENSHOTS when
that is set.
"""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli, seed_preset
from tests.ui_helpers import Screenshots, browser_missing, chromium_page

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or ""),
]

RUN_ID = "ui-e2e"
# An experiment and a registered model of its own, so that the other tests sharing the session's
# MLflow server see neither this run nor a model version from it.
EXPERIMENT = "gptpipe-ui"
MODEL_NAME = "gptpipe-ui-small-char"
STAGES = ("data_check", "tokenize", "split", "train", "evaluate", "sample")
TINY = seed_preset(max_iters=60, eval_interval=10, eval_iters=5, batch_size=16, log_interval=20)
LOSSES = ("train_loss", "val_loss")

# Keep the MLflow Assistant side panel from opening on first load: it takes a third of the width
# (cosmetic only; the checks don't depend on it).
QUIET_ASSISTANT = """
window.localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
window.localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
"""


def _fragment(text: str) -> str:
    """The longest line of the sample: a piece of text the artifact viewer must show."""
    return max((line.strip() for line in text.splitlines()), key=len)


def test_mlflow_ui_shows_pipeline_run_stages_losses_and_samples(
    mlflow_server, cli_env, small_corpus, tmp_path
):
    from playwright.sync_api import expect

    store = tmp_path / "store"
    result = run_cli(
        [
            "run",
            "--input",
            str(small_corpus),
            "--store",
            str(store),
            "--tracking-uri",
            mlflow_server,
            "--experiment",
            EXPERIMENT,
            "--model-name",
            MODEL_NAME,
            "--run-id",
            RUN_ID,
            "--prompt",
            "ROMEO:",
            "--sample-tokens",
            "120",
            *TINY,
        ],
        cli_env,
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # What the UI must show, from the tracking API and the store
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = client.search_runs([experiment_id], max_results=100)
    parent = next(r for r in runs if r.info.run_name == RUN_ID)
    children = {
        r.info.run_name: r.info.run_id
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == set(STAGES)
    points = {m: len(client.get_metric_history(children["train"], m)) for m in LOSSES}
    assert points == {"train_loss": 7, "val_loss": 7}  # steps 0, 10, ..., 60
    sample_text = (store / "runs" / RUN_ID / "samples.txt").read_text(encoding="utf-8")
    fragment = _fragment(sample_text)
    assert sample_text.startswith("ROMEO:") and len(fragment) > 10

    shots = Screenshots(tmp_path / "screenshots")
    page_errors: list[str] = []
    step = "start"
    with chromium_page(mlflow_server) as page:
        page.on("pageerror", lambda error: page_errors.append(str(error)))
        page.add_init_script(QUIET_ASSISTANT)
        try:
            # 1. The experiment's runs: the pipeline run, its stage runs nested under it
            step = "experiment"
            page.goto(f"{mlflow_server}/#/experiments/{experiment_id}/runs")
            parent_link = page.locator(f'a[href$="/runs/{parent.info.run_id}"]')
            expect(parent_link).to_have_text(RUN_ID)
            toggle = page.get_by_text("Model training", exact=True)  # MLflow 3's ML/GenAI switch
            if toggle.count():
                toggle.click()
                expect(parent_link).to_be_visible()

            def stage_link(stage: str):
                return page.locator(f'a[href$="/runs/{children[stage]}"]')

            for stage in STAGES:  # collapsed under the parent at first
                expect(stage_link(stage)).to_have_count(0)
            parent_row = page.get_by_role("row").filter(has=parent_link)
            parent_row.locator('[col-id*="Run Name"] button').click()  # the expander
            for stage in STAGES:
                expect(stage_link(stage)).to_have_text(stage)
                expect(stage_link(stage)).to_be_visible()
            shots.take(page, "mlflow-experiment-runs")

            # 2. The train run's model metrics: a train_loss and a val_loss chart with every point
            step = "train-metrics"
            stage_link("train").click()
            expect(page).to_have_url(
                f"{mlflow_server}/#/experiments/{experiment_id}/runs/{children['train']}"
            )
            page.get_by_text("Model metrics", exact=True).click()
            page.get_by_placeholder("Search metric charts").fill("_loss")
            cards = page.get_by_test_id("experiment-view-compare-runs-card")
            expect(cards).to_have_count(len(LOSSES))
            for metric in LOSSES:
                card = cards.filter(has_text=metric)
                expect(card).to_have_count(1)
                expect(card.locator("svg.main-svg").first).to_be_visible()
                expect(card.locator("path.js-line")).not_to_have_count(0)  # the curve
                expect(card.locator("path.point")).to_have_count(points[metric])  # its markers
            shots.take(page, "mlflow-train-loss-charts")

            # 3. The sample run's artifacts: samples.txt listed, its text shown
            step = "sample-artifacts"
            page.goto(
                f"{mlflow_server}/#/experiments/{experiment_id}/runs/{children['sample']}/artifacts"
            )
            node = page.get_by_test_id("artifact-tree-node").filter(has_text="samples.txt")
            node.click()
            expect(page.locator("main")).to_contain_text(fragment)
            shots.take(page, "mlflow-sample-artifact")
        except Exception as error:
            failure = shots.take(page, f"failure-{step}")
            raise AssertionError(
                f"MLflow UI check failed at step {step!r} ({page.url}); screenshot {failure}; "
                f"page errors: {page_errors or 'none'}"
            ) from error

    assert [p.name for p in shots.saved] == [
        "mlflow-experiment-runs.png",
        "mlflow-train-loss-charts.png",
        "mlflow-sample-artifact.png",
    ]
    assert all(p.stat().st_size > 10_000 for p in shots.saved)  # real renders, not blank pages
