"""The trained model as an MLflow model, its registered versions and the `champion` alias.

The MLflow model is logged from code (tasks/served_model.py) with the `model` and `storage`
packages shipped as its code and gptpipe's own checkpoint as its one artifact, so MLflow loads and
serves it from its declared requirements alone, gptpipe not installed. Its signature has a params
schema (max_new_tokens, temperature, top_k, seed), so settings sent to a scoring server are used.

gptpipe itself never unpickles a model: `gptpipe sample --model models:/NAME@champion` downloads
the checkpoint file and loads it with weights_only=True like any other.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version as installed_version
from pathlib import Path

import mlflow.pyfunc
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema

import model
import storage
from model.checkpoint import CHECKPOINT_NAME
from storage.errors import GptpipeError, first_line
from storage.tracking import Tracker
from tasks.served_model import SAMPLING_PARAMS  # (it sets its model for MLflow, as it must)

CHAMPION = "champion"
CHALLENGER = "challenger"  # the latest version that lost to the champion
CHECKPOINT_TAG = "checkpoint_sha256"
VAL_LOSS = "val_loss"  # the metric each logged model carries: search_logged_models ranks by it
VAL_BPB = "val_bpb"  # the val text's bits per byte (the evaluate stage's), on the logged model too

URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")

SERVED_MODEL = Path(__file__).with_name("served_model.py")
# what served_model.py imports of gptpipe: the two packages, shipped whole with the model
SHIPPED_CODE = [Path(model.__file__).parent, Path(storage.__file__).parent]
# the distributions served_model.py and the shipped code import (model.config reads YAML)
SERVING_DISTRIBUTIONS = ["torch", "numpy", "pandas", "tokenizers", "pyyaml"]
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.string)]),  # prompts
    outputs=Schema([ColSpec(DataType.string)]),  # each prompt and its continuation
    params=SAMPLING_PARAMS,
)
# an empty prompt suits every tokenizer; a few greedy tokens keep logging's own check quick
INPUT_EXAMPLE = ([""], {"max_new_tokens": 8, "temperature": 0.0})


def serving_requirements() -> list[str]:
    """The model's pip requirements: each serving distribution pinned to the installed version
    (torch without its local build tag: +cpu is not on PyPI)."""
    return [f"{name}=={installed_version(name).split('+')[0]}" for name in SERVING_DISTRIBUTIONS]


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


def log_model(tracker: Tracker, run_id: str, checkpoint_path: str | Path, *, step: int) -> str:
    """Log the checkpoint as the run's MLflow model; returns the model's URI (models:/m-<id>).

    The model is logged at the checkpoint's `step` (known from the training's summary, so the
    checkpoint is not read again for it): MLflow links the run's metrics of the model's step to
    the model, so a train run's model carries the final val_loss (at step 0 it would carry the
    untrained one), and search_logged_models ranks the versions by it.
    """
    if _warm_up is not None:
        _warm_up.join()  # MLflow's package cache is not safe to fill from two threads at once
    # logging loads the model to check the input example, putting the shipped code (in a
    # temporary folder) first on sys.path: this process keeps its own path
    path = list(sys.path)
    try:
        with _pointed_at(tracker), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(SERVED_MODEL),
                code_paths=[str(p) for p in SHIPPED_CODE],
                artifacts={"checkpoint": str(checkpoint_path)},
                pip_requirements=serving_requirements(),
                signature=SIGNATURE,
                input_example=INPUT_EXAMPLE,
                step=step,
            )
    finally:
        sys.path[:] = path
    return info.model_uri


@contextmanager
def _pointed_at(tracker: Tracker) -> Iterator[None]:
    """MLflow's fluent API and models:/ URIs follow the global tracking and registry URIs.

    MLflow mirrors each URI it is given into os.environ (for subprocesses), so the URIs set
    before are those environment variables; restoring them as such, an unset one stays unset
    (get_tracking_uri()'s default, pinned, would point every later subprocess at ./mlflow.db).
    """
    previous = {name: os.environ.get(name) for name in URI_VARIABLES}
    mlflow.set_tracking_uri(tracker.tracking_uri)
    mlflow.set_registry_uri(tracker.tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous["MLFLOW_TRACKING_URI"])  # None: unset
        mlflow.set_registry_uri(previous["MLFLOW_REGISTRY_URI"])
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def log_checkpoint_model(
    tracker: Tracker, run_id: str | None, checkpoint_uri: str, *, step: int
) -> str:
    """Log the stored checkpoint (any store URI) as the run's MLflow model; the model's URI."""
    with tempfile.TemporaryDirectory() as tmp:
        local = storage.get_file(checkpoint_uri, Path(tmp) / CHECKPOINT_NAME)
        return log_model(tracker, run_id, local, step=step)


def version_of_checkpoint(tracker: Tracker, name: str, sha256: str) -> str | None:
    """The first version of `name` registered from the checkpoint with this sha256, if any."""
    found = tracker.client.search_model_versions(
        f"name = '{name}' and tags.{CHECKPOINT_TAG} = '{sha256}'"
    )
    return str(min(int(v.version) for v in found)) if found else None


def register(tracker: Tracker, name: str, model_uri: str, tags: dict) -> str:
    """A new version of `name` (created if need be) for this model; returns the version number.

    MLflow's register_model finds the model's run and id from its URI (models:/m-<id>)."""
    with _pointed_at(tracker):
        version = mlflow.register_model(model_uri, name, tags=tags)
    if version.version in (1, "1"):
        tracker.client.update_registered_model(
            name, description="gptpipe models trained on one corpus"
        )
    return str(version.version)


def link_val_loss(tracker: Tracker, model_uri: str, run_id: str, val_loss: float) -> None:
    """A val loss as a metric of the logged model (logged into `run_id`), for a model whose run
    holds none (see log_model), so that it too is ranked by `mlflow.search_logged_models(
    order_by=[{"field_name": "metrics.val_loss"}])`. (A model version does not keep its
    model_id in MLflow's own registry: the id comes from the model's MLmodel.)"""
    link_metric(tracker, model_uri, run_id, VAL_LOSS, val_loss)


def link_metric(tracker: Tracker, model_uri: str, run_id: str, key: str, value: float) -> None:
    """A metric of the logged model at ``model_uri``, logged into ``run_id`` (see link_val_loss)."""
    with _pointed_at(tracker):
        model_id = mlflow.models.get_model_info(model_uri).model_id
    tracker.client.log_metric(run_id, key, value, model_id=model_id)


def version_by_alias(tracker: Tracker, name: str, alias: str = CHAMPION):
    """The version holding the alias (the champion by default), or None."""
    try:
        return tracker.client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def download_checkpoint(tracker: Tracker, model_uri: str, dest: str | Path) -> Path:
    """The checkpoint inside an MLflow model (models:/NAME/1, models:/NAME@alias, models:/m-<id>,
    runs:/...), downloaded by MLflow, which resolves every such URI itself (through the global
    registry URI, whatever registry_uri download_artifacts is given)."""
    try:
        with _pointed_at(tracker):
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dest))
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
