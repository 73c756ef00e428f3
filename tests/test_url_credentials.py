"""An http(s) input with `user:password@`: sent as HTTP basic auth, and the password shown or
recorded nowhere (errors, logs, manifests, MLflow, Prefect's flow run parameters).

A real HTTP server on loopback demands the credentials; the runs go through the real CLI and a
real Prefect server.
"""

from __future__ import annotations

import base64
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from model.data import load_text
from storage.errors import GptpipeError
from tests.conftest import prefect_api, run_cli, seed_preset
from tests.quiet_http import QuietHTTPServer
from tests.test_cli_errors import assert_clean_error

USER, PASSWORD = "reader", "s3cret-7f1d2c"
TINY = seed_preset(max_iters=4, eval_interval=2, eval_iters=1, batch_size=4, log_interval=2)


class Server:
    """A static file server in a thread; records the Authorization header of each request."""

    def __init__(self, folder: Path, credentials: tuple[str, str] | None):
        self.authorizations: list[str | None] = []
        self.redirect_to: str | None = None  # set: every request is redirected there
        expected = None
        if credentials:
            expected = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):
                given = self.headers.get("Authorization")
                server.authorizations.append(given)
                if server.redirect_to:
                    self.send_response(302)
                    self.send_header("Location", server.redirect_to)
                    self.end_headers()
                elif expected and given != expected:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="corpus"')
                    self.end_headers()
                else:
                    super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str, userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def corpus_server(small_corpus) -> Iterator[Server]:
    """The small corpus, served only to USER:PASSWORD."""
    server = Server(small_corpus.parent, (USER, PASSWORD))
    yield server
    server.close()


def files_holding(folder: Path, secret: str) -> list[str]:
    """Every file under folder whose bytes contain secret (sqlite databases included)."""
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def flow_runs_of(cli_env: dict, shown_url: str) -> list[dict]:
    """The flow runs (of the session's Prefect server) whose `source` parameter is shown_url."""
    runs = prefect_api(
        cli_env, "flow_runs/filter", {"limit": 200, "sort": "EXPECTED_START_TIME_DESC"}
    )
    return [r for r in runs if r["parameters"].get("source") == shown_url]


def assert_prefect_holds_no_password(cli_env: dict, shown_url: str, n_runs: int) -> None:
    """Prefect stored the flow runs with the URL without credentials, and logged no password."""
    runs = flow_runs_of(cli_env, shown_url)
    assert len(runs) == n_runs, [r["parameters"] for r in runs]
    ids = [r["id"] for r in runs]
    logs = prefect_api(cli_env, "logs/filter", {"logs": {"flow_run_id": {"any_": ids}}})
    assert logs and PASSWORD not in json.dumps(runs) + json.dumps(logs)


# --------------------------------------------------------------------------- load_text


def test_credentials_in_a_url_are_sent_as_basic_auth(small_corpus, corpus_server):
    url = corpus_server.url(small_corpus.name, f"{USER}:{PASSWORD}@")
    assert load_text(url) == small_corpus.read_bytes()
    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert corpus_server.authorizations == [expected]


def test_percent_escaped_credentials_are_decoded(small_corpus):
    server = Server(small_corpus.parent, ("me@corp", "p:ss/word"))
    try:
        url = server.url(small_corpus.name, "me%40corp:p%3Ass%2Fword@")
        assert load_text(url) == small_corpus.read_bytes()
    finally:
        server.close()


@pytest.mark.parametrize("userinfo", [f"{USER}:wrong-{PASSWORD}@", ""], ids=["wrong", "none"])
def test_refused_credentials_are_an_error_without_them(userinfo, small_corpus, corpus_server):
    url = corpus_server.url(small_corpus.name, userinfo)
    with pytest.raises(GptpipeError) as info:
        load_text(url)
    message = str(info.value)
    assert "HTTP 401" in message and corpus_server.url(small_corpus.name) in message
    assert PASSWORD not in message and "\n" not in message


