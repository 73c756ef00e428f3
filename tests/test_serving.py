"""The champion served by MLflow's own scoring server, where gptpipe's code cannot be imported.

A tiny model is trained, logged (models-from-code, `model` and `storage` shipped with it) and
registered as champion on the session's real MLflow server. `mlflow models serve -m
models:/NAME@champion`, run as the README's Serving section says, then answers over HTTP in an
environment whose sitecustomize refuses flows, tasks and gptpipe, and the repository's `model`
and `storage`: only the copies shipped inside the model can load. One server serves every case.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, launch_on, served
from tests.test_faults import CONFIG as TINY_MODEL

NAME = "gptpipe-serving-test"
EXPERIMENT = "serving-test"  # apart from the other tests sharing the session's server
PROMPT = "ROMEO:"
# test_faults' tiny model, trained for 30 steps (under a second)
CONFIG = {**TINY_MODEL, "max_iters": 30, "eval_interval": 30, "log_interval": 10}

# Put first on sys.meta_path of every Python process started with PYTHONPATH at its folder.
BLOCKER = '''
"""Test only: gptpipe's own code cannot be imported here, except the model's shipped copies."""
import importlib.abc
import importlib.machinery
import os
import sys
from pathlib import Path

REPO = Path(os.environ["GPTPIPE_BLOCKED_REPO"]).resolve()
GPTPIPE_ONLY = {"flows", "tasks", "gptpipe", "configs"}
SHIPPED = {"model", "storage"}


class RefuseGptpipe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in GPTPIPE_ONLY:
            raise ModuleNotFoundError(f"blocked: {name} is gptpipe's code, not the model's")
        if name in SHIPPED:  # their submodules follow the package's own folder
            spec = importlib.machinery.PathFinder.find_spec(name, sys.path)
            origin = Path(spec.origin).resolve() if spec and spec.origin else None
            if origin is None or REPO in origin.parents:
                raise ModuleNotFoundError(f"blocked: {name} from {origin}, not a model's code")
            return spec
        return None


sys.meta_path.insert(0, RefuseGptpipe())
'''


def readme_serving_blocks() -> list[list[str]]:
    """The bash blocks of the README's Serving section, each as its commands (continuation lines
    joined)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Serving\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, "README.md has no '## Serving' section"
    blocks = re.findall(r"^```bash\n(.*?)^```", section.group(1), re.M | re.S)
    return [
        [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]
        for block in blocks
    ]


def blocked_env(folder: Path, tracking_uri: str) -> dict[str, str]:
    """The environment of a process where only a model's shipped code is importable: the
    blocker's sitecustomize, the venv's bin on PATH (as `source .venv/bin/activate` puts it)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {
        **env,
        "PYTHONPATH": str(folder),
        "GPTPIPE_BLOCKED_REPO": str(REPO),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": tracking_uri,
    }


def serve_command(line: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The README's `VAR=value mlflow models serve ...` line as this test runs it: this venv's
    mlflow, the test's model and a free port; and the variables it sets."""
    words = shlex.split(line)
    settings = {}
    while "=" in words[0]:
        key, _, value = words.pop(0).partition("=")
        settings[key] = value
    assert words[:3] == ["mlflow", "models", "serve"], line
    args = words[3:]
    model = args.index("-m") + 1
    assert args[model].endswith("@champion"), line
    args[model] = f"models:/{NAME}@champion"
    args[args.index("-p") + 1] = str(port)
    return [sys.executable, "-m", "mlflow", "models", "serve", *args], settings


@pytest.fixture(scope="module")
def champion(mlflow_server, char_dataset, tmp_path_factory) -> dict:
    """A tiny trained model registered as the champion on the session's MLflow server."""
    from storage.tracking import Tracker
    from tasks.registry import CHAMPION, log_model, register

    out = tmp_path_factory.mktemp("serving-train")
    summary = launch_on(char_dataset, out, CONFIG)
    tracker = Tracker(mlflow_server, EXPERIMENT)
    run_id = tracker.start_run("serving")
    model_uri = log_model(tracker, run_id, summary["checkpoint"], step=summary["step"])
    version = register(tracker, NAME, model_uri, tags={"purpose": "serving test"})
    tracker.client.set_registered_model_alias(NAME, CHAMPION, version)
    return {
        "tracker": tracker,
        "checkpoint": summary["checkpoint"],
        "step": summary["step"],
        "model_uri": model_uri,
        "version": version,
    }


@pytest.fixture(scope="module")
def server(champion, mlflow_server, tmp_path_factory):
    """`mlflow models serve -m models:/NAME@champion` as the README says, gptpipe blocked; the
    base URL of its scoring server."""
    folder = tmp_path_factory.mktemp("serving")
    serve_block = readme_serving_blocks()[0]
    assert serve_block[0] == "source .venv/bin/activate", serve_block  # blocked_env's PATH
    port = free_port()
    cmd, settings = serve_command(serve_block[1], port)
    assert set(settings) == {"MLFLOW_TRACKING_URI"}, settings
    env = blocked_env(folder / "blocker", mlflow_server)
    url = f"http://127.0.0.1:{port}"
    with served(cmd, f"{url}/ping", 180, folder / "serve.log", env=env, cwd=folder):
        yield url


