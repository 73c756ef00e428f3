"""deploy/: the files refer to each other correctly, and the nightly deployment runs for real.

The fast tests read prefect.yaml, the work-pool job templates, compose.yaml, the env file example
and the Dockerfiles (no docker engine needed). The slow test deploys deploy/prefect.yaml to a real
Prefect server with `prefect deploy`, and has a real process worker run the nightly deployment.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from prefect.utilities.schema_tools import validate
from prefect.utilities.templating import apply_values, find_placeholders

from tests.conftest import bash_blocks, yaml_blocks

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKER_TEMPLATE = DEPLOY / "gpu-docker-job-template.json"
K8S_TEMPLATE = DEPLOY / "gpu-kubernetes-job-template.json"
# the pools the docs tell users to create, by name and type
POOLS = {
    "local": "prefect work-pool create local --type process",
    "gpu": "prefect work-pool create gpu --type docker "
    "--base-job-template deploy/gpu-docker-job-template.json",
}


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def prefect_yaml() -> dict:
    return load_yaml(DEPLOY / "prefect.yaml")


def compose() -> dict:
    return load_yaml(DEPLOY / "compose.yaml")


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (DEPLOY / ".env.example").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            pairs[key.strip()] = value
    return pairs


def variable_defaults(template: dict) -> dict:
    props = template["variables"]["properties"]
    return {name: spec.get("default") for name, spec in props.items()}


def command_text(service: dict) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else command


def option(service: dict, name: str) -> str:
    """The value after `name` in a service's command list."""
    command = service["command"]
    return command[command.index(name) + 1]


# ----------------------------------------------------------------------------- prefect.yaml


def test_deployments_point_at_a_real_flow_and_take_its_parameters():
    config = prefect_yaml()
    deployments = {d["name"]: d for d in config["deployments"]}
    assert set(deployments) == {"nightly-retrain", "nightly-retrain-gpu", "sweep"}
    sweep = deployments.pop("sweep")
    path, _, function = sweep["entrypoint"].partition(":")
    flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), function)
    assert flow.name == "hyperparameter-sweep"
    assert set(sweep["parameters"]) <= set(inspect.signature(flow.fn).parameters)
    from flows.request import DEPLOYMENT, RunRequest, SweepRequest
    from tasks.space import parse_space

    # the parameters are a request's sections, and pass its own checks as written
    SweepRequest.of(DEPLOYMENT, **sweep["parameters"]).check_settings(DEPLOYMENT)
    assert parse_space(sweep["parameters"]["search"]["space"]).trials == 6  # a valid grid
    for name, deployment in deployments.items():
        # entrypoints resolve against the folder `prefect deploy` runs in: the project root
        path, _, function = deployment["entrypoint"].partition(":")
        assert (REPO / path).is_file(), f"{name}: {path} does not exist"
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, function)
        assert flow.name == "nightly-retrain"
        signature = inspect.signature(flow.fn).parameters
        assert {"compute", "training", "alerts"} <= set(deployment["parameters"]), name
        assert set(deployment["parameters"]) <= set(signature), name
        request = RunRequest.of(DEPLOYMENT, **deployment["parameters"])
        request.check_settings(DEPLOYMENT)
        assert request.alerts.timeout_seconds == 6 * 3600, name
        assert request.training.init_from == "champion", name  # nightly warm starts
        schedule = deployment["schedules"][0]
        assert (schedule["cron"], schedule["timezone"]) == ("0 2 * * *", "UTC")
    assert deployments["nightly-retrain"]["work_pool"]["name"] == "local"
    assert deployments["nightly-retrain-gpu"]["work_pool"]["name"] == "gpu"


