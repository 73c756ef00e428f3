"""Every kind of bad input, through the real command line.

The rule for each: one `error: ...` line on stderr that says what to fix, exit status 2, no
traceback anywhere, and nothing already in the store lost or left half-written.

Config and resource errors fail before the Prefect flow starts; input errors fail inside the
flow's tokenize or split task (a flow start each); sampling errors need no flow.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port, run_cli, seed_preset, served
from tests.test_cli_errors import assert_clean_error

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
# a model that trains in a second: the seed preset (block_size 8, val_fraction 0.1), tiny steps
TINY = seed_preset(max_iters=4, eval_interval=2, eval_iters=1, batch_size=4, log_interval=2)


def error_line(result, *fragments: str) -> str:
    """assert_clean_error, and the error line itself."""
    assert_clean_error(result, *fragments)
    return next(line for line in result.stderr.splitlines() if line.startswith("error: "))


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_nothing_half_written(store: Path) -> None:
    """No temporary files left behind; every stage folder that holds files is complete."""
    if not store.exists():
        return
    leftovers = [p for p in store.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers
    for folder in [*store.glob("datasets/*"), *store.glob("models/*")]:
        if any(folder.iterdir()):
            assert (folder / "manifest.json").is_file(), f"{folder} has files but no manifest"


def gptpipe_run(source, store: Path, env, cwd: Path, *extra: str, timeout: float = 120):
    args = ["run", "--input", str(source), *TINY, "--store", str(store), *extra]
    return run_cli(args, env, cwd, timeout=timeout)


def train_module(args: list[str], cwd: Path, timeout: float = 120):
    """`python -m model.train ...`, without any MLflow run to log into."""
    env = {k: v for k, v in os.environ.items() if k != "GPTPIPE_MLFLOW_RUN_ID"}
    return subprocess.run(
        [sys.executable, "-m", "model.train", *args],
        env={**env, "PYTHONUNBUFFERED": "1"},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_args(data: dict[str, str], out: Path, **paths: str) -> list[str]:
    """model.train's arguments for the char data set; `paths` replaces train/val/tokenizer."""
    return [
        "--train",
        paths.get("train", data["train.parquet"]),
        "--val",
        paths.get("val", data["val.parquet"]),
        "--tokenizer",
        paths.get("tokenizer", data["tokenizer.json"]),
        "--out",
        str(out),
        *TINY[:2],
        "--set",
        "max_iters=2",
        "--set",
        "eval_iters=1",
        "--set",
        "batch_size=4",
        "--set",
        "log_interval=1",
    ]


