from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass

import numpy as np
from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError

import storage
from model.bits import MIN_RELATIVE_IMPROVEMENT, NOISE_STDERRS, Paired, compare
from model.dist import pick_device
from model.evaluate import checkpoint_bits, checkpoint_segment_nats, val_segments
from model.tokenizer import tokenizer_from_json
from storage.errors import GptpipeError
from storage.lease import Lease
from tasks.cache import lease_dir
from tasks.common import IO_RETRIES, run_owner, tracker_for
from tasks.evaluate import bpb_evaluation, load_scores, save_scores, scores_uri
from tasks.registry import (
    CHALLENGER,
    CHAMPION,
    CHECKPOINT_TAG,
    VAL_BPB,
    FetchedCheckpoint,
    link_metric,
    link_val_loss,
    log_checkpoint_model,
    register,
    version_by_alias,
    version_of_checkpoint,
)
from tasks.results import (
    Artifact,
    EvaluateResult,
    RegisterResult,
    SplitResult,
    TrainResult,
    Workspace,
)


@task(name="register", **IO_RETRIES)
def register_model(
    workspace: Workspace,
    name: str,
    *,
    trained: TrainResult,
    evaluated: EvaluateResult,
    splits: SplitResult,
    tokenizer: Artifact,
    run_id: str,
    min_improvement: float | None = None,
) -> RegisterResult:
    """Register a new version; `champion` moves to it only if it beats the champion by more than
    the comparison's noise, else `challenger` does (the latest version that lost to it).

    Both are scored on the same segments of this run's val text in bits per byte, each with its
    own tokenizer (`_versus_champion`): the champion's recorded per-segment scores when the
    store holds them for this evaluation (same val data, tokenizer, segments and device), else
    the champion scored afresh. ``min_improvement`` is the margin in bits per byte the new
    version must win by (None: `model.bits.Paired.margin`'s default, the larger of 2 standard
    errors of the paired difference and 2% of the champion's bits per byte).

    One registration per model name at a time (a lease in the store): two runs that trained the
    same checkpoint register it once, and champion decisions do not interleave.
    """
    check_min_improvement(min_improvement)
    logger = _logger()
    with _one_registration_at_a_time(workspace, name, logger.info):
        tracker = tracker_for(workspace.tracking)
        new = _Candidate.of(trained, evaluated, splits, tokenizer)
        version = version_of_checkpoint(tracker, name, trained.checkpoint.sha256)
        reused = version is not None
        if reused:
            logger.info("%s version %s is this checkpoint already: re-using it", name, version)
        else:
            version = _register_new_version(tracker, name, new, run_id)
        if trained.mlflow_run_id:  # the train run links the version, new or re-used
            tracker.client.set_tag(
                trained.mlflow_run_id, "gptpipe.model_version", f"{name}/{version}"
            )
            tracker.client.set_tag(
                trained.mlflow_run_id, "gptpipe.model_version_reused", str(reused)
            )
        verdict = _versus_champion(
            tracker, name, version, workspace=workspace, new=new, min_improvement=min_improvement
        )
        alias = _record_verdict(tracker, name, version, verdict)
        moved = f" -> {alias}" if alias else ""
        said = "re-used" if reused else "registered"
        logger.info("%s %s version %s; %s%s", said, name, version, verdict.reason, moved)
        return _result(name, version, verdict, reused=reused, val_bpb=evaluated.val_bpb)


@dataclass(frozen=True)
class _Candidate:
    """This run's model, up for registration, and what it was measured on: the stage results
    the registration and the comparison with the champion read. ``evaluation`` describes how its
    val loss was measured (a version tag: the champion's val loss counts only if it matches)."""

    trained: TrainResult
    evaluated: EvaluateResult
    splits: SplitResult
    tokenizer: Artifact
    evaluation: str

    @classmethod
    def of(
        cls,
        trained: TrainResult,
        evaluated: EvaluateResult,
        splits: SplitResult,
        tokenizer: Artifact,
    ) -> _Candidate:
        evaluation = json.dumps(
            {
                "val_sha256": splits.val.sha256,
                "tokenizer_sha256": tokenizer.sha256,
                "eval_iters": evaluated.eval_iters,
                "batch_size": evaluated.batch_size,
                "seed": evaluated.seed,
                "device": pick_device("auto").type,
            },
            sort_keys=True,
        )
        return cls(trained, evaluated, splits, tokenizer, evaluation)


