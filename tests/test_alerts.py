"""Alerts and limits, against real servers: a local HTTP receiver collects what the runs send.

The runs are the real `gptpipe` command and the real nightly flow (Prefect's engine, the session's
Prefect server, tiny configs): a failure mid-run, a training past its time limit and a new
champion each deliver exactly one message, naming the run, the stage, the error and the links,
with no secret of the webhook URL or of the environment in it. Bad settings are one line before
any work.
"""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from tests.conftest import REPO, free_port, run_cli, seed_preset
from tests.quiet_http import QuietHTTPServer
from tests.test_cli_errors import assert_clean_error

TOKEN = "s3cr3t-7d41a9"  # in the webhook URL's query: never in a message
# MLflow's credentials in the environment (how gptpipe passes them on): never in a message
PASSWORD = "mlflow-pw-9c2e5b"
TINY = seed_preset(max_iters=20, eval_interval=10, eval_iters=2, batch_size=8, log_interval=10)


class Receiver:
    """An HTTP server in a thread that records the path and the JSON body of every POST."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict]] = []
        received = self.posts

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                received.append((self.path, json.loads(self.rfile.read(length))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def hook(self, name: str = "alerts") -> str:
        return f"{self.base}/hooks/{name}?token={TOKEN}"

    def messages(self, path: str, wait: float = 5.0) -> list[dict]:
        """The bodies posted to ``path`` (a moment's grace for one still on its way)."""
        deadline = time.monotonic() + wait
        while not self._at(path) and time.monotonic() < deadline:
            time.sleep(0.1)
        return self._at(path)

    def _at(self, path: str) -> list[dict]:
        return [body for at, body in self.posts if at.split("?")[0] == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture()
def env(cli_env) -> dict[str, str]:
    return {
        **cli_env,
        "MLFLOW_TRACKING_USERNAME": "alerts",
        "MLFLOW_TRACKING_PASSWORD": PASSWORD,
        "GPTPIPE_NOTIFY_URL": "",
    }


def drain_prefect_workers() -> None:
    """Send this process's queued Prefect logs and events now, while the server still answers
    (at exit, after the session's server stopped, they would retry for a minute)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)


def assert_links(message: dict, env: dict[str, str], *, mlflow: bool = True) -> None:
    """The flow run's page in the Prefect UI (the server's address less /api), the MLflow run
    (sqlite: its id and the database; none for a run stopped by its checks, before any work);
    and every fact in the text as well."""
    alert = message["alert"]
    ui = env["PREFECT_API_URL"].removesuffix("/api")
    assert alert["prefect_url"] == f"{ui}/runs/flow-run/{alert['flow_run_id']}"
    if not mlflow:
        assert alert["mlflow_run"] is None
    else:
        assert re.fullmatch(r"run [0-9a-f]{32} at sqlite:///.*/mlflow\.db", alert["mlflow_run"])
    for fact in ("error", "prefect_url", "mlflow_run", "flow_run", "flow_run_id"):
        assert alert[fact] is None or alert[fact] in message["text"], fact


def assert_safe(message: dict) -> None:
    shown = json.dumps(message)
    assert TOKEN not in shown and PASSWORD not in shown, shown


@pytest.mark.slow
def test_a_training_past_its_time_limit_sends_one_message(receiver, env, small_corpus, tmp_path):
    long = seed_preset(max_iters=100_000, eval_interval=50_000, eval_iters=2, log_interval=50)
    args = ["run", "--input", str(small_corpus), *long, "--store", str(tmp_path / "store")]
    start = time.monotonic()
    result = run_cli(
        [*args, "--run-id", "alert-slow", "--train-timeout", "3", "--notify", receiver.hook()],
        env,
        tmp_path,
        timeout=240,
    )
    took = time.monotonic() - start
    assert_clean_error(result, "the training ran longer than --train-timeout 3 s")
    assert "Retry 1/1" not in result.stdout + result.stderr  # a timed-out training is not retried

    (message,) = receiver.messages("/hooks/alerts")
    alert = message["alert"]
    assert message["title"] == "gptpipe run alert-slow timed out at stage train"
    assert (alert["run_id"], alert["stage"], alert["event"]) == ("alert-slow", "train", "timed out")
    assert alert["error"] == "Task run exceeded timeout of 3.0 second(s)"
    assert alert["flow"] == "gptpipe-pipeline"
    assert_links(message, env)
    assert_safe(message)
    # the training was stopped, not left running: no checkpoint came of it, the run ended soon
    assert not list((tmp_path / "store").glob("train/*/summary.json"))
    assert took < 120, took


NIGHTLY = """
import json, sys
from flows.nightly import nightly_retrain

params = json.loads(sys.argv[1])
store = params.pop("store")
for source, run_id in ((sys.argv[2], "nightly-broken"), (sys.argv[3], "nightly-binary")):
    try:
        nightly_retrain(**params, data={"source": source, "store": store}, run_id=run_id)
    except Exception as exc:
        print(run_id, "failed:", type(exc).__name__)
nightly_retrain(**params, data={"source": sys.argv[4], "store": store}, run_id="nightly-good")
"""


@pytest.mark.slow
def test_the_nightly_flow_reports_a_failed_subflow_once_and_a_new_champion(
    receiver, env, small_corpus, tmp_path
):
    """Its pipeline runs as a subflow: the nightly run's hooks find the stage inside it."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "corpus.bin"  # not empty: past the request's check, into the pipeline
    binary.write_bytes(bytes(range(256)) * 64)
    params = {
        "training": {
            "preset": "seed",
            "overrides": [
                *("max_iters=20", "eval_interval=10", "eval_iters=2", "log_interval=10"),
                "batch_size=8",
            ],
        },
        "compute": {"nproc": 1},
        "store": str(tmp_path / "store"),
        "tracking": {"model_name": "gptpipe-alerts-test"},
        "sampling": {"sample_tokens": 20},
        "alerts": {"timeout_seconds": 600, "train_timeout_seconds": 300},
    }
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            NIGHTLY,
            json.dumps(params),
            *map(str, (empty, binary, small_corpus)),
        ],
        env={**env, "GPTPIPE_NOTIFY_URL": receiver.hook("nightly")},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "nightly-broken failed: GptpipeError" in done.stdout
    assert "nightly-binary failed: GptpipeError" in done.stdout

    # one message per run: each failure (sent by the outermost flow only), then the champion
    failed, not_text, champion = receiver.messages("/hooks/nightly")
    assert len(receiver.posts) == 3
    # a corpus that is not text stops the pipeline subflow before tokenizing (issue 26)
    assert not_text["title"] == "gptpipe run nightly-binary failed at stage check-data"
    assert not_text["alert"]["flow"] == "nightly-retrain"
    assert "not text" in not_text["alert"]["error"], not_text["alert"]["error"]
    assert len(list((tmp_path / "store").glob("datasets/tokenize-*"))) == 1  # the good night's
    alert = failed["alert"]
    # the empty input is found by the run request's check, before any work (issue 27)
    assert failed["title"] == "gptpipe run nightly-broken failed at stage check-request"
    assert (alert["run_id"], alert["stage"], alert["event"]) == (
        "nightly-broken",
        "check-request",
        "failed",
    )
    assert alert["flow"] == "nightly-retrain"
    assert alert["error"] == f"input {empty} is empty; pass a non-empty UTF-8 text file"
    assert champion["title"] == (
        "gptpipe run nightly-good: gptpipe-alerts-test version 1 is the new champion"
    )
    assert "val loss" in champion["alert"]["model"]
    assert "no champion yet" in champion["alert"]["model"]
    assert_links(failed, env, mlflow=False)  # nothing was created for a run that never started
    assert_links(not_text, env)
    assert_links(champion, env)
    for message in (failed, not_text, champion):
        assert_safe(message)