@pytest.fixture(scope="module")
def trained(char_dataset, tmp_path_factory) -> Path:
    """A real checkpoint folder (ckpt.pt, summary.json) from 2 steps of `python -m model.train`."""
    out = tmp_path_factory.mktemp("trained") / "out"
    result = train_module(train_args(char_dataset, out), out.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.fixture()
def checkpoint(trained) -> str:
    return str(trained / "ckpt.pt")


# ============================================================================ input


def test_input_missing_path(cli_env, tmp_path):
    result = gptpipe_run(tmp_path / "nope.txt", tmp_path / "store", cli_env, tmp_path)
    error_line(result, "input file not found", "nope.txt", "--input PATH")
    assert not (tmp_path / "store" / "datasets").exists()


def test_input_unreachable_url(cli_env, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/x"
    result = gptpipe_run(url, tmp_path / "store", cli_env, tmp_path)
    error_line(result, f"cannot download {url}", "pass --input PATH to a local text file")
    assert not (tmp_path / "store" / "datasets").exists()


def test_input_empty_file(cli_env, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    result = gptpipe_run(empty, tmp_path / "store", cli_env, tmp_path)
    error_line(result, "is empty", "non-empty UTF-8 text file")
    assert not (tmp_path / "store" / "datasets").exists()


@pytest.mark.slow
def test_input_binary_file(cli_env, tmp_path):
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"some text\x00\x01\x02\xff" * 100)
    result = gptpipe_run(binary, tmp_path / "store", cli_env, tmp_path)
    error_line(result, "looks binary", "NUL byte at offset 9", "UTF-8 text file")
    assert not (tmp_path / "store" / "datasets").exists()


@pytest.mark.slow
def test_input_not_utf8(cli_env, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Ça va, très bien.\n".encode("latin-1") * 50)
    result = gptpipe_run(latin1, tmp_path / "store", cli_env, tmp_path)
    error_line(result, "is not UTF-8 text", "invalid byte 0xc7 at offset 0", "convert it to UTF-8")
    assert not (tmp_path / "store" / "datasets").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("val_fraction", "fragments"),
    [
        ("0.1", ["the validation split has 3 tokens", "block_size=8", "larger val_fraction"]),
        ("0.9", ["the train split has 2 tokens", "block_size=8", "smaller val_fraction"]),
    ],
    ids=["val-too-short", "train-too-short"],
)
def test_input_too_short_for_a_split(val_fraction, fragments, cli_env, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij" * 3, encoding="utf-8")  # 30 characters
    store = tmp_path / "store"
    result = gptpipe_run(short, store, cli_env, tmp_path, "--set", f"val_fraction={val_fraction}")
    error_line(result, *fragments)
    assert not list(store.glob("datasets/split-*"))
    assert_nothing_half_written(store)


def test_input_empty_directory(cli_env, tmp_path):
    """A directory is a corpus of many files (tests/test_sharding.py); an empty one is an error."""
    folder = tmp_path / "corpora"
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "config").write_text("dot folders are not corpus")
    result = gptpipe_run(folder, tmp_path / "store", cli_env, tmp_path)
    error_line(result, f"input directory {folder} has no files; put text files in it")


def test_input_missing_s3_object(s3_env, small_corpus, cli_env, tmp_path):
    env = {**cli_env, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}
    uri = f"{s3_env.uri}/corpora/nope.txt"
    result = gptpipe_run(uri, tmp_path / "store", env, tmp_path)
    error_line(result, f"--input {uri}: no such object")
    assert s3_env.secret not in result.stdout + result.stderr
    assert not (tmp_path / "store" / "runs").exists()


# ============================================================================ config


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "my.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


CONFIG_CASES = {
    "n_embd-not-divisible-by-n_head": (
        lambda tmp: ["--set", "n_embd=65", "--set", "n_head=4"],
        ["n_embd (65) must be divisible by n_head (4)"],
    ),
    "n_layer-0": (lambda tmp: ["--set", "n_layer=0"], ["n_layer must be positive, got 0"]),
    "batch_size-negative": (
        lambda tmp: ["--set", "batch_size=-1"],
        ["batch_size must be positive, got -1"],
    ),
    "val_fraction-0": (
        lambda tmp: ["--set", "val_fraction=0"],
        ["val_fraction must be between 0 and 1 (exclusive), got 0.0"],
    ),
    "val_fraction-1.5": (
        lambda tmp: ["--set", "val_fraction=1.5"],
        ["val_fraction must be between 0 and 1 (exclusive), got 1.5"],
    ),
    "unknown-set-key": (
        lambda tmp: ["--set", "n_layers=2"],
        ["--set n_layers=2: unknown key 'n_layers'", "known keys:", "n_layer"],
    ),
    "wrong-type": (
        lambda tmp: ["--set", "max_iters=many"],
        ["max_iters='many' is not valid, expected an integer"],
    ),
    "set-without-equals": (lambda tmp: ["--set", "max_iters"], ["expected key=value"]),
    "non-finite-float": (
        lambda tmp: ["--set", "learning_rate=inf"],
        ["learning_rate='inf' is not valid, expected a finite number"],
    ),
    "beta-out-of-range": (lambda tmp: ["--set", "beta2=1.5"], ["beta2 must be in [0, 1)"]),
    "seed-too-big": (lambda tmp: ["--set", "seed=1e30"], ["seed must fit in 64 bits"]),
    "yaml-does-not-parse": (
        lambda tmp: ["--config", _yaml(tmp, "max_iters: [1, 2\nn_layer: 3\n")],
        ["is not valid YAML: line 2, column", "my.yaml"],
    ),
    "yaml-is-a-list": (
        lambda tmp: ["--config", _yaml(tmp, "- max_iters\n- 200\n")],
        ["my.yaml must be a mapping of key: value lines"],
    ),
    "yaml-unknown-key": (
        lambda tmp: ["--config", _yaml(tmp, "max_iter: 200\n")],
        ["--config", "unknown key 'max_iter'"],
    ),
    "config-file-missing": (
        lambda tmp: ["--config", str(tmp / "missing.yaml")],
        ["--config: file not found:", "missing.yaml"],
    ),
    "unknown-preset": (
        lambda tmp: ["--preset", "huge"],
        ["unknown preset 'huge'; available: cpu, fast, lecture, seed"],
    ),
    "refresh-unknown-stage": (
        lambda tmp: ["--refresh", "tokenise"],
        ["--refresh tokenise: not a cached stage", "tokenize, split, train or all"],
    ),
    "sample-tokens-negative": (
        lambda tmp: ["--sample-tokens", "-1"],
        ["--sample-tokens must not be negative"],
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config(case, small_corpus, cli_env, tmp_path):
    make_args, fragments = CONFIG_CASES[case]
    result = gptpipe_run(small_corpus, tmp_path / "store", cli_env, tmp_path, *make_args(tmp_path))
    error_line(result, *fragments)
    assert not (tmp_path / "store").exists()  # refused before the store is even created


# ============================================================================ sampling


def sample(args: list[str], cli_env, tmp_path: Path):
    return run_cli(["sample", *args], cli_env, tmp_path, timeout=120)


def test_sample_prompt_with_unknown_characters(checkpoint, cli_env, tmp_path):
    result = sample(["--checkpoint", checkpoint, "--prompt", "héllo €uro"], cli_env, tmp_path)
    error_line(result, "does not know: 'é', '€'", "use only characters of the training corpus")
    assert result.stdout == ""


def test_sample_prompt_longer_than_block_size_is_cropped(checkpoint, cli_env, tmp_path):
    prompt = "ROMEO: " * 4  # 28 characters, block_size is 8
    args = ["--checkpoint", checkpoint, "--prompt", prompt, "--max-new-tokens", "10"]
    result = sample(args, cli_env, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(prompt)
    assert len(result.stdout.rstrip("\n")) >= len(prompt) + 1
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "more than block_size 8" in notes[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_sample_checkpoint_that_does_not_exist(cli_env, tmp_path):
    missing = tmp_path / "runs" / "nope" / "ckpt.pt"
    result = sample(["--checkpoint", str(missing)], cli_env, tmp_path)
    error_line(result, "not found", str(missing))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_sample_corrupt_checkpoint(damage, checkpoint, cli_env, tmp_path):
    raw = Path(checkpoint).read_bytes()
    content = {"truncated": raw[: len(raw) // 2], "garbage": os.urandom(4096), "empty": b""}
    path = tmp_path / "ckpt.pt"
    path.write_bytes(content[damage])
    line = error_line(
        sample(["--checkpoint", str(path)], cli_env, tmp_path), "corrupt or truncated"
    )
    assert str(path) in line and len(line) < 300


class RunsCode:
    """Unpickling this opens (creates) a marker file: arbitrary code on load."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _check_payload_is_live(tmp_path: Path) -> None:
    """The control: a plain unpickling of the payload does run it."""
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(RunsCode(control)))
    assert control.exists()


def test_sample_checkpoint_with_a_pickled_payload_is_refused(checkpoint, cli_env, tmp_path):
    _check_payload_is_live(tmp_path)
    marker = tmp_path / "pwned"
    ckpt = torch.load(checkpoint, weights_only=True)
    path = tmp_path / "evil.pt"
    torch.save({**ckpt, "extra": RunsCode(marker)}, path)  # a real checkpoint, plus the payload
    error_line(sample(["--checkpoint", str(path)], cli_env, tmp_path), "refusing to load", "open")
    assert not marker.exists()


def test_sample_plain_pickle_file_is_refused(cli_env, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": RunsCode(marker), "config": {}}))
    error_line(sample(["--checkpoint", str(path)], cli_env, tmp_path), "not a readable checkpoint")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["no-model_config", "weights-of-another-shape"])
def test_sample_checkpoint_that_is_not_usable(damage, checkpoint, cli_env, tmp_path):
    ckpt = torch.load(checkpoint, weights_only=True)
    if damage == "no-model_config":
        del ckpt["model_config"]
    else:
        ckpt["model_config"] = {**ckpt["model_config"], "n_embd": 32}
    path = tmp_path / "edited.pt"
    torch.save(ckpt, path)
    result = sample(["--checkpoint", str(path)], cli_env, tmp_path)
    error_line(result, f"{path} is not a usable gptpipe checkpoint")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--top-k", "0"], "top_k must be at least 1, got 0"),
        (["--max-new-tokens", "-5"], "max_new_tokens must not be negative, got -5"),
        (["--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["--temperature", "nan"], "temperature must be a finite number >= 0, got nan"),
        (["--seed", str(2**70)], "seed must fit in 64 bits"),
    ],
    ids=[
        "top-k-0",
        "max-new-tokens-negative",
        "temperature-negative",
        "temperature-nan",
        "seed-too-big",
    ],
)
def test_sample_bad_setting(args, fragment, checkpoint, cli_env, tmp_path):
    result = sample(["--checkpoint", checkpoint, *args], cli_env, tmp_path)
    error_line(result, fragment)
    assert result.stdout == ""


# ============================================================================ another tokenizer


def _other_tokenizer(tokenizer_json: str, same_size: bool) -> str:
    vocab = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))["vocab"]
    # still sorted: 'é' sorts after every ASCII character
    other = vocab[:-1] + ["é"] if same_size else vocab + ["é"]
    return json.dumps({"kind": "char", "vocab": other}, ensure_ascii=False)


@pytest.mark.parametrize("same_size", [True, False], ids=["same-vocab-size", "other-vocab-size"])
def test_train_resume_with_another_tokenizer(same_size, trained, char_dataset, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    before = snapshot(out)
    tokenizer = tmp_path / "other-tokenizer.json"
    tokenizer.write_text(_other_tokenizer(char_dataset["tokenizer.json"], same_size), "utf-8")
    args = [*train_args(char_dataset, out, tokenizer=str(tokenizer)), "--set", "max_iters=3"]
    result = train_module([*args, "--resume"], tmp_path)
    error_line(result, "tokenizer")
    assert snapshot(out) == before  # the checkpoint made with the other tokenizer is kept


def test_train_resume_with_another_model_shape(trained, char_dataset, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    before = snapshot(out)
    args = [*train_args(char_dataset, out), "--set", "n_embd=32", "--set", "max_iters=3"]
    result = train_module([*args, "--resume"], tmp_path)
    error_line(result, "n_embd")
    assert snapshot(out) == before


# ============================================================================ resources


@NO_GPU
def test_device_cuda_without_a_gpu(small_corpus, cli_env, tmp_path):
    result = gptpipe_run(
        small_corpus, tmp_path / "store", cli_env, tmp_path, "--set", "device=cuda"
    )
    error_line(result, "device=cuda, but no CUDA GPU is visible here", "--set device=cpu")
    assert not (tmp_path / "store").exists()


@NO_GPU
def test_sample_device_cuda_without_a_gpu(checkpoint, cli_env, tmp_path):
    result = sample(["--checkpoint", checkpoint, "--device", "cuda"], cli_env, tmp_path)
    error_line(result, "device=cuda was asked for but no CUDA device is visible")


def test_nproc_zero(small_corpus, cli_env, tmp_path):
    result = gptpipe_run(small_corpus, tmp_path / "store", cli_env, tmp_path, "--nproc", "0")
    error_line(result, "--nproc must be at least 1, got 0")
    assert not (tmp_path / "store").exists()


def _s3_env(cli_env: dict, tmp_path: Path, endpoint: str) -> dict:
    """cli_env with S3 settings for endpoint, and nothing from ~/.aws or instance metadata."""
    env = {k: v for k, v in cli_env.items() if not k.startswith("AWS_")}
    return {
        **env,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "unknown-key",
        "AWS_SECRET_ACCESS_KEY": "bad-input-SECRET-9f3k",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.mark.parametrize("endpoint", ["closed-port", "never-answers"])
def test_unreachable_s3_store(endpoint, small_corpus, cli_env, tmp_path):
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = free_port() if endpoint == "closed-port" else silent.getsockname()[1]
        env = _s3_env(cli_env, tmp_path, f"http://127.0.0.1:{port}")
        start = time.monotonic()
        result = gptpipe_run(small_corpus, "s3://bucket/store", env, tmp_path, timeout=90)
        elapsed = time.monotonic() - start
    expected = "cannot reach the S3 endpoint" if endpoint == "closed-port" else "did not answer"
    error_line(result, expected, f"127.0.0.1:{port}")
    assert "bad-input-SECRET-9f3k" not in result.stdout + result.stderr
    # preflight gives up within ~10 s; the rest is the command's start (imports) on a busy box
    assert elapsed < 40, elapsed


@pytest.fixture()
def moto_with_auth(tmp_path):
    """A moto S3 server of our own, in its own process, that checks credentials.

    moto keeps the auth switch in a process-wide setting, so it is not flipped on the session's
    shared server (other tests, and the MLflow server's artifacts, use that one).
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)]
    with served(cmd, f"{url}/moto-api/", 30, tmp_path / "moto.log"):
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        s3.create_bucket(Bucket="guarded")
        request = urllib.request.Request(
            f"{url}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        yield url


def test_refused_s3_credentials(moto_with_auth, small_corpus, cli_env, tmp_path):
    env = _s3_env(cli_env, tmp_path, moto_with_auth)
    result = gptpipe_run(small_corpus, "s3://guarded/store", env, tmp_path, timeout=90)
    error_line(
        result,
        "S3 refused the credentials for bucket 'guarded'",
        "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
    )
    assert "bad-input-SECRET-9f3k" not in result.stdout + result.stderr


def test_train_on_a_corrupt_parquet_file(char_dataset, tmp_path):
    raw = Path(char_dataset["train.parquet"]).read_bytes()
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(raw[: len(raw) // 2])
    out = tmp_path / "out"
    result = train_module(train_args(char_dataset, out, train=str(corrupt)), tmp_path)
    error_line(result, str(corrupt), "is not a readable Parquet token file")
    assert not (out / "ckpt.pt").exists()


# ========================================================================= nothing stored is lost


@pytest.mark.slow
def test_failing_runs_leave_an_earlier_run_byte_identical(small_corpus, cli_env, tmp_path):
    store = tmp_path / "store"
    first = gptpipe_run(
        small_corpus,
        store,
        cli_env,
        tmp_path,
        "--run-id",
        "first",
        "--sample-tokens",
        "20",
        timeout=300,
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = snapshot(store)
    assert "runs/first/summary.json" in before and "runs/first/samples.txt" in before

    # the same run id again: refused before any work, so the finished run keeps its outputs
    again = gptpipe_run(small_corpus, store, cli_env, tmp_path, "--run-id", "first")
    error_line(again, "--run-id first", "already has a finished run", "choose another --run-id")
    assert snapshot(store) == before

    # every cached stage re-used, then a late failure (the prompt, in the sample stage)
    late = gptpipe_run(
        small_corpus, store, cli_env, tmp_path, "--run-id", "second", "--prompt", "é", timeout=300
    )
    error_line(late, "does not know: 'é'")
    assert snapshot(store) == before

    # new data that fails in the split stage: its tokenize outputs are added, nothing changes
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij" * 3, encoding="utf-8")
    early = gptpipe_run(short, store, cli_env, tmp_path, "--run-id", "third")
    error_line(early, "the validation split has 3 tokens")
    after = snapshot(store)
    assert {name: after.get(name) for name in before} == before
    assert [n for n in after if n.startswith("runs/")] == [
        n for n in before if n.startswith("runs/")
    ]
    assert_nothing_half_written(store)


@pytest.mark.parametrize("kind", ["missing", "empty-file", "empty-folder", "unreachable-url"])
def test_a_bad_input_is_one_line_before_prefect_and_creates_nothing(kind, tmp_path):
    """Tried as a new user would, with no Prefect server configured: the input is checked before
    Prefect's temporary server is used and before the store or MLflow is touched."""
    source = {
        "missing": tmp_path / "nope.txt",
        "empty-file": tmp_path / "empty.txt",
        "empty-folder": tmp_path / "corpora",
        "unreachable-url": f"http://127.0.0.1:{free_port()}/corpus.txt",
    }[kind]
    if kind == "empty-file":
        source.write_bytes(b"")
    if kind == "empty-folder":
        source.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACK"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    result = gptpipe_run(source, tmp_path / "store", env, tmp_path)
    error_line(result, str(source))
    assert result.stdout == ""  # no Prefect output: no server used, no flow run
    assert "Prefect" not in result.stderr
    assert not (tmp_path / "store").exists()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