def test_unreachable_url_is_an_error_without_the_password():
    with pytest.raises(GptpipeError) as info:
        load_text(f"http://{USER}:{PASSWORD}@127.0.0.1:9/x.txt")
    assert "cannot download http://127.0.0.1:9/x.txt" in str(info.value)
    assert PASSWORD not in str(info.value)


def test_a_malformed_port_is_an_error_without_the_password():
    with pytest.raises(GptpipeError, match="invalid input URL") as info:
        load_text(f"http://{USER}:{PASSWORD}@127.0.0.1:port/x.txt")
    assert PASSWORD not in str(info.value)


def test_the_credentials_do_not_follow_a_redirect(small_corpus, corpus_server):
    """urllib copies a request's headers to wherever a redirect points, another host included;
    the Authorization header built from the URL must not go along."""
    other = Server(small_corpus.parent, None)
    try:
        corpus_server.redirect_to = other.url(small_corpus.name)
        assert load_text(corpus_server.url("x.txt", f"{USER}:{PASSWORD}@")) == (
            small_corpus.read_bytes()
        )
        assert corpus_server.authorizations[0] and other.authorizations == [None]
    finally:
        other.close()


# --------------------------------------------------------------------------- the real CLI


@pytest.mark.slow
def test_tokenize_with_credentials_in_the_url(small_corpus, corpus_server, cli_env, tmp_path):
    url = corpus_server.url(small_corpus.name, f"{USER}:{PASSWORD}@")
    shown = corpus_server.url(small_corpus.name)
    result = run_cli(
        ["tokenize", "--input", url, "--store", str(tmp_path / "store")], cli_env, tmp_path
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert f"tokenized {shown}:" in output and PASSWORD not in output
    manifest = next((tmp_path / "store").glob("datasets/tokenize-*/manifest.json"))
    assert json.loads(manifest.read_text(encoding="utf-8"))["source"] == shown
    assert files_holding(tmp_path, PASSWORD) == []
    assert_prefect_holds_no_password(cli_env, shown, n_runs=1)


@pytest.mark.slow
def test_run_with_credentials_in_the_url(small_corpus, corpus_server, cli_env, tmp_path):
    """The whole pipeline: nothing it writes (store, MLflow's sqlite database and artifacts,
    Prefect's local results) holds the password, and the MLflow params show the bare URL."""
    url = corpus_server.url(small_corpus.name, f"{USER}:{PASSWORD}@")
    shown = corpus_server.url(small_corpus.name)
    result = run_cli(
        [
            "run",
            "--input",
            url,
            *TINY,
            "--sample-tokens",
            "20",
            "--run-id",
            "auth",
            "--store",
            str(tmp_path / "store"),
        ],
        cli_env,
        tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert PASSWORD not in output
    assert files_holding(tmp_path, PASSWORD) == []
    summary = json.loads((tmp_path / "store" / "runs" / "auth" / "summary.json").read_text())
    assert summary["source"] == shown

    from mlflow import MlflowClient

    client = MlflowClient(cli_env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("gptpipe").experiment_id])
    sources = {r.info.run_name: r.data.params.get("source") for r in runs}
    assert sources["auth"] == shown and sources["tokenize"] == shown, sources
    assert_prefect_holds_no_password(cli_env, shown, n_runs=1)


@pytest.mark.slow
def test_wrong_credentials_are_one_error_line_without_them(
    small_corpus, corpus_server, cli_env, tmp_path
):
    url = corpus_server.url(small_corpus.name, f"{USER}:not-{PASSWORD}@")
    result = run_cli(
        ["tokenize", "--input", url, "--store", str(tmp_path / "store")], cli_env, tmp_path
    )
    assert_clean_error(result, "cannot download", corpus_server.url(small_corpus.name), "HTTP 401")
    assert PASSWORD not in result.stdout + result.stderr
    assert files_holding(tmp_path, PASSWORD) == []
