"""The trained model as an MLflow model, its registered versions and the `champion` alias.

The MLflow model is a pyfunc whose one artifact is gptpipe's own checkpoint. gptpipe itself
never unpickles it: `gptpipe sample --model models:/NAME@champion` downloads the checkpoint file
and loads it with weights_only=True like any other.
"""

from __future__ import annotations

import re
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from model.checkpoint import CHECKPOINT_NAME
from storage.errors import GptpipeError, first_line
from storage.tracking import Tracker

CHAMPION = "champion"


class GPTTextGenerator(mlflow.pyfunc.PythonModel):
    """pyfunc serving: predict(list of prompts) -> list of texts (prompt + continuation)."""

    def load_context(self, context) -> None:
        from model.sample import load_model

        self.loaded = load_model(context.artifacts["checkpoint"])

    def predict(
        self, context, model_input: list[str], params: dict[str, Any] | None = None
    ) -> list[str]:
        from model.sample import sample_text

        params = params or {}
        return [
            sample_text(
                self.loaded,
                str(prompt),
                max_new_tokens=int(params.get("max_new_tokens", 200)),
                temperature=float(params.get("temperature", 1.0)),
                top_k=params.get("top_k"),
                seed=int(params.get("seed", 1337)),
            )[0]
            for prompt in model_input
        ]


_warm_up: threading.Thread | None = None


def _fill_package_cache() -> None:
    try:
        from mlflow.utils.requirements_utils import _init_modules_to_packages_map

        _init_modules_to_packages_map()
    except Exception:  # a private MLflow helper: if it goes away, log_model does the work itself
        pass


def warm_up_in_background() -> None:
    """Do ahead, in a background thread, the slow part of logging a model.

    Logging a model checks its requirements against the installed packages, and MLflow first
    maps every installed distribution's files to modules (about 1 s on our 2-core machines, once
    per process). Started with the pipeline, that runs while the stages before the model log
    run (training in a process of its own), and the model log then takes a fraction of a second.
    """
    global _warm_up
    if _warm_up is None:
        _warm_up = threading.Thread(target=_fill_package_cache, name="mlflow-warm-up", daemon=True)
        _warm_up.start()


def log_model(tracker: Tracker, run_id: str, checkpoint_path: str | Path) -> str:
    """Log the checkpoint as the run's MLflow model; returns the model's URI."""
    import torch

    if _warm_up is not None:
        _warm_up.join()  # MLflow's package cache is not safe to fill from two threads at once
    requirements = [f"torch=={torch.__version__.split('+')[0]}", "numpy", "tokenizers", "pyarrow"]
    with _pointed_at(tracker), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=GPTTextGenerator(),
            artifacts={"checkpoint": str(checkpoint_path)},
            pip_requirements=requirements,
        )
    return info.model_uri


@contextmanager
def _pointed_at(tracker: Tracker) -> Iterator[None]:
    """MLflow's fluent API and models:/ URIs follow the global tracking and registry URIs."""
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(tracker.tracking_uri)
    mlflow.set_registry_uri(tracker.tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


def log_checkpoint_model(tracker: Tracker, run_id: str | None, checkpoint_uri: str) -> str:
    """Log the stored checkpoint (any store URI) as the run's MLflow model; the model's URI."""
    import storage

    with tempfile.TemporaryDirectory() as tmp:
        local = storage.get_file(checkpoint_uri, Path(tmp) / CHECKPOINT_NAME)
        return log_model(tracker, run_id, local)


CHECKPOINT_TAG = "checkpoint_sha256"


def version_of_checkpoint(tracker: Tracker, name: str, sha256: str) -> str | None:
    """The first version of `name` registered from the checkpoint with this sha256, if any."""
    found = tracker.client.search_model_versions(
        f"name = '{name}' and tags.{CHECKPOINT_TAG} = '{sha256}'"
    )
    return str(min(int(v.version) for v in found)) if found else None


def register(tracker: Tracker, name: str, model_uri: str, run_id: str, tags: dict) -> str:
    """A new version of `name` for this model; returns the version number."""
    client = tracker.client
    if client.search_registered_models(filter_string=f"name = '{name}'") == []:
        client.create_registered_model(name, description="gptpipe models trained on one corpus")
    # an MLflow 3 logged model (models:/m-<id>) must name its model_id too
    model_id = model_uri.split("/", 1)[1] if model_uri.startswith("models:/m-") else None
    with _pointed_at(tracker):  # the client resolves models:/m-<id> through the global URIs
        version = client.create_model_version(
            name, model_uri, run_id=run_id, tags=tags, model_id=model_id
        )
    return str(version.version)


def current_champion(tracker: Tracker, name: str):
    """The version holding the champion alias, or None."""
    try:
        return tracker.client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None


def artifact_location(tracker: Tracker, model_uri: str) -> str:
    """Where a model's files are: models:/NAME/VERSION, models:/NAME@ALIAS or models:/m-<id>."""
    client = tracker.client
    source = model_uri
    match = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([\w-]+))", model_uri)
    if match and not match.group(1).startswith("m-"):
        name, version, alias = match.groups()
        found = (
            client.get_model_version(name, version)
            if version
            else client.get_model_version_by_alias(name, alias)
        )
        source = found.source
    if source.startswith("models:/m-"):
        return client.get_logged_model(source.split("/", 1)[1]).artifact_location
    return source


def download_checkpoint(tracker: Tracker, model_uri: str, dest: str | Path) -> Path:
    """The checkpoint inside an MLflow model (models:/NAME/1, models:/NAME@alias, runs:/...)."""
    try:
        location = artifact_location(tracker, model_uri)
        with _pointed_at(tracker):
            local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(dest))
    except mlflow.exceptions.MlflowException as exc:
        raise GptpipeError(
            f"cannot fetch {model_uri} from MLflow: {first_line(exc, limit=300)}"
        ) from None
    found = sorted(Path(local).rglob(CHECKPOINT_NAME))
    if not found:
        raise GptpipeError(f"{model_uri} holds no gptpipe checkpoint ({CHECKPOINT_NAME})")
    return found[0]


class FetchedCheckpoint:
    """A context manager: a registry model's checkpoint in a temporary folder."""

    def __init__(self, tracker: Tracker, model_uri: str):
        self.tracker, self.model_uri = tracker, model_uri

    def __enter__(self) -> str:
        self._tmp = tempfile.TemporaryDirectory()
        return str(download_checkpoint(self.tracker, self.model_uri, self._tmp.name))

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()
