"""Shared fixtures: the corpus, small tokenized data sets, a real Prefect server, the CLI."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures_s3 import moto_server, s3_env  # noqa: F401 - shared fixtures

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session", autouse=True)
def machine_cache(tmp_path_factory) -> Path:
    """Measured peaks and precision verdicts go to a folder of the session's (and of every
    process it starts), not the user's cache: each session measures this machine afresh."""
    folder = tmp_path_factory.mktemp("gptpipe-cache")
    os.environ["GPTPIPE_CACHE_DIR"] = str(folder)
    return folder


def yaml_blocks(path: Path) -> list[str]:
    """The ```yaml blocks of a markdown page, dedented, in order."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", path.read_text(encoding="utf-8"), re.M | re.S)
    return [textwrap.dedent(block) for block in blocks]


def bash_blocks(path: Path) -> list[str]:
    """The ```bash blocks of a markdown page, in order."""
    return re.findall(r"^```bash\n(.*?)^```", path.read_text(encoding="utf-8"), re.M | re.S)


def prefect_api(env: dict[str, str], path: str, body: dict) -> list[dict]:
    """POST ``body`` to the Prefect API at $PREFECT_API_URL of ``env`` (e.g. "flow_runs/filter")."""
    request = urllib.request.Request(
        f"{env['PREFECT_API_URL']}/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@contextlib.contextmanager
def served(cmd: list[str], health_url: str, timeout: float, log_path: Path, **popen):
    """A server process for the block: started, waited for until health_url answers, then
    stopped with its whole process group (servers that fork workers leave none behind)."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **popen
        )
        try:
            wait_for_http(health_url, timeout, proc)
            yield proc
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def children(pid: int) -> list[int]:
    """The processes whose parent is pid, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    """Every process below pid (children, theirs, ...)."""
    found, frontier = [], [pid]
    while frontier:
        kids = [c for p in frontier for c in children(p)]
        found += kids
        frontier = kids
    return found


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    if not CORPUS.is_file():
        pytest.skip(f"the Tiny Shakespeare corpus is not at {CORPUS} (shared/ is absent)")
    return CORPUS


@pytest.fixture(scope="session")
def small_corpus(corpus_path, tmp_path_factory) -> Path:
    """The first 60,000 characters: enough for a few real training steps in seconds."""
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(corpus_path.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def char_dataset(small_corpus, tmp_path_factory) -> dict[str, str]:
    """tokenizer.json, train.parquet and val.parquet of the small corpus, char-level."""
    from model.data import split_tokens, write_tokens
    from model.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("dataset")
    text = small_corpus.read_text(encoding="utf-8")
    tok = train_tokenizer("char", text)
    ids = tok.encode(text)
    (out / "tokenizer.json").write_text(tok.to_json(), encoding="utf-8")
    train_ids, val_ids = split_tokens(ids, 0.1, 32)
    for name, part in (("train", train_ids), ("val", val_ids)):
        buffer = io.BytesIO()
        write_tokens(part, buffer, {"vocab_size": tok.vocab_size, "n_tokens": len(part)})
        (out / f"{name}.parquet").write_bytes(buffer.getvalue())
    return {name: str(out / name) for name in ("tokenizer.json", "train.parquet", "val.parquet")}


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> str:
    """A real `prefect server start` on loopback for the session; yields its API URL."""
    with prefect_server_in(tmp_path_factory.mktemp("prefect-server-home")) as url:
        yield url


@contextlib.contextmanager
def prefect_server_in(home: Path):
    """A fresh `prefect server start` on loopback with its database in ``home``; its API URL."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    url = f"http://127.0.0.1:{port}/api"
    cmd = [
        sys.executable,
        "-m",
        "prefect",
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with served(cmd, f"{url}/health", 90, home / "server.log", env=env):
        yield url


@pytest.fixture()
def cli_env(prefect_server, tmp_path) -> dict[str, str]:
    """Environment for running the `gptpipe` command against the session's Prefect server."""
    home = tmp_path / "prefect-home"
    return {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "PREFECT_HOME": str(home),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "storage"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PYTHONUNBUFFERED": "1",
    }


def launch_on(data: dict[str, str], out: Path, config: dict, **launch):
    """`launch_training` of ``config`` on a prepared dataset (`char_dataset`) into ``out``."""
    from bench.common import prepared
    from model.config import config_from_dict
    from model.launch import launch_training

    return launch_training(config_from_dict(config), str(out), inputs=prepared(data), **launch)


def seed_preset(**sets: object) -> list[str]:
    """CLI flags for a small model: `--preset seed` and a `--set KEY=VALUE` per keyword."""
    return ["--preset", "seed", *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")]]


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300):
    """Run the real console script; returns the CompletedProcess (text)."""
    gptpipe = Path(sys.executable).with_name("gptpipe")
    return subprocess.run(
        [str(gptpipe), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


# The MLflow server's own S3 credentials; the pipeline's are another pair (see tests/fixtures_s3.py)
MLFLOW_SERVER_SECRET = "mlflow-server-secret-0d1f9e"


@pytest.fixture(scope="session")
def mlflow_server(moto_server, tmp_path_factory) -> str:  # noqa: F811
    """A real `mlflow server` (sqlite backend, artifacts proxied to a bucket on the moto server)."""
    import boto3

    home = tmp_path_factory.mktemp("mlflow-server")
    s3_settings = {
        "AWS_ACCESS_KEY_ID": "mlflow-server-key",
        "AWS_SECRET_ACCESS_KEY": MLFLOW_SERVER_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    boto3.client(
        "s3",
        endpoint_url=moto_server,
        **{
            "aws_access_key_id": s3_settings["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": MLFLOW_SERVER_SECRET,
            "region_name": "us-east-1",
        },
    ).create_bucket(Bucket="mlflow-artifacts")
    port = free_port()
    env = {
        **os.environ,
        **s3_settings,
        "MLFLOW_S3_ENDPOINT_URL": moto_server,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination",
        "s3://mlflow-artifacts/mlartifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with served(cmd, f"{url}/health", 120, home / "server.log", env=env, cwd=home):
        yield url