@pytest.fixture(scope="module")
def local(champion):
    """The same checkpoint loaded in this process, to compare the server's texts with."""
    from model.sample import load_model

    return load_model(champion["checkpoint"])


def invoke(url: str, params: dict, inputs: tuple[str, ...] = (PROMPT,)) -> tuple[int, dict]:
    """POST /invocations; the status and the JSON body (an error's too)."""
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps({"inputs": list(inputs), "params": params}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def new_tokens(loaded, text: str, prompt: str = PROMPT) -> int:
    assert text.startswith(prompt), text
    return len(loaded.tokenizer.encode(text)) - len(loaded.tokenizer.encode(prompt))


@pytest.mark.slow
def test_the_block_keeps_gptpipe_code_out(tmp_path, mlflow_server):
    """The sitecustomize used for the server really refuses gptpipe's code: the repository's
    `model`, `storage`, and `tasks` cannot be imported with it, and can without it."""
    env = blocked_env(tmp_path / "blocker", mlflow_server)
    for module in ("model", "storage.errors", "tasks.registry", "flows.cli"):
        done = subprocess.run(
            [sys.executable, "-c", f"import {module}"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert done.returncode != 0 and "blocked:" in done.stderr, (module, done.stderr)
    unblocked = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", "import model, tasks; print(model.__file__)"],
        env=unblocked,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).is_relative_to(REPO)  # the editable install would serve it


@pytest.mark.slow
def test_the_champion_answers_with_the_tokens_asked(server, local):
    from model.sample import sample_text

    greedy = {"max_new_tokens": 7, "temperature": 0}
    status, first = invoke(server, greedy)
    assert status == 200, first
    [text] = first["predictions"]
    assert new_tokens(local, text) == 7
    assert invoke(server, greedy) == (200, first)  # greedy: the same every time
    assert text == sample_text(local, PROMPT, max_new_tokens=7, temperature=0)[0]
    # top_k 1 samples the most likely token: greedy again, at any temperature
    assert invoke(server, {"max_new_tokens": 7, "top_k": 1, "seed": 5})[1] == first

    sampled = {"max_new_tokens": 40, "temperature": 1.0}
    _, seed3 = invoke(server, {**sampled, "seed": 3})
    assert invoke(server, {**sampled, "seed": 3})[1] == seed3  # same seed, same text
    _, seed4 = invoke(server, {**sampled, "seed": 4})
    assert seed4 != seed3
    expected = sample_text(local, PROMPT, max_new_tokens=40, temperature=1.0, seed=3)[0]
    assert seed3["predictions"] == [expected]

    # every prompt of a request is answered; the defaults apply to params not sent
    prompts = (PROMPT, "JULIET:")
    status, both = invoke(server, {"max_new_tokens": 3}, inputs=prompts)
    assert status == 200, both
    answered = zip(both["predictions"], prompts, strict=True)
    assert [new_tokens(local, text, prompt) for text, prompt in answered] == [3, 3]
    status, default = invoke(server, {})
    assert status == 200 and new_tokens(local, default["predictions"][0]) == 200


@pytest.mark.slow
def test_prompts_sent_together_each_get_their_own_random_stream(server, local):
    """Row i is sampled with seed + i: a batch is as varied as separate requests (the same prompt
    twice included), as reproducible, and its first row is that prompt's text alone."""
    from model.sample import sample_text

    params = {"max_new_tokens": 40, "temperature": 1.0, "seed": 7}
    prompts = (PROMPT, "JULIET:", PROMPT)
    status, batch = invoke(server, params, inputs=prompts)
    assert status == 200, batch
    texts = batch["predictions"]
    continued = [text.removeprefix(prompt) for text, prompt in zip(texts, prompts, strict=True)]
    assert len(set(continued)) == 3, continued  # no two rows share one seed's draws
    assert invoke(server, params, inputs=prompts) == (200, batch)  # same request, same texts
    assert invoke(server, params, inputs=(PROMPT,))[1]["predictions"] == [texts[0]]
    # as the docs say: row i is what its prompt gets alone with seed + i
    for row, prompt in enumerate(prompts):
        alone = sample_text(local, prompt, max_new_tokens=40, temperature=1.0, seed=7 + row)[0]
        assert texts[row] == alone, row


def test_a_rows_seed_is_the_requests_plus_its_row_within_64_bits():
    from model.sample import row_seed
    from storage.errors import GptpipeError

    assert [row_seed(7, row) for row in range(3)] == [7, 8, 9]
    assert row_seed(-1, 1) == 0 and row_seed(2**64 - 1, 2) == 1  # what torch's generator takes
    with pytest.raises(GptpipeError, match="seed must fit in 64 bits"):
        row_seed(2**64, 0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "params, named",
    [
        ({"max_new_tokens": -1}, "max_new_tokens must not be negative"),
        ({"top_k": 0}, "top_k must be at least 1"),
        ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
        ({"max_new_tokens": "many"}, "max_new_tokens"),
    ],
)
def test_bad_params_are_a_400_naming_them(server, params, named):
    status, body = invoke(server, params)
    assert status == 400, body
    assert body["error_code"] == "INVALID_PARAMETER_VALUE" and named in body["message"], body


@pytest.mark.slow
def test_a_prompt_the_tokenizer_cannot_read_is_a_400(server):
    status, body = invoke(server, {"max_new_tokens": 3}, inputs=("ROMEO: \u2603",))
    assert status == 400 and "characters the tokenizer does not know" in body["message"], body


@pytest.mark.slow
def test_the_readme_curl_command_runs(server, local):
    """The README's curl command, against this server's port, answers as it says."""
    [curl] = readme_serving_blocks()[1]
    assert curl.startswith("curl ") and "127.0.0.1:5001" in curl, curl
    done = subprocess.run(
        ["bash", "-c", curl.replace("127.0.0.1:5001", server.removeprefix("http://"))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    [text] = json.loads(done.stdout)["predictions"]
    asked = json.loads(re.search(r"-d '(.*)'", curl).group(1))["params"]["max_new_tokens"]
    assert new_tokens(local, text) == asked


@pytest.mark.slow
def test_the_model_declares_its_requirements_and_ships_its_code(champion, tmp_path):
    """What serving needs is in the model: pinned requirements, the two packages, the params."""
    import mlflow

    from tasks.registry import SERVING_DISTRIBUTIONS, _pointed_at

    with _pointed_at(champion["tracker"]):
        folder = Path(
            mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion", dst_path=str(tmp_path))
        )
        info = mlflow.models.get_model_info(f"models:/{NAME}@champion")
    required = (folder / "requirements.txt").read_text(encoding="utf-8").split()
    assert sorted(r.partition("==")[0] for r in required) == sorted(
        ["mlflow", *SERVING_DISTRIBUTIONS]
    )
    assert all(re.fullmatch(r"[\w-]+==\d[\w.]*", r) for r in required), required
    for shipped in ("served_model.py", "code/model/sample.py", "code/storage/errors.py"):
        assert (folder / shipped).is_file(), shipped
    assert not list(folder.rglob("__pycache__"))
    params = {p.name: p.default for p in info.signature.params.params}
    assert params == {"max_new_tokens": 200, "temperature": 1.0, "top_k": None, "seed": 1337}
    assert (folder / "serving_input_example.json").is_file()


@pytest.mark.slow
def test_sampling_from_the_registry_downloads_the_checkpoint_as_trained(champion, tmp_path):
    """`gptpipe sample --model models:/NAME@champion` reads the very checkpoint (MLflow resolves
    the alias), loaded with weights_only like any other."""
    import storage
    from model.checkpoint import load_checkpoint
    from storage.errors import GptpipeError
    from tasks.registry import download_checkpoint

    tracker = champion["tracker"]
    path = download_checkpoint(tracker, f"models:/{NAME}@champion", tmp_path / "champion")
    assert storage.sha256(str(path)) == storage.sha256(champion["checkpoint"])
    assert load_checkpoint(str(path))["model_config"]["n_embd"] == CONFIG["n_embd"]
    same = download_checkpoint(tracker, f"models:/{NAME}/{champion['version']}", tmp_path / "v")
    assert same.read_bytes() == path.read_bytes()
    with pytest.raises(GptpipeError, match=r"^cannot fetch models:/\S+@nobody from MLflow: "):
        download_checkpoint(tracker, f"models:/{NAME}@nobody", tmp_path / "none")


@pytest.mark.slow
def test_logged_models_rank_by_their_linked_val_loss(champion):
    """link_val_loss puts the val loss on the version's logged model, where MLflow's
    search_logged_models orders by it."""
    import mlflow

    from tasks.registry import link_val_loss, log_model, register

    tracker = champion["tracker"]
    run_id = tracker.start_run("serving-second")
    second_uri = log_model(tracker, run_id, champion["checkpoint"], step=champion["step"])
    register(tracker, NAME, second_uri, tags={})
    link_val_loss(tracker, champion["model_uri"], run_id, 2.5)
    link_val_loss(tracker, second_uri, run_id, 1.5)
    found = mlflow.MlflowClient(tracker.tracking_uri).search_logged_models(
        experiment_ids=[tracker.experiment_id],
        order_by=[{"field_name": "metrics.val_loss", "ascending": True}],
    )
    ids = [uri.removeprefix("models:/") for uri in (second_uri, champion["model_uri"])]
    assert [m.model_id for m in found] == ids
    assert [[(x.key, x.value) for x in m.metrics] for m in found] == [
        [("val_loss", 1.5)],
        [("val_loss", 2.5)],
    ]
