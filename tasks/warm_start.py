"""Warm starts: which checkpoint tonight's training begins from, and whose vocabulary it keeps.

The flow calls `resolve_warm_start` before tokenizing. It turns what the user asked for
(``init_from``: None, "champion", "models:/NAME/VERSION" or "models:/NAME@ALIAS", or a checkpoint
path / store URI; ``vocab``: "keep" or "fresh") into what the stages take:

- ``WarmStart.init_from``, a `model.checkpoint.InitFrom` (URI, sha256, label) for the train
  stage's ``init_from``: a registered version's checkpoint is copied into the store, under
  ``models/warm-start-SHA/ckpt.pt`` (named by its content), so every rank and every machine that
  shares the store reads the same bytes; a path or URI is used where it is;
- ``WarmStart.base_tokenizer``, an `Artifact` for the tokenize stage's ``base_tokenizer``: the
  tokenizer the starting checkpoint was trained with (written beside it as ``tokenizer.json``),
  whose ids tonight's vocabulary keeps. Without init_from, "keep" keeps the champion's.

"champion" when there is no champion yet (or no MLflow) is a cold start, said in a log line.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import storage
from model.checkpoint import CHECKPOINT_NAME, InitFrom, checkpoint_from_bytes
from model.tokenizer import tokenizer_from_json
from storage.errors import GptpipeError, first_line
from storage.tracking import redact
from tasks.results import Artifact, Workspace

__all__ = ["CHAMPION_SOURCE", "VOCAB_CHOICES", "InitFrom", "WarmStart", "resolve_warm_start"]

CHAMPION_SOURCE = "champion"
VOCAB_CHOICES = ("keep", "fresh")
# models:/NAME/VERSION and models:/NAME@ALIAS (MLflow's registry URIs of one version)
_VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


@dataclass(frozen=True)
class WarmStart:
    """What a run starts from: the checkpoint (None: a fresh init) and the base tokenizer whose
    ids tonight's keeps (None: a fresh vocabulary), and one line that says so."""

    init_from: InitFrom | None
    base_tokenizer: Artifact | None
    note: str

    def to_dict(self) -> dict[str, Any]:
        """For summary.json: what the run started from (both None on a cold start)."""
        return {
            "init_from": self.init_from.to_dict() if self.init_from else None,
            "base_tokenizer": self.base_tokenizer.to_dict() if self.base_tokenizer else None,
            "note": self.note,
        }


def resolve_warm_start(
    workspace: Workspace,
    model_name: str,
    *,
    init_from: str | None,
    vocab: str = "keep",
    tokenizer: str | None = None,
    log: Callable[[str], None] | None = None,
) -> WarmStart:
    """Resolve ``init_from`` and ``vocab`` (see the module docstring) against the workspace's
    MLflow registry (model ``model_name``) and store. A version or file that does not exist is
    one GptpipeError line. tokenizer: this run's tokenizer kind ("char" | "bpe"), if known: a
    champion of another kind is then no base for a cold start (logged), and refused as a warm
    start's."""
    log = log or _default_log
    if vocab not in VOCAB_CHOICES:
        raise GptpipeError(f"vocab must be one of {', '.join(VOCAB_CHOICES)}, got {vocab!r}")
    if init_from is not None and (not isinstance(init_from, str) or not init_from.strip()):
        raise GptpipeError(
            "init_from must be champion, models:/NAME/VERSION or a checkpoint path, "
            f"got {init_from!r}"
        )
    keep = vocab == "keep"
    if init_from is None:
        if not keep:
            return WarmStart(None, None, "cold start, fresh vocabulary")
        found = _champion(workspace, model_name, log)
        if found is None:
            return WarmStart(None, None, "cold start, fresh vocabulary (no champion to keep)")
        init, base = found
        if tokenizer is not None and _kind(base) != tokenizer:
            log(f"the champion ({init.label}) uses a {_kind(base)} tokenizer: a fresh vocabulary")
            return WarmStart(None, None, "cold start, fresh vocabulary")
        note = f"cold start, keeping the vocabulary of {init.label}"
        log(note)
        return WarmStart(None, base, note)
    source = init_from.strip()
    if source == CHAMPION_SOURCE:
        found = _champion(workspace, model_name, log)
        if found is None:
            log(f"init_from champion: {model_name} has no champion yet: a cold start")
            return WarmStart(None, None, "cold start (no champion yet)")
    elif source.startswith("models:/"):
        found = _registered(workspace, source)
    else:
        found = _checkpoint_file(workspace, source)
    init, base = found
    if tokenizer is not None and _kind(base) != tokenizer:
        raise GptpipeError(
            f"init_from {init.label} was trained with a {_kind(base)} tokenizer and this run's "
            f"is {tokenizer}: set tokenizer={_kind(base)}, or train without init_from"
        )
    kept = ", keeping its vocabulary" if keep else ", fresh vocabulary"
    note = f"warm start from {init.label}{kept}"
    log(note)
    return WarmStart(init, base if keep else None, note)


def _default_log(message: str) -> None:
    try:
        from prefect import get_run_logger

        get_run_logger().info(message)
    except Exception:  # no Prefect run here (a script, a test): plain logging
        logging.getLogger("gptpipe").info(message)


def _kind(base: Artifact) -> str:
    return tokenizer_from_json(storage.get_bytes(base.uri).decode("utf-8")).kind


def _tracker(workspace: Workspace):
    from tasks.common import tracker_for

    return tracker_for(workspace.tracking)