def test_work_pools_of_the_deployments_are_documented():
    used = {d["work_pool"]["name"] for d in prefect_yaml()["deployments"]}
    assert used == set(POOLS)
    docs = "".join(
        p.read_text(encoding="utf-8")
        for p in (REPO / "docs" / "deploy.md", REPO / "README.md")
        if p.is_file()
    )
    for pool, create in POOLS.items():
        assert create in docs, f"the docs do not say how to create the {pool!r} pool: {create}"
        assert create in (DEPLOY / "prefect.yaml").read_text(encoding="utf-8")


def test_pull_step_goes_to_the_checkout_the_image_has():
    (step,) = prefect_yaml()["pull"]
    directory = step["flows.checkout.set_working_directory"]["directory"]
    (placeholder,) = find_placeholders(directory)
    assert placeholder.name == "$GPTPIPE_HOME"  # read from the flow run's environment
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.M).group(1)
    assert f"GPTPIPE_HOME={workdir}" in dockerfile


def test_pull_step_goes_to_gptpipe_home_else_the_installed_checkout(
    prefect_server, tmp_path, monkeypatch
):
    """prefect.yaml's pull steps through Prefect's own run_steps, as a flow run's process runs
    them (in a temporary folder): an unset GPTPIPE_HOME is the checkout gptpipe is installed
    from, where the entrypoints are; one that is not a checkout fails at once, saying what to
    set (Prefect's own step would go there and the run fail later: no flows/nightly.py)."""
    import asyncio

    from prefect.deployments.steps.core import StepExecutionError, run_steps
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from storage.errors import GptpipeError

    steps = prefect_yaml()["pull"]
    entrypoints = {d["entrypoint"].partition(":")[0] for d in prefect_yaml()["deployments"]}
    monkeypatch.chdir(tmp_path)  # restored afterwards: the steps change this process's folder
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        for home in (None, str(REPO)):
            if home is None:
                monkeypatch.delenv("GPTPIPE_HOME", raising=False)
            else:
                monkeypatch.setenv("GPTPIPE_HOME", home)
            os.chdir(tmp_path)
            assert asyncio.run(run_steps(steps)) == {"directory": str(REPO)}
            assert Path.cwd() == REPO and all(Path(e).is_file() for e in entrypoints)

        elsewhere = tmp_path / "not-a-checkout"
        elsewhere.mkdir()
        monkeypatch.setenv("GPTPIPE_HOME", str(elsewhere))
        with pytest.raises(StepExecutionError) as failed:
            asyncio.run(run_steps(steps))
    error = failed.value.__cause__
    assert isinstance(error, GptpipeError) and "\n" not in str(error)
    assert str(error).startswith(f"GPTPIPE_HOME={elsewhere} is not a gptpipe checkout")
    assert "GPTPIPE_HOME=$PWD prefect worker start --pool local" in str(error)


def test_gpu_deployment_env_names_compose_services():
    services = compose()["services"]
    (gpu,) = [d for d in prefect_yaml()["deployments"] if d["work_pool"]["name"] == "gpu"]
    env = gpu["work_pool"]["job_variables"]["env"]
    for key in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"):
        assert urlparse(env[key]).hostname in services, key
    assert urlparse(env["GPTPIPE_STORE"]).netloc in created_buckets()


# ----------------------------------------------------------------------------- job templates


@pytest.mark.parametrize("path", [DOCKER_TEMPLATE, K8S_TEMPLATE], ids=lambda p: p.name)
def test_job_templates_declare_every_variable_they_use(path):
    """The rule the Prefect server applies to a base job template (it answers 422 otherwise)."""
    template = json.loads(path.read_text(encoding="utf-8"))
    assert set(template) == {"job_configuration", "variables"}
    used = {p.name for p in find_placeholders(json.dumps(template["job_configuration"]))}
    assert used <= set(template["variables"]["properties"]), path.name