def _register_new_version(tracker, name: str, new: _Candidate, run_id: str) -> str:
    """A new version of ``name`` for this run's checkpoint, tagged with how it was measured and
    what it started from; its number."""
    trained, evaluated = new.trained, new.evaluated
    model_uri = trained.model_uri
    if model_uri is None:
        # a training re-used from the cache logged no model: log it now, into its own run,
        # which trained nothing and so gives the model no val_loss: it gets this one
        model_uri = log_checkpoint_model(
            tracker, trained.mlflow_run_id, trained.checkpoint.uri, step=trained.step
        )
        loss_run = evaluated.mlflow_run_id or trained.mlflow_run_id
        if loss_run:
            link_val_loss(tracker, model_uri, loss_run, evaluated.val_loss)
    metric_run = evaluated.mlflow_run_id or trained.mlflow_run_id
    if evaluated.val_bpb is not None and metric_run:  # the logged model's val_bpb
        link_metric(tracker, model_uri, metric_run, VAL_BPB, evaluated.val_bpb)
    return register(tracker, name, model_uri, tags=_version_tags(new, run_id))


def _version_tags(new: _Candidate, run_id: str) -> dict[str, str]:
    """A new version's tags: its val loss and bits per byte and how they were measured, the run
    and checkpoint it comes from, and the warm start it began from (or none)."""
    trained, evaluated = new.trained, new.evaluated
    tags = {
        "val_loss": f"{evaluated.val_loss:.6f}",
        "val_sha256": new.splits.val.sha256,
        "evaluation": new.evaluation,
        "gptpipe.run_id": run_id,
        CHECKPOINT_TAG: trained.checkpoint.sha256,
    }
    if evaluated.val_bpb is not None:
        tags["val_bpb"] = f"{evaluated.val_bpb:.6f}"
    if evaluated.bpb_evaluation:
        tags["bpb_evaluation"] = evaluated.bpb_evaluation
    started = trained.summary.get("init_from")  # a warm start's checkpoint, else none
    tags["init_from"] = started["label"] if started else "none (a fresh model)"
    if started:
        tags["init_from_sha256"] = started["sha256"]
    return tags


def _record_verdict(tracker, name: str, version: str, verdict: _Verdict) -> str | None:
    """The champion decision, in the registry: how the version fared (its tags) and the alias
    it takes, if any (returned). The loser of a comparison on the same val data becomes the
    challenger; a new champion that had lost before stops being the challenger."""
    if verdict.paired is not None:  # how it fared, on the version itself
        for key, value in _comparison_tags(verdict).items():
            tracker.client.set_model_version_tag(name, version, key, value)
    alias = CHAMPION if verdict.promote else CHALLENGER if verdict.compared else None
    if alias:
        tracker.client.set_registered_model_alias(name, alias, version)
    challenger = version_by_alias(tracker, name, CHALLENGER) if verdict.promote else None
    if challenger is not None and str(challenger.version) == version:  # it had lost before
        tracker.client.delete_registered_model_alias(name, CHALLENGER)
    return alias


def _result(
    name: str, version: str, verdict: _Verdict, *, reused: bool, val_bpb: float | None
) -> RegisterResult:
    promote, champion, paired = verdict.promote, verdict.champion, verdict.paired
    return RegisterResult(
        name=name,
        version=version,
        champion=promote,
        champion_version=version if promote else (str(champion.version) if champion else None),
        previous_champion_val_loss=verdict.champion_loss,
        reason=verdict.reason,
        reused=reused,
        val_bpb=val_bpb,
        champion_val_bpb=paired.old_bpb if paired else None,
        bpb_improvement=paired.improvement if paired else None,
        bpb_stderr=paired.stderr if paired else None,
        min_improvement=verdict.margin,
        significant=verdict.significant,
        bpb_left_out=paired.left_out if paired else None,
        bpb_segments=paired.segments if paired else None,
    )