def _champion(
    workspace: Workspace, model_name: str, log: Callable[[str], None]
) -> tuple[InitFrom, Artifact] | None:
    """The champion's checkpoint and tokenizer in the store, or None (no MLflow, no champion)."""
    tracker = _tracker(workspace)
    if tracker is None:
        log("no MLflow tracking: no champion to start from")
        return None
    from tasks.registry import version_by_alias

    version = version_by_alias(tracker, model_name)
    if version is None:
        return None
    return _fetch_version(workspace, tracker, model_name, version)


def _registered(workspace: Workspace, uri: str) -> tuple[InitFrom, Artifact]:
    """models:/NAME/VERSION or models:/NAME@ALIAS: that version's checkpoint and tokenizer."""
    tracker = _tracker(workspace)
    if tracker is None:
        raise GptpipeError(f"init_from {uri} needs MLflow tracking (a tracking URI)")
    version = registered_version(tracker, uri)
    return _fetch_version(workspace, tracker, version.name, version)


def registered_version(tracker, uri: str):
    """The registered version ``uri`` (models:/NAME/VERSION or models:/NAME@ALIAS) names; one
    line when it is not one or does not exist (the run request checks this before any work)."""
    import mlflow

    from tasks.registry import version_by_alias

    match = _VERSION_URI.match(uri)
    if match is None:
        raise GptpipeError(
            f"init_from {uri}: not a model version; use models:/NAME/VERSION or models:/NAME@ALIAS"
        )
    name = match["name"]
    if match["alias"]:
        version = version_by_alias(tracker, name, match["alias"])
        if version is None:
            raise GptpipeError(f"init_from {uri}: model {name} has no version @{match['alias']}")
        return version
    try:
        return tracker.client.get_model_version(name, match["version"])
    except mlflow.exceptions.MlflowException:
        raise GptpipeError(
            f"init_from {uri}: model {name} has no version {match['version']} "
            f"in {redact(tracker.tracking_uri)}"
        ) from None


def _fetch_version(workspace: Workspace, tracker, name: str, version) -> tuple[InitFrom, Artifact]:
    """A registered version's checkpoint, checked against its checkpoint tag, in the store."""
    from tasks.registry import CHECKPOINT_TAG, download_checkpoint

    label = f"models:/{name}/{version.version}"
    with tempfile.TemporaryDirectory() as tmp:
        local = download_checkpoint(tracker, label, tmp)
        raw = local.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    tagged = (version.tags or {}).get(CHECKPOINT_TAG)
    if tagged and tagged != sha:
        raise GptpipeError(
            f"init_from {label}: its checkpoint's sha256 {sha[:12]}... is not the "
            f"{tagged[:12]}... it was registered with"
        )
    ckpt = checkpoint_from_bytes(raw, label)
    folder = storage.join(workspace.store, "models", f"warm-start-{sha[:20]}")
    uri = storage.join(folder, CHECKPOINT_NAME)
    if not (storage.exists(uri) and storage.sha256(uri) == sha):
        storage.put_bytes(uri, raw)
    return InitFrom(uri, sha, label), _tokenizer_beside(folder, ckpt)


def _checkpoint_file(workspace: Workspace, source: str) -> tuple[InitFrom, Artifact]:
    """A checkpoint file (a path or store URI), used where it is; its tokenizer in the store."""
    try:
        there = storage.exists(source)
    except GptpipeError:
        raise
    except Exception as exc:  # a URI scheme or bucket the store cannot reach
        raise GptpipeError(f"init_from {source}: cannot read it ({first_line(exc)})") from None
    if not there:
        raise GptpipeError(
            f"init_from {source}: no such checkpoint file (give champion, models:/NAME/VERSION "
            "or the path of a ckpt.pt)"
        )
    raw = storage.get_bytes(source)
    sha = hashlib.sha256(raw).hexdigest()
    ckpt = checkpoint_from_bytes(raw, source)
    folder = storage.join(workspace.store, "models", f"warm-start-{sha[:20]}")
    return InitFrom(source, sha, source), _tokenizer_beside(folder, ckpt)


def _tokenizer_beside(folder: str, ckpt: dict) -> Artifact:
    """The checkpoint's tokenizer as ``folder/tokenizer.json`` (the same bytes every time)."""
    text = tokenizer_from_json(ckpt["tokenizer"]).to_json().encode("utf-8")
    uri = storage.join(folder, "tokenizer.json")
    if not (storage.exists(uri) and storage.get_bytes(uri) == text):
        storage.put_bytes(uri, text)
    return Artifact.of(uri)


def as_the_champion_started(
    workspace: Workspace, model_name: str, *, config: dict, nproc: int
) -> WarmStart | None:
    """On a night whose corpus is the champion's own, "start from the champion" means "start as
    the champion started": the same base tokenizer and starting weights (none, for a champion
    trained from scratch), so that with the same config and ranks every stage's key is the
    champion's and its results are re-used: the night costs seconds, no training and no new
    version. None when the champion's run does not say how it started (a sweep's version, a run
    of another store) or it was trained with other settings: then warm start as usual."""
    from tasks.common import tracker_for
    from tasks.data_check import run_summary
    from tasks.registry import version_by_alias

    tracker = tracker_for(workspace.tracking)
    champion = version_by_alias(tracker, model_name) if tracker is not None else None
    summary = run_summary(workspace.store, champion.tags) if champion is not None else None
    if summary is None or summary.get("config") != config or summary.get("world_size") != nproc:
        return None
    started = summary.get("warm_start") or {}
    init, base = started.get("init_from"), started.get("base_tokenizer")
    return WarmStart(
        init_from=InitFrom.from_dict(init) if init else None,
        base_tokenizer=Artifact.from_dict(base) if base else None,
        note=f"the corpus is the one champion v{champion.version} was trained on: starting as "
        "it started, so its results are re-used",
    )
