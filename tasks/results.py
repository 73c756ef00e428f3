"""What the stages hand each other: frozen, typed results, and the specs that travel together.

Tasks return these and flows read them by attribute. They are plain frozen dataclasses of
built-in values, so Prefect can pickle them between tasks, into its result store and to Dask or
Ray workers. `to_dict()` gives the JSON shape the run's summary.json has always had (an artifact
as ``{"uri", "sha256", "bytes"}``, the shape the stages' stored manifests use too).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import storage
from storage.tracking import DEFAULT_EXPERIMENT


@dataclass(frozen=True)
class Artifact:
    """A stored file as the stages record it: where it is, its sha256 and its size in bytes."""

    uri: str
    sha256: str
    size: int

    @classmethod
    def of(cls, uri: str) -> Artifact:
        """The artifact at ``uri``, hashed and measured now."""
        return cls(uri=uri, sha256=storage.sha256(uri), size=storage.size(uri))

    @classmethod
    def from_dict(cls, ref: Mapping[str, Any]) -> Artifact:
        """From a stored manifest's reference, ``{"uri", "sha256", "bytes"}``."""
        return cls(uri=ref["uri"], sha256=ref["sha256"], size=ref["bytes"])

    def to_dict(self) -> dict[str, str | int]:
        return {"uri": self.uri, "sha256": self.sha256, "bytes": self.size}


def artifact_dicts(artifacts: Mapping[str, Artifact]) -> dict[str, dict[str, str | int]]:
    """Named artifacts as a manifest's (and `StageRun.record_io`'s) ``outputs`` mapping."""
    return {name: artifact.to_dict() for name, artifact in artifacts.items()}


@dataclass(frozen=True)
class Tracking:
    """Where the stages' MLflow runs go: the tracking URI, the experiment, the pipeline's run."""

    uri: str | None
    experiment: str = DEFAULT_EXPERIMENT
    parent_id: str | None = None


@dataclass(frozen=True)
class Workspace:
    """Where the stages write (the store) and log (MLflow, or nowhere), and which caches to skip."""

    store: str
    tracking: Tracking | None = None
    refresh: frozenset[str] = frozenset()
    owner: str = ""  # who runs, as other runs waiting on its leases see it (e.g. "gptpipe run ID")

    def refreshes(self, stage: str) -> bool:
        """Whether ``stage`` runs again even when the store holds its cached result."""
        return stage in self.refresh


@dataclass(frozen=True)
class SamplingSettings:
    """How the sample stage generates: from which prompt, how many tokens, how randomly."""

    prompt: str = ""
    max_new_tokens: int = 500
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 1337

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class _StoredStage:
    """A stage whose cached manifest is its result: ``{"metadata", "outputs", ...}``.

    The subclass's Artifact fields are the manifest's outputs (same names); its other fields are
    the manifest's own keys.
    """

    metadata: dict[str, Any]
    cached: bool
    mlflow_run_id: str | None = None

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], *, cached: bool, mlflow_run_id: str | None):
        values: dict[str, Any] = {"cached": cached, "mlflow_run_id": mlflow_run_id}
        for f in fields(cls):
            if f.name in manifest["outputs"]:
                values[f.name] = Artifact.from_dict(manifest["outputs"][f.name])
            elif f.name in manifest:
                values[f.name] = manifest[f.name]
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        outputs = {k: v.to_dict() for k, v in values.items() if isinstance(v, Artifact)}
        rest = {k: v for k, v in values.items() if not isinstance(v, Artifact)}
        return {"outputs": outputs, **rest}


@dataclass(frozen=True, kw_only=True)
class TokenizeResult(_StoredStage):
    """The tokenized dataset (its manifest) and the tokenizer, with the dataset's metadata."""

    tokens: Artifact
    tokenizer: Artifact
    source: str = ""


@dataclass(frozen=True, kw_only=True)
class SplitResult(_StoredStage):
    """The train and val datasets (their manifests) and how the tokens were divided."""

    train: Artifact
    val: Artifact