def check_min_improvement(min_improvement: float | None) -> None:
    """None (derived from the noise), or a finite number of bits per byte >= 0."""
    if min_improvement is None:
        return
    if (
        isinstance(min_improvement, bool)
        or not isinstance(min_improvement, int | float)
        or not math.isfinite(min_improvement)
        or min_improvement < 0
    ):
        raise GptpipeError(
            "min_improvement must be a number of bits per byte >= 0 (or unset: the larger of "
            f"{NOISE_STDERRS:g} standard errors of the paired difference and "
            f"{MIN_RELATIVE_IMPROVEMENT:.0%} of the champion's bits per byte), got "
            f"{min_improvement!r}"
        )


def _comparison_tags(verdict: _Verdict) -> dict[str, str]:
    """The version's tags for its comparison with the champion (all strings)."""
    paired = verdict.paired
    return {
        "bpb_vs_champion": f"v{verdict.champion.version}",
        "champion_val_bpb": f"{paired.old_bpb:.6f}",
        "bpb_improvement": f"{paired.improvement:+.6f}",
        "bpb_stderr": f"{paired.stderr:.6f}",
        "bpb_margin": f"{verdict.margin:.6f}",
        "bpb_significant": str(verdict.significant).lower(),
        "bpb_left_out": f"{paired.left_out:.6f}",
        "bpb_segments": str(paired.segments),
    }


def _logger():
    """The Prefect run's logger; a plain one outside a Prefect run (register_model.fn)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("gptpipe.register")


@dataclass(frozen=True)
class _Verdict:
    """What the comparison with the champion decided, and on what."""

    champion: object | None  # the champion's ModelVersion, if there is one
    promote: bool
    reason: str
    paired: Paired | None = None  # the paired bits-per-byte comparison, if one was made
    margin: float | None = None  # what the improvement had to exceed
    champion_loss: float | None = None  # its val loss as recorded, when measured the same way

    @property
    def compared(self) -> bool:
        return self.paired is not None

    @property
    def significant(self) -> bool | None:
        """Whether the difference counted: a win or a loss by more than the margin."""
        if self.paired is None or self.margin is None:
            return None
        return abs(self.paired.improvement) > self.margin


def _versus_champion(
    tracker,
    name: str,
    version: str,
    *,
    workspace: Workspace,
    new: _Candidate,
    min_improvement: float | None = None,
) -> _Verdict:
    """Whether ``version`` (``new``) replaces the champion: paired, in bits per byte on this
    run's val text.

    Both models score the same segments of this run's val text, each with its own tokenizer
    (`model.bits`); segments the champion's tokenizer cannot encode are left out for both. The
    new version wins if it saves more than ``min_improvement`` bits per byte (default:
    `model.bits.Paired.margin`).
    """
    champion = version_by_alias(tracker, name)
    if champion is None:
        return _Verdict(None, True, "no champion yet")
    if str(champion.version) == version:
        return _Verdict(champion, False, f"v{version} is the champion already")
    bpb_evaluation, new_nats, n_bytes = _own_scores(
        workspace, trained=new.trained, evaluated=new.evaluated, splits=new.splits
    )
    old_nats, recorded = _champion_scores(
        tracker,
        name,
        champion,
        workspace=workspace,
        bpb_evaluation=bpb_evaluation,
        val_uri=new.splits.val.uri,
        tokenizer_uri=new.tokenizer.uri,
        batch_size=new.evaluated.batch_size,
    )
    champion_loss = None
    if champion.tags.get("evaluation") == new.evaluation and "val_loss" in champion.tags:
        champion_loss = float(champion.tags["val_loss"])
    paired = compare(new_nats, old_nats, n_bytes)
    if paired is None:
        return _Verdict(
            champion,
            False,
            f"champion v{champion.version}'s tokenizer cannot encode this run's val text (not "
            "two segments of it): not comparable",
            champion_loss=champion_loss,
        )
    margin = paired.margin(min_improvement)
    promote = paired.promotes(min_improvement)
    return _Verdict(
        champion,
        promote,
        _reason(champion.version, paired, margin, promote, recorded=recorded),
        paired=paired,
        margin=margin,
        champion_loss=champion_loss,
    )


def _reason(champion_version, paired: Paired, margin: float, promote: bool, *, recorded: bool):
    """The comparison in one line."""
    gain = paired.improvement
    how = f"{'better' if gain > 0 else 'worse'} by {abs(gain):.4f} ± {paired.stderr:.4f}"
    if promote:
        verdict = "beats it"
    elif gain > margin or -gain > margin:
        verdict = "loses to it"
    else:
        verdict = "within the margin: does not count"
    left_out = (
        f", {paired.left_out:.1%} of its bytes left out (characters the champion's tokenizer "
        "cannot encode)"
        if paired.left_out > 0
        else ""
    )
    return (
        f"val {paired.new_bpb:.4f} bits/byte vs champion v{champion_version}'s "
        f"{paired.old_bpb:.4f}{', as recorded' if recorded else ''} on the same val data"
        f"{left_out}: {how} (margin {margin:.4f}): {verdict}"
    )


def _one_registration_at_a_time(workspace: Workspace, name: str, log) -> Lease:
    """The lease on registering under ``name`` on this tracking server (kept in the store)."""
    name_key = hashlib.sha256(f"{workspace.tracking.uri}\0{name}".encode()).hexdigest()[:20]
    return Lease(
        lease_dir(workspace.store, "register", name_key),
        owner=run_owner(workspace),
        what=f"registering {name}",
        on_wait=log,
    )


def _own_scores(
    workspace: Workspace, *, trained: TrainResult, evaluated: EvaluateResult, splits: SplitResult
) -> tuple[str, np.ndarray, np.ndarray]:
    """This version's bits-per-byte evaluation and per-segment (nats, bytes): the evaluate
    stage's, or, where it kept none (a result from before bits per byte), measured now."""
    found = load_scores(evaluated.bpb_scores_uri)
    if found is not None and evaluated.bpb_evaluation:
        return evaluated.bpb_evaluation, *found
    bits = checkpoint_bits(
        trained.checkpoint.uri,
        splits.val.uri,
        n_segments=evaluated.eval_iters * evaluated.batch_size,
        batch_size=evaluated.batch_size,
    )
    evaluation = bpb_evaluation(
        splits.val.sha256, bits["tokenizer"], bits["segment_tokens"], bits["n_segments"]
    )
    save_scores(
        scores_uri(workspace.store, evaluation, trained.checkpoint.sha256),
        bits["nats"],
        bits["bytes"],
        evaluation=evaluation,
        checkpoint_sha256=trained.checkpoint.sha256,
    )
    return evaluation, bits["nats"], bits["bytes"]