@pytest.mark.parametrize("via", ["--notify", "GPTPIPE_NOTIFY_URL"])
def test_an_unreachable_notification_url_is_one_line_before_any_work(
    via, small_corpus, cli_env, tmp_path
):
    port = free_port()
    dead = f"http://127.0.0.1:{port}/hooks/alerts?token={TOKEN}"
    env = {**cli_env, "GPTPIPE_NOTIFY_URL": "" if via == "--notify" else dead}
    notify = ["--notify", dead] if via == "--notify" else []
    args = ["run", "--input", str(small_corpus), "--store", str(tmp_path / "store"), *notify]
    result = run_cli(args, env, tmp_path, timeout=60)
    assert_clean_error(result, f"cannot reach the notification URL http://127.0.0.1:{port}/…")
    assert TOKEN not in result.stdout + result.stderr
    assert not (tmp_path / "store").exists()


def test_a_negative_timeout_is_one_line_before_any_work(small_corpus, cli_env, tmp_path):
    args = ["run", "--input", str(small_corpus), "--store", str(tmp_path / "store")]
    result = run_cli([*args, "--timeout", "-5"], cli_env, tmp_path, timeout=60)
    assert_clean_error(result, "--timeout must be a positive number of seconds, got -5")
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("-5", "must be a positive number of seconds, got -5"),
        (0, "must be a positive number of seconds, got 0"),
        ("inf", "must be a positive number of seconds, got inf"),
        ("soon", "must be a number of seconds, got soon"),
        (True, "must be a number of seconds, got True"),
    ],
)
def test_a_time_limit_must_be_a_positive_number(value, fragment):
    from flows.alerts import check_timeout
    from storage.errors import GptpipeError

    with pytest.raises(GptpipeError, match=f"^timeout_seconds {fragment}$"):
        check_timeout(value, name="timeout_seconds")
    assert check_timeout(None, name="x") is None and check_timeout("90", name="x") == 90.0


