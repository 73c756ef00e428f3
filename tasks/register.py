from __future__ import annotations

import hashlib
import json

from prefect import get_run_logger, task

import storage
from model.checkpoint import load_checkpoint
from model.dist import pick_device
from model.evaluate import evaluate_checkpoint
from storage.lease import Lease
from tasks.cache import lease_dir
from tasks.common import IO_RETRIES, run_owner, tracker_for
from tasks.registry import (
    CHALLENGER,
    CHAMPION,
    CHECKPOINT_TAG,
    FetchedCheckpoint,
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
) -> RegisterResult:
    """Register a new version; `champion` moves to it only if it beats the champion's val loss,
    else `challenger` does (the latest version that lost to the champion).

    Both losses are measured on this run's val split with the evaluate stage's batches: the
    champion's recorded loss when it was measured so (the same val data, tokenizer, batches and
    device: the `evaluation` tag), or else the champion evaluated afresh, whatever data it saw.

    One registration per model name at a time (a lease in the store): two runs that trained the
    same checkpoint register it once, and champion decisions do not interleave.
    """
    logger = get_run_logger()
    with _one_registration_at_a_time(workspace, name, logger.info):
        tracker = tracker_for(workspace.tracking)
        val_loss = evaluated.val_loss
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
        checkpoint_sha256 = trained.checkpoint.sha256
        version = version_of_checkpoint(tracker, name, checkpoint_sha256)
        reused = version is not None
        if reused:
            logger.info("%s version %s is this checkpoint already: re-using it", name, version)
        else:
            tags = {
                "val_loss": f"{val_loss:.6f}",
                "val_sha256": splits.val.sha256,
                "evaluation": evaluation,
                "gptpipe.run_id": run_id,
                CHECKPOINT_TAG: checkpoint_sha256,
            }
            model_uri = trained.model_uri
            if model_uri is None:
                # a training re-used from the cache logged no model: log it now, into its own run,
                # which trained nothing and so gives the model no val_loss: it gets this one
                model_uri = log_checkpoint_model(
                    tracker, trained.mlflow_run_id, trained.checkpoint.uri, step=trained.step
                )
                loss_run = evaluated.mlflow_run_id or trained.mlflow_run_id
                if loss_run:
                    link_val_loss(tracker, model_uri, loss_run, val_loss)
            version = register(tracker, name, model_uri, tags=tags)
        if trained.mlflow_run_id:  # the train run links the version, new or re-used
            tracker.client.set_tag(
                trained.mlflow_run_id, "gptpipe.model_version", f"{name}/{version}"
            )
            tracker.client.set_tag(
                trained.mlflow_run_id, "gptpipe.model_version_reused", str(reused)
            )
        champion, champion_loss, promote, reason = _versus_champion(
            tracker,
            name,
            version,
            val_loss,
            evaluation=evaluation,
            evaluated=evaluated,
            splits=splits,
            tokenizer=tokenizer,
        )
        # the loser of a comparison on the same val data becomes the challenger
        alias = CHAMPION if promote else CHALLENGER if champion_loss is not None else None
        if alias:
            tracker.client.set_registered_model_alias(name, alias, version)
        challenger = version_by_alias(tracker, name, CHALLENGER) if promote else None
        if challenger is not None and str(challenger.version) == version:  # it had lost before
            tracker.client.delete_registered_model_alias(name, CHALLENGER)
        moved = f" -> {alias}" if alias else ""
        said = "re-used" if reused else "registered"
        logger.info("%s %s version %s; %s%s", said, name, version, reason, moved)
        return RegisterResult(
            name=name,
            version=version,
            champion=promote,
            champion_version=version if promote else (champion.version if champion else None),
            previous_champion_val_loss=champion_loss,
            reason=reason,
            reused=reused,
        )


def _versus_champion(
    tracker,
    name: str,
    version: str,
    val_loss: float,
    *,
    evaluation: str,
    evaluated: EvaluateResult,
    splits: SplitResult,
    tokenizer: Artifact,
):
    """(champion, its val loss or None, whether ``version`` replaces it, why)."""
    champion = version_by_alias(tracker, name)
    champion_loss = None
    if champion is None:
        promote, reason = True, "no champion yet"
    elif str(champion.version) == version:
        promote, reason = False, f"v{version} is the champion already"
    else:
        champion_loss, recorded = _champion_val_loss(
            tracker,
            name,
            champion,
            evaluation=evaluation,
            evaluated=evaluated,
            val_uri=splits.val.uri,
            tokenizer_uri=tokenizer.uri,
        )
        if champion_loss is None:
            promote = False
            reason = f"champion v{champion.version} uses another tokenizer: not comparable"
        else:
            # a recorded loss has the tag's 6 decimals: ours is compared at that precision too
            promote = (round(val_loss, 6) if recorded else val_loss) < champion_loss
            reason = (
                f"val loss {val_loss:.4f} {'beats' if promote else 'does not beat'} champion "
                f"v{champion.version}'s {champion_loss:.4f}{', as recorded' if recorded else ''} "
                "on the same val data"
            )
    return champion, champion_loss, promote, reason


def _one_registration_at_a_time(workspace: Workspace, name: str, log) -> Lease:
    """The lease on registering under ``name`` on this tracking server (kept in the store)."""
    name_key = hashlib.sha256(f"{workspace.tracking.uri}\0{name}".encode()).hexdigest()[:20]
    return Lease(
        lease_dir(workspace.store, "register", name_key),
        owner=run_owner(workspace),
        what=f"registering {name}",
        on_wait=log,
    )


def _champion_val_loss(
    tracker,
    name: str,
    champion,
    *,
    evaluation: str,
    evaluated: EvaluateResult,
    val_uri: str,
    tokenizer_uri: str,
) -> tuple[float | None, bool]:
    """The champion's loss on this run's val batches, and whether it is its recorded one (it was
    measured the same way: what evaluating it again would give); None if the champion uses
    another tokenizer."""
    if champion.tags.get("evaluation") == evaluation and "val_loss" in champion.tags:
        return float(champion.tags["val_loss"]), True
    with FetchedCheckpoint(tracker, f"models:/{name}/{champion.version}") as path:
        if load_checkpoint(path)["tokenizer"] != storage.get_bytes(tokenizer_uri).decode("utf-8"):
            return None, False
        losses = evaluate_checkpoint(
            path, {"val": val_uri}, evaluated.eval_iters, evaluated.batch_size, evaluated.seed
        )
    return losses["val"], False