def _champion_scores(
    tracker,
    name: str,
    champion,
    *,
    workspace: Workspace,
    bpb_evaluation: str,
    val_uri: str,
    tokenizer_uri: str,
    batch_size: int,
) -> tuple[np.ndarray, bool]:
    """The champion's per-segment nats on this run's segments, and whether they are recorded
    ones (the store holds its scores under the same evaluation: what scoring it again would
    give). Else it is fetched and scored now, with its own tokenizer, and its scores kept."""
    sha = champion.tags.get(CHECKPOINT_TAG)
    if sha:
        found = load_scores(scores_uri(workspace.store, bpb_evaluation, sha))
        if found is not None:
            return found[0], True
    spec = json.loads(bpb_evaluation)
    segments = val_segments(
        val_uri,
        tokenizer_from_json(storage.get_bytes(tokenizer_uri).decode("utf-8")),
        segment_tokens=spec["segment_tokens"],
        n_segments=spec["n_segments"],
    )
    with FetchedCheckpoint(tracker, f"models:/{name}/{champion.version}") as path:
        nats = checkpoint_segment_nats(path, segments, batch_size=batch_size)
        sha = sha or storage.sha256(path)
    save_scores(
        scores_uri(workspace.store, bpb_evaluation, sha),
        nats,
        np.array([s.n_bytes for s in segments], dtype=np.int64),
        evaluation=bpb_evaluation,
        checkpoint_sha256=sha,
    )
    return nats, False