def test_docker_template_requests_all_gpus_and_lets_a_deployment_pin_them():
    from docker.types import HostConfig

    template = json.loads(DOCKER_TEMPLATE.read_text(encoding="utf-8"))
    config = apply_values(template["job_configuration"], variable_defaults(template))
    kwargs = config["container_create_kwargs"]
    (request,) = kwargs["device_requests"]
    # `docker run --gpus all`: count -1 = all GPUs, through the nvidia runtime
    assert request == {"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}
    assert kwargs["shm_size"] == "8g"
    # flow-run containers: the worker image of compose.yaml, on compose's network
    services = compose()["services"]
    assert config["image"] == services["worker"]["image"] == services["worker-gpu"]["image"]
    assert config["networks"] == [compose()["networks"]["default"]["name"]]
    # a deployment's job variable replaces the default: GPUs 0 and 1 only, as docs/deploy.md says
    (snippet,) = [b for b in yaml_blocks(DEPLOY_DOCS) if "container_create_kwargs" in b]
    pinned = yaml.safe_load(snippet)["work_pool"]["job_variables"]["container_create_kwargs"]
    assert pinned["device_requests"][0]["device_ids"] == ["0", "1"]
    assert not validate({"container_create_kwargs": pinned}, template["variables"])
    values = {**variable_defaults(template), "container_create_kwargs": pinned}
    assert apply_values(template["job_configuration"], values)["container_create_kwargs"] == pinned
    # docker-py builds the host config the worker passes to the daemon from either
    for given in (kwargs, pinned):
        host = HostConfig(version="1.43", **given)
        assert host["DeviceRequests"][0]["Driver"] == "nvidia" and host["ShmSize"] == 8 * 2**30
    assert HostConfig(version="1.43", **pinned)["DeviceRequests"][0]["DeviceIDs"] == ["0", "1"]


def test_gpu_deployment_runs_one_at_a_time_and_both_have_time_limits():
    from flows.alerts import check_timeout

    deployments = {d["name"]: d for d in prefect_yaml()["deployments"] if "nightly" in d["tags"]}
    gpu = deployments["nightly-retrain-gpu"]
    assert gpu["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    for deployment in deployments.values():
        parameters = deployment["parameters"]["alerts"]
        for name in ("timeout_seconds", "train_timeout_seconds"):
            assert check_timeout(parameters[name], name=name) >= 3600, deployment["name"]
        assert parameters["train_timeout_seconds"] < parameters["timeout_seconds"]
        assert parameters["notify"] is None  # $GPTPIPE_NOTIFY_URL, or a block's name


def test_kubernetes_template_limits_gpus():
    template = json.loads(K8S_TEMPLATE.read_text(encoding="utf-8"))
    config = apply_values(template["job_configuration"], variable_defaults(template))
    pod = config["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


# ----------------------------------------------------------------------------- compose


def created_buckets() -> set[str]:
    script = command_text(compose()["services"]["create-buckets"])
    (mb,) = [line for line in script.splitlines() if "mc mb" in line]
    return {word.split("/", 1)[1] for word in mb.split() if word.startswith("local/")}


def test_compose_builds_from_files_that_exist():
    for name, service in compose()["services"].items():
        build = service.get("build")
        if build is None:
            continue
        context = (DEPLOY / build["context"]).resolve()
        assert context == REPO, name
        assert (context / build["dockerfile"]).is_file(), name
        for arg in build.get("args", {}):
            assert re.search(rf"^ARG {arg}\b", (context / build["dockerfile"]).read_text(), re.M), (
                f"{name}: build arg {arg} is not an ARG"
            )
    services = compose()["services"]
    assert services["worker"]["build"]["dockerfile"] == "deploy/Dockerfile"


def test_env_example_has_every_variable_compose_uses():
    text = "".join(
        (DEPLOY / name).read_text(encoding="utf-8")
        for name in ("compose.yaml", "compose.auth.yaml")
    )
    interpolated = set(re.findall(r"(?<!\$)\$\{(\w+)", text))  # compose reads deploy/.env
    example = env_example()
    assert interpolated <= set(example), interpolated - set(example)
    # services with `env_file: .env` read their own variables from it
    services = compose()["services"]
    readers = [s for s in services.values() if s.get("env_file") == ".env"]
    assert {"postgres", "minio", "create-buckets"} <= {
        name for name, s in services.items() if s.get("env_file") == ".env"
    }
    inside = {v for s in readers for v in re.findall(r"\$\$(\w+)", command_text(s))}
    needs = {
        "POSTGRES_USER",
        "POSTGRES_PASSWORD",
        "POSTGRES_DB",
        "MINIO_ROOT_USER",
        "MINIO_ROOT_PASSWORD",
    }
    loop_vars = {"bucket"}
    assert (inside - loop_vars) | needs <= set(example)
    # the real .env is never committed
    assert "deploy/.env" in (REPO / ".gitignore").read_text(encoding="utf-8").splitlines()


def test_compose_ports_are_loopback_only():
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"


def test_mlflow_stores_artifacts_in_a_bucket_the_mc_job_creates():
    services = compose()["services"]
    mlflow = services["mlflow"]
    env = mlflow["environment"]
    endpoint = urlparse(env["MLFLOW_S3_ENDPOINT_URL"])
    assert endpoint.hostname == "minio" and endpoint.port == 9000
    assert "127.0.0.1:9000:9000" in services["minio"]["ports"]
    destination = urlparse(option(mlflow, "--artifacts-destination"))
    assert destination.scheme == "s3" and destination.netloc in created_buckets()
    assert {"mlflow", "gptpipe"} <= created_buckets()
    script = command_text(services["create-buckets"])
    assert "mc alias set local http://minio:9000" in script
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert "@postgres:5432/" in env["MLFLOW_BACKEND_STORE_URI"]
    assert mlflow["depends_on"]["create-buckets"]["condition"] == "service_completed_successfully"
    # other containers reach it as mlflow:5000: its Host-header check must allow that
    assert "mlflow:5000" in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")


def test_auth_overlay_changes_only_what_basic_auth_needs():
    base, overlay = compose()["services"], load_yaml(DEPLOY / "compose.auth.yaml")["services"]
    assert set(overlay) <= set(base)
    command = overlay["mlflow"]["command"]
    assert command[command.index("--app-name") + 1] == "basic-auth"
    rest = command[: command.index("--app-name")] + command[command.index("--app-name") + 2 :]
    assert rest == base["mlflow"]["command"]  # compose replaces a command: keep the others
    ini = overlay["mlflow"]["environment"]["MLFLOW_AUTH_CONFIG_PATH"]
    (mount,) = [v for v in overlay["mlflow"]["volumes"] if v.split(":")[1] == ini]
    assert (DEPLOY / mount.split(":")[0]).is_file()
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(
        overlay["worker"]["environment"]
    )


def test_workers_talk_to_the_services_of_the_stack():
    services = compose()["services"]
    server_port = int(option(services["prefect-server"], "--port"))
    mlflow_port = int(option(services["mlflow"], "--port"))
    pools = {d["work_pool"]["name"] for d in prefect_yaml()["deployments"]}
    for name in ("worker", "worker-gpu"):
        worker = services[name]
        api = urlparse(worker["environment"]["PREFECT_API_URL"])
        assert (api.hostname, api.port, api.path) == ("prefect-server", server_port, "/api")
        assert option(worker, "--pool") in pools
        assert worker["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert option(services["worker"], "--type") == "process"
    assert option(services["worker-gpu"], "--type") == "docker"
    assert "/var/run/docker.sock:/var/run/docker.sock" in services["worker-gpu"]["volumes"]
    env = services["worker"]["environment"]
    tracking = urlparse(env["MLFLOW_TRACKING_URI"])
    assert (tracking.hostname, tracking.port) == ("mlflow", mlflow_port)
    assert urlparse(env["AWS_ENDPOINT_URL"]).hostname == "minio"
    assert urlparse(env["GPTPIPE_STORE"]).netloc in created_buckets()


def test_dockerfile_copies_paths_that_exist_and_the_ignore_file_lets_them_through():
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^ARG BASE_IMAGE=\S+", dockerfile, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", dockerfile, re.M)
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    copied = []
    for line in re.findall(r"^COPY (.+)$", dockerfile, re.M):
        *sources, _dest = line.split()
        copied += sources
    assert {"pyproject.toml", "model/", "flows/", "tasks/", "storage/", "configs/"} <= set(copied)
    for source in copied:
        assert (REPO / source).exists(), source
        assert f"!{source}" in ignore, f"{source} is filtered out of the build context"
    # the project's packages are what gets installed, and the pyproject includes each of them
    packages = re.search(r"include = \[(.*?)\]", (REPO / "pyproject.toml").read_text()).group(1)
    for package in re.findall(r'"(\w+)\*"', packages):
        assert f"{package}/" in copied, package
    assert re.search(r"^RUN pip install -e \. ", dockerfile, re.M)


# ----------------------------------------------------------------------------- for real


def prefect(args: list[str], env: dict, cwd: Path, timeout: float = 120):
    result = subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def run_deployment(run_args: list[str], params: dict, env: dict) -> str:
    """`prefect deployment run ...` with each parameter as --param KEY=JSON; its output."""
    for key, value in params.items():
        run_args = [*run_args, "--param", f"{key}={json.dumps(value)}"]
    return prefect(run_args, env, REPO)


def run_worker_once(env: dict, cwd: Path) -> str:
    """A real process worker of the `local` pool, for one flow run; its log."""
    worker = subprocess.run(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "local", "--run-once"],
        env={**env, "GPTPIPE_HOME": str(REPO)},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
    )
    log = worker.stdout + worker.stderr
    assert worker.returncode == 0, log[-6000:]
    return log


@pytest.mark.slow
def test_deploy_and_run_the_nightly_deployment(prefect_server, small_corpus, tmp_path):
    home = tmp_path / "prefect-home"
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "PREFECT_HOME": str(home),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "storage"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "PYTHONUNBUFFERED": "1",
        # resolved into the gpu deployment's job variables when `prefect deploy` runs
        "GPTPIPE_S3_ACCESS_KEY_ID": "deploy-test-key",
        "GPTPIPE_S3_SECRET_ACCESS_KEY": "deploy-test-secret",
    }
    for name in ("GPTPIPE_HOME", "GPTPIPE_STORE", "GPTPIPE_INPUT", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)

    # the pools as the docs create them; the server checks the docker template (422 if invalid)
    prefect(["work-pool", "create", "local", "--type", "process", "--overwrite"], env, REPO)
    prefect(
        [
            "work-pool",
            "create",
            "gpu",
            "--type",
            "docker",
            "--base-job-template",
            str(DOCKER_TEMPLATE),
            "--overwrite",
        ],
        env,
        REPO,
    )
    prefect(
        [
            "work-pool",
            "create",
            "gpu-k8s",
            "--type",
            "kubernetes",
            "--base-job-template",
            str(K8S_TEMPLATE),
            "--overwrite",
        ],
        env,
        REPO,
    )

    # from the project root: entrypoints in prefect.yaml are relative to it
    prefect(["--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml"], env, REPO)
    gpu = json.loads(
        prefect(
            ["deployment", "inspect", "nightly-retrain/nightly-retrain-gpu", "--output", "json"],
            env,
            REPO,
        )
    )
    assert gpu["work_pool_name"] == "gpu"
    assert gpu["parameters"]["compute"]["nproc"] == "auto"
    assert "batch_size=64" in gpu["parameters"]["training"]["overrides"]
    assert gpu["job_variables"]["env"]["AWS_ACCESS_KEY_ID"] == "deploy-test-key"
    assert gpu["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    assert gpu["global_concurrency_limit"]["limit"] == 1
    assert gpu["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    assert gpu["parameters"]["alerts"]["timeout_seconds"] == 21600

    store = tmp_path / "store"
    params = {
        "data": {"source": str(small_corpus), "store": str(store)},
        "training": {
            "preset": "seed",
            "overrides": ["max_iters=20", "eval_interval=10", "eval_iters=2", "batch_size=16"],
        },
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "run_id": "deploy-test",
        "sampling": {"sample_tokens": 40},
        # the tokenize stage mapped over a local Dask cluster
        "compute": {"task_runner": "dask", "workers": 1},
    }
    run_args = ["deployment", "run", "nightly-retrain/nightly-retrain"]
    created = run_deployment(run_args, params, env)
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", created).group(1)

    # a real process worker, started elsewhere: the pull step takes it to $GPTPIPE_HOME
    worker_cwd = tmp_path / "worker"
    worker_cwd.mkdir()
    log = run_worker_once(env, worker_cwd)
    assert "Creating a new Dask cluster" in log, log[-6000:]

    deadline, state = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        state = json.loads(
            prefect(["flow-run", "inspect", flow_run_id, "--output", "json"], env, REPO)
        )["state"]["type"]
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(1)
    assert state == "COMPLETED", log[-6000:]

    summary = json.loads((store / "runs" / "deploy-test" / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["config"]["batch_size"] == 16
    assert summary["stages"]["train"]["step"] == 20
    for name, uri in summary["outputs"].items():
        assert Path(uri).is_file(), f"{name}: {uri}"
    assert summary["model"]["version"] and "champion" in summary["model"]
    assert "Running 1 deployment pull step(s)" in log

    # the sweep deployment, run by the same kind of worker: two trials on the same data
    space = {"budget": {"max_iters": 20}, "pruner": "none", "params": {"n_layer": [1, 2]}}
    sweep_params = {
        **{k: params[k] for k in ("data", "training", "tracking")},
        "search": {"space": space, "name": "deploy-sweep"},
    }
    run_deployment(["deployment", "run", "hyperparameter-sweep/sweep"], sweep_params, env)
    log = run_worker_once(env, worker_cwd)
    deadline = time.monotonic() + 60
    sweep_summary = store / "sweeps" / "deploy-sweep" / "summary.json"
    while not sweep_summary.exists() and time.monotonic() < deadline:
        time.sleep(1)
    swept = json.loads(sweep_summary.read_text())
    assert [t["state"] for t in swept["trials"]] == ["complete", "complete"], log[-6000:]
    # the same data as the nightly run: tokenized and split once, for both flows
    assert swept["outputs"]["val"] == summary["outputs"]["val"]


# ----------------------------------------------------------------------------- the docs, as written

DEPLOY_DOCS = REPO / "docs" / "deploy.md"
# a worker polls until it is stopped: the docs test starts the quick start's in the background
RUNS_UNTIL_STOPPED = "prefect worker start"


def prefect_only(block: str) -> bool:
    """A block of Prefect CLI commands only (the others need Docker, a compose stack, AWS)."""
    lines = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    commands = [line for line in lines if not line.startswith(" ")]  # continuations indented
    return bool(commands) and all(line.startswith("prefect ") for line in commands)


def test_the_docs_have_the_deploy_blocks_this_test_runs():
    blocks = [b for b in bash_blocks(DEPLOY_DOCS) if prefect_only(b)]
    text = "\n".join(blocks)
    # the quick start, the gpu pool, deploying all or one, running one now, its schedule
    wanted = ("deploy --all", "deploy --name", "deployment run", "schedule ls")
    for command in (*POOLS.values(), *wanted):
        assert command in text, f"docs/deploy.md has no Prefect-only block with {command!r}"
    assert not prefect_only("docker compose up\nprefect deploy")
    assert prefect_only("prefect a \\\n  b  # a continued line")


def worker_runs_the_nightly_deployment(command: str, env: dict, corpus: Path, out: Path):
    """The docs' `prefect worker start ...` line, as written, from the project root in the
    background, while a run of the nightly deployment (tiny parameters) is created: the worker
    must take it and run it to COMPLETED. The worker is stopped after."""
    from tests.conftest import prefect_api

    params = {
        "data": {"source": str(corpus), "store": str(out / "store")},
        "training": {
            "preset": "seed",
            "overrides": [
                *("max_iters=10", "eval_interval=10", "eval_iters=2", "log_interval=10"),
                "batch_size=8",
            ],
        },
        "tracking": {"tracking_uri": f"sqlite:///{out / 'mlflow.db'}"},
        "run_id": "docs-worker",
        "sampling": {"sample_tokens": 20},
    }
    log_path = out / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            ["bash", "-c", command],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        created = run_deployment(
            ["deployment", "run", "nightly-retrain/nightly-retrain"], params, env
        )
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", created).group(1)
        deadline, state = time.monotonic() + 300, None
        while time.monotonic() < deadline and worker.poll() is None:
            (run,) = prefect_api(
                env, "flow_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}}
            )
            state = run["state"]
            if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(1)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    shown = f"{command}: {state}\n" + log_path.read_text(errors="replace")[-6000:]
    assert state is not None and state["type"] == "COMPLETED", shown
    summary = json.loads((out / "store" / "runs" / "docs-worker" / "summary.json").read_text())
    assert summary["stages"]["train"]["step"] == 10, shown


@pytest.mark.slow
def test_the_deploy_docs_run_as_written_on_a_fresh_prefect_server(small_corpus, tmp_path):
    """Every Prefect-only block of docs/deploy.md, in order, from the project root; the quick
    start's worker, started as written (no GPTPIPE_HOME), runs a flow run of the nightly
    deployment to completion before the next block."""
    from tests.conftest import prefect_server_in

    blocks = [b for b in bash_blocks(DEPLOY_DOCS) if prefect_only(b)]
    workers = [
        line for b in blocks for line in b.splitlines() if line.startswith(RUNS_UNTIL_STOPPED)
    ]
    assert workers == ["prefect worker start --pool local"], workers  # the quick start's
    home = tmp_path / "prefect-home"
    with prefect_server_in(tmp_path / "server") as url:
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PREFECT_API_URL": url,
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "2",  # the worker looks for runs every 2 s, not 10
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "PYTHONUNBUFFERED": "1",
        }
        for name in ("GPTPIPE_HOME", "GPTPIPE_STORE", "GPTPIPE_INPUT", "MLFLOW_TRACKING_URI"):
            env.pop(name, None)  # as a user's shell would have them: unset
        for block in blocks:
            lines = block.splitlines()
            script = "\n".join(line for line in lines if not line.startswith(RUNS_UNTIL_STOPPED))
            done = subprocess.run(
                ["bash", "-e", "-x", "-c", script],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            failed = f"docs/deploy.md block failed:\n{block}\n{done.stdout}\n{done.stderr}"
            assert done.returncode == 0, failed
            for command in (line for line in lines if line.startswith(RUNS_UNTIL_STOPPED)):
                worker_runs_the_nightly_deployment(command, env, small_corpus, tmp_path)
        for name in ("nightly-retrain", "nightly-retrain-gpu"):
            shown = prefect(["deployment", "inspect", f"nightly-retrain/{name}"], env, REPO)
            assert name in shown
        # the pause the docs describe in words, with the ID `schedule ls` shows
        gpu = "nightly-retrain/nightly-retrain-gpu"
        listed = prefect(["deployment", "schedule", "ls", gpu, "--output", "json"], env, REPO)
        (schedule,) = json.loads(listed)
        assert "pause" in DEPLOY_DOCS.read_text(encoding="utf-8")
        prefect(["deployment", "schedule", "pause", gpu, schedule["id"]], env, REPO)
        listed = prefect(["deployment", "schedule", "ls", gpu, "--output", "json"], env, REPO)
        assert json.loads(listed)[0]["active"] is False