@dataclass(frozen=True)
class TrainResult:
    """The trained checkpoint, the MLflow model logged from it, and the training's summary.

    ``summary`` is what rank 0 wrote as summary.json (step, n_params, world_size, the precision
    chosen, the loss history ...); the fields the flows read are attributes of their own.
    """

    checkpoint: Artifact
    step: int
    n_params: int
    world_size: int
    cached: bool
    model_uri: str | None
    mlflow_run_id: str | None
    summary: dict[str, Any] = field(repr=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainResult:
        """Back from `to_dict` (a sweep keeps its trials' results so, in its study)."""
        own = ("cached", "outputs", "model_uri", "mlflow_run_id")
        return cls(
            checkpoint=Artifact.from_dict(data["outputs"]["checkpoint"]),
            step=data["step"],
            n_params=data["n_params"],
            world_size=data["world_size"],
            cached=data["cached"],
            model_uri=data["model_uri"],
            mlflow_run_id=data["mlflow_run_id"],
            summary={k: v for k, v in data.items() if k not in own},
        )

    def to_dict(self, *, history: bool = True) -> dict[str, Any]:
        summary = (
            self.summary if history else {k: v for k, v in self.summary.items() if k != "history"}
        )
        return {
            **summary,
            "cached": self.cached,
            "outputs": {"checkpoint": self.checkpoint.to_dict()},
            "model_uri": self.model_uri,
            "mlflow_run_id": self.mlflow_run_id,
        }


@dataclass(frozen=True)
class Pruned:
    """A training that a sweep's pruner stopped on purpose: the step of the evaluation that
    stopped it and that evaluation's val loss. The train task then ends in a Completed state
    named Pruned whose result this is, not in a Failed one (tasks.train)."""

    step: int
    val_loss: float

    @property
    def message(self) -> str:
        return f"pruned at step {self.step} (val loss {self.val_loss:.4f})"


@dataclass(frozen=True)
class EvaluateResult:
    """The final model's eval-mode losses, and the batches they were measured on.

    ``val_bpb`` is the val text's bits per byte (`model.bits`): nats summed over the tokens of
    ``bpb_segments`` segments of the val text, over their ``bpb_bytes`` UTF-8 bytes, over ln 2;
    ``bpb_evaluation`` says how the segments were cut (JSON: val data, tokenizer, segment length,
    how many, device) and ``bpb_scores_uri`` is the store file of the per-segment nats, which
    the register stage pairs with the champion's on the same segments.
    """

    train_loss: float
    val_loss: float
    eval_iters: int
    batch_size: int
    seed: int
    mlflow_run_id: str | None = None
    val_bpb: float | None = None
    bpb_segments: int = 0
    bpb_bytes: int = 0
    bpb_evaluation: str | None = None
    bpb_scores_uri: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SampleResult:
    """The generated text, stored as samples.txt, and the settings it was made with."""

    text: str
    notes: tuple[str, ...]
    settings: SamplingSettings
    samples: Artifact
    mlflow_run_id: str | None = None

    def to_dict(self, *, text: bool = True) -> dict[str, Any]:
        shown = {"text": self.text} if text else {}
        return {
            **shown,
            "notes": list(self.notes),
            "settings": self.settings.to_dict(),
            "outputs": {"samples": self.samples.to_dict()},
            "mlflow_run_id": self.mlflow_run_id,
        }


@dataclass(frozen=True)
class RegisterResult:
    """The model version this run registered, and whether `champion` moved to it (and why).

    The comparison with the champion is paired, in bits per byte on this run's val text
    (`model.bits.compare`): ``val_bpb`` is this version's on all the segments (the evaluate
    stage's) and ``champion_val_bpb`` the champion's on the ``bpb_segments`` segments both could
    encode (``bpb_left_out``: the share of the segments' bytes left out because one tokenizer
    cannot encode them); ``bpb_improvement`` is the champion's minus this version's on those
    (positive: this one is better), ``bpb_stderr`` its standard error,
    ``min_improvement`` the margin it had to beat, ``significant`` whether it beat it (a win)
    or lost by more than it (a loss that counted). All None without a comparison.
    """

    name: str
    version: str
    champion: bool
    champion_version: str | None
    previous_champion_val_loss: float | None
    reason: str
    reused: bool = False  # the checkpoint was a version already: no new one was registered
    val_bpb: float | None = None
    champion_val_bpb: float | None = None
    bpb_improvement: float | None = None
    bpb_stderr: float | None = None
    min_improvement: float | None = None
    significant: bool | None = None
    bpb_left_out: float | None = None
    bpb_segments: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