def test_a_missing_block_or_an_unknown_url_is_one_line(prefect_server):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.alerts import NotifyTarget
    from storage.errors import GptpipeError

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        for spec, fragment in [
            ("block:no-such-block", "Prefect blocks of that name: none"),
            ("block:custom-webhook/no-such-block", "cannot load the Prefect block"),
            (f"nosuch://{TOKEN}@x/y", "is not one Apprise knows"),
            (f"http://127.0.0.1:port/?token={TOKEN}", "its port is not a number"),
        ]:
            with pytest.raises(GptpipeError, match=fragment) as raised:
                NotifyTarget(spec).check()
            assert TOKEN not in str(raised.value) and "\n" not in str(raised.value)


def test_apprise_urls_and_prefect_blocks_deliver_too(receiver, prefect_server):
    """An Apprise json:// URL and a saved CustomWebhookNotificationBlock, each on a tiny flow
    run of the real engine that fails in a task."""
    from prefect import flow, task
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.alerts import Alerter, NotifyTarget

    @task(name="doomed")
    def doomed():
        raise ValueError("no such thing\nsecond line")

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        block = CustomWebhookNotificationBlock(
            name="gptpipe-alerts-test",
            url=f"{receiver.base}/hooks/block",
            json_data={"text": "{{body}}", "title": "{{subject}}"},
        )
        block.save("gptpipe-alerts-test", overwrite=True)
        apprise_url = f"json://127.0.0.1:{receiver.server.server_address[1]}/hooks/apprise"
        for spec in (apprise_url, "block:gptpipe-alerts-test"):
            target = NotifyTarget(spec)
            target.check()

            @flow(name="alerts-test", **Alerter(target).hooks())
            def broken():
                doomed()

            with pytest.raises(ValueError):
                broken()
        drain_prefect_workers()

    (by_apprise,) = receiver.messages("/hooks/apprise")
    assert by_apprise["title"].endswith("failed at stage doomed")
    assert "error: ValueError: no such thing\n" in by_apprise["message"]
    (by_block,) = receiver.messages("/hooks/block")
    assert by_block["title"].endswith("failed at stage doomed")
    assert "error: ValueError: no such thing\n" in by_block["text"]
